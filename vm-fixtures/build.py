#!/usr/bin/env python3
"""Build the virtual-machine fixtures of tests/vm into vm-fixtures/out/ (idempotent, cached).

Everything comes from Debian packages fetched with ``apt-get download`` and unpacked with
``dpkg -x`` (nothing is installed on the host), and nothing is ever mounted: the host kernel of
the build machine may have neither partition parsers nor FAT/ISO drivers. Outputs:

- ``vmlinuz`` + ``rescue-initrd.img``: the rescue VM (runs the agent from the host tree over 9p);
- ``tiny-initrd.img``: the tiny OS inside the sample images (reads the config drive, reports);
- ``uefi.qcow2`` (GPT, ESP with a standalone GRUB EFI), ``bios.raw`` (MBR, GRUB i386-pc in the
  MBR gap), ``uefi-4k.qcow2`` (GPT and FAT laid out for 4096-byte logical sectors);
- ``manifest.json``: path, format, sha256 and size of each image.

A stamp (hash of this script, the init scripts and the package versions) skips the work when
nothing changed. Run as root (a loop device with 4096-byte sectors lays out the 4Kn image).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
DEBS = OUT / "debs"
ROOT = OUT / "pkgroot"
MANIFEST = OUT / "manifest.json"
STAMP = OUT / "stamp"

PACKAGES = ["grub-efi-amd64-bin", "grub-pc-bin", "grub-common", "busybox-static"]
RESCUE_MODULES = [
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "efivarfs",
    # the disks of real servers (tests/vm/test_vm_hardware.py boots them all in one VM)
    "nvme",
    "ahci",
    "sd_mod",
    "sr_mod",
    "cdrom",
    "virtio_scsi",
    "xhci_pci",
    "usbcore",
    "usb_storage",
    "uas",
    "sym53c8xx",  # QEMU's lsi53c895a
    "megaraid_sas",  # QEMU's megasas
    "mptsas",  # QEMU's mptsas1068
    "mpt3sas",
]
TINY_MODULES = [
    "virtio_pci",
    "virtio_blk",
    "nvme",  # the installed disk also boots from NVMe and SATA (tests/vm/test_vm_hardware.py)
    "ahci",
    "sd_mod",
    "isofs",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "nls_utf8",
]
IMAGE_SIZE = 64 * 1024 * 1024
MIB = 1024 * 1024
TINY_CMDLINE = "console=ttyS0 quiet panic=-1"


def run(*args: str | Path, timeout: int = 600, **kw: object) -> str:
    """Run a tool; on failure raise with its stderr so the build says what went wrong."""
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def log(text: str) -> None:
    print(f"[vm-fixtures] {text}", file=sys.stderr, flush=True)


def kernel_package() -> str:
    """The versioned image package that linux-image-amd64 currently points at."""
    out = run("apt-cache", "depends", "linux-image-amd64")
    match = re.search(r"Depends: (linux-image-[0-9][^\s]*)", out)
    if not match:
        raise RuntimeError("cannot resolve linux-image-amd64 (run apt-get update first)")
    return match.group(1)


def fetch_packages(packages: list[str]) -> list[Path]:
    """apt-get download each package once into out/debs; return the .deb files."""
    DEBS.mkdir(parents=True, exist_ok=True)
    debs = []
    for pkg in packages:
        found = sorted(DEBS.glob(f"{pkg}_*.deb"))
        if not found:
            log(f"apt-get download {pkg}")
            run("apt-get", "download", pkg, cwd=DEBS)
            found = sorted(DEBS.glob(f"{pkg}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {pkg} left no .deb")
        debs.append(found[-1])
    return debs


def unpack(debs: list[Path]) -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    for deb in debs:
        run("dpkg", "-x", deb, ROOT)


def module_index(kdir: Path) -> dict[str, Path]:
    index = {}
    for ko in kdir.rglob("*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    return index


def module_order(kdir: Path, wanted: list[str]) -> list[Path]:
    """Wanted modules and their dependencies (from each .ko's modinfo), dependencies first."""
    index = module_index(kdir)
    order: list[Path] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        name = name.replace("-", "_")
        if name in seen:
            raise RuntimeError(f"module dependency loop at {name}")
        ko = index.get(name)
        if ko is None:
            builtin = (kdir / "modules.builtin").read_text()
            if re.search(rf"/{re.escape(name)}\.ko$", builtin.replace("-", "_"), re.M):
                return
            raise RuntimeError(f"kernel module {name} is neither a module nor built in")
        if ko in order:
            return
        match = re.search(rb"\x00depends=([^\x00]*)\x00", ko.read_bytes())
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                visit(dep, (*seen, name))
        order.append(ko)

    for name in wanted:
        visit(name)
    return order


def host_binary_with_libs(binary: str, dest: Path) -> None:
    """Copy a dynamically linked host binary and the shared libraries ldd names for it."""
    src = Path(shutil.which(binary) or f"/sbin/{binary}")
    (dest / "sbin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest / "sbin" / binary)
    for line in run("ldd", src).splitlines():
        match = re.search(r"(/\S+)", line)
        if not match:
            continue
        lib = Path(match.group(1))
        target = dest / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), target)


def build_initramfs(init: Path, modules: list[str], kdir: Path, out: Path) -> None:
    """A gzip'd newc cpio: static busybox, util-linux blkid, the modules, and our /init."""
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        stage = Path(tmp)
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "etc", "lib/modules"):
            (stage / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "bin" / "busybox", stage / "bin" / "busybox")
        host_binary_with_libs("blkid", stage)
        names = []
        for ko in module_order(kdir, modules):
            shutil.copy2(ko, stage / "lib" / "modules" / ko.name)
            names.append(ko.name)
        (stage / "etc" / "modules-order").write_text("\n".join(names) + "\n")
        shutil.copy2(init, stage / "init")
        (stage / "init").chmod(0o755)
        # init reopens /dev/console from devtmpfs anyway when this cannot be made
        with contextlib.suppress(PermissionError):
            os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*"))
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=stage,
            input="\n".join(files).encode(),
            capture_output=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"cpio failed: {proc.stderr.decode()}")
        out.write_bytes(gzip.compress(proc.stdout, compresslevel=6, mtime=0))


def fat_image(path: Path, size: int, sector: int, label: str, files: dict[str, Path]) -> None:
    """A FAT filesystem image file filled with mtools (no mount)."""
    path.unlink(missing_ok=True)
    args = ["mkfs.vfat", "-C", "-n", label, "-S", str(sector)]
    if sector == 512:
        args += ["-F", "32"] if size >= 64 * MIB else ["-F", "16"]
    run(*args, path, str(size // 1024))
    dirs = sorted({str(Path(d).parent) for d in files if str(Path(d).parent) != "."})
    made: set[str] = set()
    for d in dirs:
        parts = Path(d).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in made:
                run("mmd", "-i", path, f"::/{sub}")
                made.add(sub)
    for dest, src in files.items():
        run("mcopy", "-i", path, src, f"::/{dest}")


def ext2_image(path: Path, size: int, block: int, label: str, content: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        for name, text in content.items():
            f = Path(tmp) / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        path.unlink(missing_ok=True)
        run(
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext2",
            "-b",
            str(block),
            "-L",
            label,
            "-d",
            tmp,
            path,
            f"{size // 1024}k",
        )


def splice(image: Path, offset: int, part: Path) -> None:
    """Copy a filesystem image into the disk image at a byte offset."""
    with open(image, "r+b") as dst, open(part, "rb") as src:
        dst.seek(offset)
        shutil.copyfileobj(src, dst, 4 * MIB)


def partition(image: Path, script: str, sector: int) -> None:
    """sfdisk on the image file, or on a 4096-byte-sector loop device over it for 4Kn."""
    if sector == 512:
        run("sfdisk", "--no-reread", "--no-tell-kernel", image, input=script)
        return
    loop = run("losetup", "-f", "--show", "--sector-size", str(sector), image).strip()
    try:
        run("sfdisk", "--no-reread", "--no-tell-kernel", loop, input=script)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)


def grub_efi(out: Path, cfg: str) -> None:
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        cfgfile = Path(tmp) / "grub.cfg"
        cfgfile.write_text(cfg)
        mods = "part_gpt part_msdos fat ext2 search search_fs_file linux echo normal test"
        run(
            ROOT / "usr/bin/grub-mkstandalone",
            "-d",
            ROOT / "usr/lib/grub/x86_64-efi",
            "-O",
            "x86_64-efi",
            "--modules",
            mods,
            "--install-modules",
            mods + " configfile all_video efi_gop",
            "--locales=",
            "--fonts=",
            "--themes=",
            "-o",
            out,
            f"boot/grub/grub.cfg={cfgfile}",
        )


def uefi_image(out_raw: Path, sector: int, kernel: Path, initrd: Path, tag: str) -> None:
    """GPT: ESP (standalone GRUB EFI + kernel + tiny initrd) and a small ext2 root."""
    esp_start, esp_size = 1 * MIB, 48 * MIB
    root_start, root_size = esp_start + esp_size, 12 * MIB
    out_raw.unlink(missing_ok=True)
    with open(out_raw, "wb") as f:
        f.truncate(IMAGE_SIZE)
    script = (
        "label: gpt\n"
        f'start={esp_start // sector}, size={esp_size // sector}, type=U, name="EFI"\n'
        f'start={root_start // sector}, size={root_size // sector}, type=L, name="root"\n'
    )
    partition(out_raw, script, sector)
    work = OUT / f"work-{tag}"
    work.mkdir(exist_ok=True)
    cfg = (
        "set timeout=0\n"
        "search --no-floppy --file --set=root /byoi/vmlinuz\n"
        f'echo "BYOI-GRUB-EFI root=$root"\n'
        f"linux /byoi/vmlinuz {TINY_CMDLINE} byoi.image={tag}\n"
        "initrd /byoi/initrd.img\n"
        "boot\n"
    )
    grub_efi(work / "BOOTX64.EFI", cfg)
    fat_image(
        work / "esp.img",
        esp_size,
        sector,
        "ESP",
        {
            "EFI/BOOT/BOOTX64.EFI": work / "BOOTX64.EFI",
            # the same loader at a vendor path, reachable only through an NVRAM boot entry
            "EFI/byoi/grubx64.efi": work / "BOOTX64.EFI",
            "byoi/vmlinuz": kernel,
            "byoi/initrd.img": initrd,
        },
    )
    splice(out_raw, esp_start, work / "esp.img")
    ext2_image(
        work / "root.img",
        root_size,
        4096,
        "byoi-root",
        {"etc/byoi-release": f"byoi sample image {tag}\n"},
    )
    splice(out_raw, root_start, work / "root.img")
    shutil.rmtree(work)


def bios_image(out_raw: Path, kernel: Path, initrd: Path) -> None:
    """MBR: GRUB i386-pc boot.img in the MBR, core.img in the gap, FAT /boot read by GRUB."""
    part_start, part_size = 1 * MIB, 48 * MIB
    root_start, root_size = part_start + part_size, 12 * MIB
    out_raw.unlink(missing_ok=True)
    with open(out_raw, "wb") as f:
        f.truncate(IMAGE_SIZE)
    script = (
        "label: dos\n"
        f"start={part_start // 512}, size={part_size // 512}, type=c, bootable\n"
        f"start={root_start // 512}, size={root_size // 512}, type=83\n"
    )
    partition(out_raw, script, 512)
    work = OUT / "work-bios"
    work.mkdir(exist_ok=True)
    grubdir = ROOT / "usr/lib/grub/i386-pc"
    run(
        ROOT / "usr/bin/grub-mkimage",
        "-d", grubdir,
        "-O", "i386-pc",
        "-o", work / "core.img",
        "-p", "(hd0,msdos1)/boot/grub",
        "biosdisk", "part_msdos", "fat", "normal", "linux", "search", "echo", "test",
        "configfile",
    )  # fmt: skip
    core = (work / "core.img").read_bytes()
    if len(core) > part_start - 512:
        raise RuntimeError(f"core.img is {len(core)} bytes, larger than the MBR gap")
    cfg = work / "grub.cfg"
    cfg.write_text(
        "set timeout=0\n"
        'echo "BYOI-GRUB-PC root=$root"\n'
        f"linux /byoi/vmlinuz {TINY_CMDLINE} byoi.image=bios\n"
        "initrd /byoi/initrd.img\n"
        "boot\n"
    )
    fat_image(
        work / "boot.img",
        part_size,
        512,
        "BOOT",
        {"boot/grub/grub.cfg": cfg, "byoi/vmlinuz": kernel, "byoi/initrd.img": initrd},
    )
    splice(out_raw, part_start, work / "boot.img")
    ext2_image(
        work / "root.img",
        root_size,
        4096,
        "byoi-root",
        {"etc/byoi-release": "byoi sample image bios\n"},
    )
    splice(out_raw, root_start, work / "root.img")
    boot = (grubdir / "boot.img").read_bytes()
    with open(out_raw, "r+b") as f:
        f.seek(0)
        f.write(boot[:440])  # keep the disk signature and partition table sfdisk wrote
        f.seek(512)
        f.write(core)
    shutil.rmtree(work)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_value(debs: list[Path]) -> str:
    h = hashlib.sha256()
    for f in (Path(__file__), HERE / "rescue-init.sh", HERE / "tiny-init.sh"):
        h.update(f.read_bytes())
    for deb in debs:
        h.update(deb.name.encode())
    h.update(Path("/sbin/blkid").resolve().read_bytes())
    return h.hexdigest()


def build(force: bool = False) -> dict:
    """Build everything unless the stamp says it is up to date; return the manifest.

    Serialised with a lock file: several test runs may share one working tree.
    """
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(force)


def _build_locked(force: bool) -> dict:
    debs = fetch_packages([kernel_package(), *PACKAGES])
    stamp = stamp_value(debs)
    if not force and STAMP.exists() and STAMP.read_text() == stamp and MANIFEST.exists():
        return json.loads(MANIFEST.read_text())
    STAMP.unlink(missing_ok=True)
    log("unpacking packages")
    unpack(debs)
    kdirs = sorted((ROOT / "lib/modules").iterdir())
    if len(kdirs) != 1:
        raise RuntimeError(f"expected one kernel in the packages, found {kdirs}")
    kdir = kdirs[0]
    kernel = OUT / "vmlinuz"
    shutil.copy2(ROOT / "boot" / f"vmlinuz-{kdir.name}", kernel)
    log("building initramfs images")
    build_initramfs(HERE / "rescue-init.sh", RESCUE_MODULES, kdir, OUT / "rescue-initrd.img")
    build_initramfs(HERE / "tiny-init.sh", TINY_MODULES, kdir, OUT / "tiny-initrd.img")
    tiny = OUT / "tiny-initrd.img"
    log("building the UEFI image")
    uefi_image(OUT / "uefi.raw", 512, kernel, tiny, "uefi")
    log("building the 4Kn UEFI image")
    uefi_image(OUT / "uefi-4k.raw", 4096, kernel, tiny, "uefi-4k")
    log("building the legacy BIOS image")
    bios_image(OUT / "bios.raw", kernel, tiny)
    for name in ("uefi", "uefi-4k"):
        dst = OUT / f"{name}.qcow2"
        dst.unlink(missing_ok=True)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", OUT / f"{name}.raw", dst)
        (OUT / f"{name}.raw").unlink()
    images = {}
    for name, fname, fmt, sector in (
        ("uefi", "uefi.qcow2", "qcow2", 512),
        ("uefi-4k", "uefi-4k.qcow2", "qcow2", 4096),
        ("bios", "bios.raw", "raw", 512),
    ):
        p = OUT / fname
        images[name] = {
            "path": str(p),
            "format": fmt,
            "sector_size": sector,
            "sha256": sha256(p),
            "size": p.stat().st_size,
        }
    manifest = {
        "kernel": str(kernel),
        "kernel_version": kdir.name,
        "rescue_initrd": str(OUT / "rescue-initrd.img"),
        "tiny_initrd": str(tiny),
        "tiny_cmdline": TINY_CMDLINE,
        "images": images,
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(ROOT)
    STAMP.write_text(stamp)
    log("done")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()
    manifest = build(force=args.force)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

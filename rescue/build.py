#!/usr/bin/env python3
"""Build the PXE-bootable rescue environment: a Debian kernel and a self-contained initramfs.

The initramfs is a stripped Debian bookworm (``debootstrap --variant=minbase`` plus the tools the
agent runs), Python 3, the agent and its Python dependencies, and ``rescue/init.sh`` as /init:
it configures the network by DHCP and starts ``byoi-agent serve`` from settings on the kernel
command line (see init.sh). Outputs in rescue/out/:

- ``vmlinuz`` (an EFI stub kernel, so iPXE boots it under UEFI and BIOS alike);
- ``rescue.cpio.zst`` (the initramfs) and ``manifest.json`` (paths, sizes, what dominates).

Caching, so a second build with nothing changed takes seconds: the debootstrap tree
(out/root) is kept while the package list is unchanged, the Python dependencies (out/site)
while the pinned requirements are unchanged, and the packed initramfs while nothing that goes
into it changed (the agent code is part of that stamp, so an agent edit repacks). Runs as root
(debootstrap). Nothing is mounted on the build host.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
ROOT = OUT / "root"  # pristine debootstrap tree (cache)
SITE = OUT / "site"  # Python dependencies (cache)
STAGE = OUT / "stage"  # the tree that is packed, remade from ROOT on each pack
DEBS = OUT / "debs"
KERNEL_TREE = OUT / "kernel"
INITRD = OUT / "rescue.cpio.zst"
KERNEL = OUT / "vmlinuz"
MANIFEST = OUT / "manifest.json"

SUITE = "bookworm"
# The Debian mirror debootstrap fetches from: --mirror, else $BYOI_DEBIAN_MIRROR, else the build
# machine's own apt sources (an operator behind their own mirror builds from it), else this.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "BYOI_DEBIAN_MIRROR"
APT_ETC = Path("/etc/apt")
# What the agent runs (agent/tools.py callers) and what init.sh needs; minbase brings
# util-linux (blkid, wipefs, partx, mount), e2fsprogs and coreutils.
PACKAGES = [
    "python3",
    "qemu-utils",
    "gdisk",
    "fdisk",
    "util-linux",
    "efibootmgr",
    "mtools",
    "dosfstools",
    "busybox",  # udhcpc, ip, wget: DHCP and the token fetch in a few hundred KB
    "ca-certificates",  # https image URLs
]
# NICs and disk controllers of QEMU and common servers, and efivarfs for efibootmgr.
MODULES = [
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "ahci",
    "ata_piix",
    "nvme",
    "sr_mod",  # virtual CD of a BMC, ATAPI drives
    "cdrom",
    "usbcore",
    "xhci_pci",
    "ehci_pci",
    "usb_storage",  # USB sticks and BMC virtual media
    "uas",
    "mpt3sas",  # LSI/Broadcom SAS HBAs (and QEMU's mptsas1068 through mptsas)
    "mptsas",
    "megaraid_sas",  # LSI MegaRAID (and QEMU's megasas)
    "sym53c8xx",  # QEMU's lsi53c895a
    "aacraid",
    "hpsa",
    "smartpqi",
    "efivarfs",
    "af_packet",
]
# Python packages that only the tests need.
NOT_IN_RESCUE = {"qemu.qmp", "qemu-qmp"}

STRIP_PATHS = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/lintian",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/common-licenses",
    "usr/share/zoneinfo",
    "usr/share/perl5",
    "usr/share/debconf",
    "usr/share/pixmaps",
    "usr/share/menu",
    "usr/share/gcc",
    "usr/share/gdb",
    "usr/lib/locale",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/perl",
    "usr/bin/perl",
    "usr/bin/perl5.36.0",
    "usr/lib/apt",
    "usr/lib/dpkg",
    "usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0",
    "usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0",
    "usr/lib/x86_64-linux-gnu/libapt-private.so.0.0",
    "usr/lib/x86_64-linux-gnu/libapt-private.so.0.0.0",
    "usr/bin/apt",
    "usr/bin/apt-get",
    "usr/bin/apt-cache",
    "usr/bin/apt-config",
    "usr/bin/apt-mark",
    "usr/bin/apt-cdrom",
    "usr/bin/apt-key",
    "usr/bin/qemu-io",
    "usr/bin/qemu-nbd",
    "usr/bin/qemu-storage-daemon",
    "var/cache",
    "var/lib/apt",
    "var/lib/dpkg",
    "var/log",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/distutils",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu",
    "usr/lib/python3/dist-packages",
]


def run(*args: str | Path, timeout: int = 1800, **kw: object) -> str:
    """Run a tool; on failure raise with its stderr so the build says what went wrong."""
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr[-3000:]}"
        )
    return proc.stdout


def log(text: str) -> None:
    print(f"[rescue] {text}", file=sys.stderr, flush=True)


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def tree_digest(path: Path) -> str:
    """Hash of every file under a directory (names and contents), ignoring bytecode."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


# --- the Debian mirror -------------------------------------------------------------------------


def parse_sources(text: str, deb822: bool) -> list[tuple[str, list[str], list[str]]]:
    """``(uri, suites, components)`` of each enabled ``deb`` entry of one apt sources file.

    One-line format (``sources.list``, ``*.list``): ``deb [options] URI SUITE COMPONENT...``.
    deb822 (``*.sources``): stanzas of ``Types:``, ``URIs:``, ``Suites:``, ``Components:``,
    ``Enabled:``, separated by blank lines, ``#`` comments anywhere.
    """
    entries = []
    if not deb822:
        for line in text.splitlines():
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]], words[3:]))
        return entries
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.lstrip().startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:  # a continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites, components = fields.get("suites", "").split(), fields.get("components", "").split()
        entries += [(uri, suites, components) for uri in fields.get("uris", "").split()]
    return entries


def mirror_from_apt(suite: str = SUITE, etc: Path = APT_ETC) -> str | None:
    """The first http(s)/file mirror of the build machine's apt sources serving ``suite main``."""
    files = [(etc / "sources.list", False)]
    files += [(p, False) for p in sorted((etc / "sources.list.d").glob("*.list"))]
    files += [(p, True) for p in sorted((etc / "sources.list.d").glob("*.sources"))]
    for path, deb822 in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for uri, suites, components in parse_sources(text, deb822):
            if suite in suites and "main" in components and re.match(r"(https?|file):", uri):
                return uri.rstrip("/")
    return None


def choose_mirror(option: str | None, suite: str = SUITE, etc: Path = APT_ETC) -> str:
    """--mirror, else $BYOI_DEBIAN_MIRROR, else the apt sources' mirror, else deb.debian.org."""
    return option or os.environ.get(MIRROR_ENV) or mirror_from_apt(suite, etc) or DEFAULT_MIRROR


# --- the base system ---------------------------------------------------------------------------


def debootstrap(mirror: str = DEFAULT_MIRROR) -> None:
    """debootstrap minbase + PACKAGES into out/root, unless the tree matches the package list.

    The mirror is not part of the stamp: it changes where the packages come from, not which.
    """
    stamp = ROOT / ".byoi-stamp"
    want = digest(SUITE, *PACKAGES)
    if stamp.exists() and stamp.read_text() == want:
        log(f"debootstrap: cached ({ROOT})")
        return
    if ROOT.exists():
        shutil.rmtree(ROOT)
    log(f"debootstrap --variant=minbase {SUITE} from {mirror} (a few minutes)")
    t0 = time.monotonic()
    run(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        ROOT,
        mirror,
        timeout=3600,
    )
    stamp.write_text(want)
    log(f"debootstrap: done in {time.monotonic() - t0:.0f} s")


# --- the kernel --------------------------------------------------------------------------------


def kernel_deb() -> Path:
    """The linux-image deb: vm-fixtures' copy when present, else apt-get download."""
    out = run("apt-cache", "depends", "linux-image-amd64")
    match = re.search(r"Depends: (linux-image-[0-9][^\s]*)", out)
    if not match:
        raise RuntimeError("cannot resolve linux-image-amd64 (run apt-get update first)")
    pkg = match.group(1)
    for d in (DEBS, REPO / "vm-fixtures" / "out" / "debs"):
        found = sorted(d.glob(f"{pkg}_*.deb"))
        if found:
            return found[-1]
    DEBS.mkdir(parents=True, exist_ok=True)
    log(f"apt-get download {pkg}")
    run("apt-get", "download", pkg, cwd=DEBS)
    found = sorted(DEBS.glob(f"{pkg}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {pkg} left no .deb")
    return found[-1]


def unpack_kernel(deb: Path) -> Path:
    """dpkg -x the kernel package once; return its module directory."""
    stamp = KERNEL_TREE / ".byoi-stamp"
    if not (stamp.exists() and stamp.read_text() == deb.name):
        if KERNEL_TREE.exists():
            shutil.rmtree(KERNEL_TREE)
        KERNEL_TREE.mkdir(parents=True)
        log(f"dpkg -x {deb.name}")
        run("dpkg", "-x", deb, KERNEL_TREE)
        stamp.write_text(deb.name)
    kdirs = sorted((KERNEL_TREE / "lib/modules").iterdir())
    if len(kdirs) != 1:
        raise RuntimeError(f"expected one kernel in {deb.name}, found {kdirs}")
    return kdirs[0]


def _vm_fixtures_build():
    """vm-fixtures/build.py as a module: its module dependency resolver is reused here."""
    spec = importlib.util.spec_from_file_location(
        "vm_fixtures_build", REPO / "vm-fixtures" / "build.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_modules(kdir: Path) -> list[Path]:
    """The wanted modules with their dependencies, in load order (absent ones are skipped)."""
    order = _vm_fixtures_build().module_order
    result: list[Path] = []
    for name in MODULES:
        try:
            for ko in order(kdir, [name]):
                if ko not in result:
                    result.append(ko)
        except RuntimeError as exc:
            log(f"module {name}: {exc}")
    return result


# --- Python dependencies -----------------------------------------------------------------------


def requirements() -> list[str]:
    """The agent's runtime dependencies, pinned to the versions of the build's Python env.

    Pinning to what the test suite ran against keeps the rescue and the tests in step.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = []
    for req in project["dependencies"]:
        name = re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]
        if name in NOT_IN_RESCUE:
            continue
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(req)
    return sorted(pins)


def constraints() -> list[str]:
    """Every installed distribution pinned, so transitive dependencies match the env too."""
    return sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())


def python_deps() -> None:
    """pip install --target out/site (pip's cache makes a rebuild offline-fast)."""
    reqs = requirements()
    stamp = SITE / ".byoi-stamp"
    want = digest(sys.version, *reqs)
    if stamp.exists() and stamp.read_text() == want:
        log("python dependencies: cached")
        return
    if SITE.exists():
        shutil.rmtree(SITE)
    SITE.mkdir(parents=True)
    cons = OUT / "constraints.txt"
    cons.write_text("\n".join(constraints()) + "\n")
    log(f"pip install --target {SITE.name}: {' '.join(reqs)}")
    run(
        sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--only-binary=:all:",
        "--target", SITE, "--constraint", cons, *reqs,
    )  # fmt: skip
    shutil.rmtree(SITE / "bin", ignore_errors=True)
    stamp.write_text(want)


# --- staging and packing -----------------------------------------------------------------------


def strip(stage: Path) -> None:
    for rel in STRIP_PATHS:
        p = stage / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for d in sorted(stage.rglob("__pycache__"), reverse=True):
        shutil.rmtree(d, ignore_errors=True)
    for pattern in ("*.dist-info/RECORD", "*.pyi"):
        for f in stage.glob(f"opt/byoi/site/{pattern}"):
            f.unlink()


def stage_tree(kdir: Path, modules: list[Path]) -> None:
    if STAGE.exists():
        shutil.rmtree(STAGE)
    log("staging")
    run("cp", "-a", ROOT, STAGE)
    (STAGE / ".byoi-stamp").unlink(missing_ok=True)
    strip(STAGE)
    opt = STAGE / "opt" / "byoi"
    opt.mkdir(parents=True)
    shutil.copytree(SITE, opt / "site", ignore=shutil.ignore_patterns(".byoi-stamp"))
    shutil.copytree(REPO / "agent", opt / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(HERE / "announce.py", opt / "announce.py")
    strip(STAGE)  # the copied site-packages have RECORD files and stubs too
    moddir = STAGE / "lib" / "modules" / "byoi"
    moddir.mkdir(parents=True)
    for ko in modules:
        shutil.copy2(ko, moddir / ko.name)
    (moddir / "order").write_text("\n".join(ko.name for ko in modules) + "\n")
    etc = STAGE / "etc" / "byoi"
    etc.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "udhcpc.sh", etc / "udhcpc.sh")
    (etc / "udhcpc.sh").chmod(0o755)
    (etc / "kernel-release").write_text(kdir.name + "\n")
    wrapper = STAGE / "usr" / "local" / "bin" / "byoi-agent"
    wrapper.write_text(
        "#!/bin/sh\n"
        "export PYTHONPATH=/opt/byoi:/opt/byoi/site\n"
        'exec /usr/bin/python3 -m agent "$@"\n'
    )
    wrapper.chmod(0o755)
    shutil.copy2(HERE / "init.sh", STAGE / "init")
    (STAGE / "init").chmod(0o755)
    (STAGE / "etc" / "hostname").write_text("byoi-rescue\n")


def pack(out: Path, level: int) -> None:
    """newc cpio of the stage, owned by root, compressed with zstd (the kernel decompresses it)."""
    files = sorted(p.relative_to(STAGE).as_posix() for p in STAGE.rglob("*"))
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as dst:
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=STAGE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        zstd = subprocess.Popen(
            ["zstd", f"-{level}", "-T0", "-q", "-c"],
            stdin=cpio.stdout,
            stdout=dst,
            stderr=subprocess.PIPE,
        )
        assert cpio.stdin and cpio.stdout
        cpio.stdout.close()
        cpio.stdin.write("\n".join(files).encode() + b"\n")
        cpio.stdin.close()
        zrc = zstd.wait(timeout=1800)
        crc = cpio.wait(timeout=60)
    if crc != 0 or zrc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"cpio ({crc}) or zstd ({zrc}) failed")
    tmp.replace(out)


def du_top(root: Path, depth: int = 3, count: int = 14) -> list[tuple[int, str]]:
    """What dominates the image: bytes per directory, files below ``depth`` counted in their
    ancestor at that depth (a partition of the tree, so the figures add up)."""
    sizes: dict[str, int] = {}
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            key = "/".join(f.relative_to(root).parts[:-1][:depth]) or "."
            sizes[key] = sizes.get(key, 0) + f.stat().st_size
    return sorted(((size, name) for name, size in sizes.items()), reverse=True)[:count]


def build(force: bool = False, level: int = 19, mirror: str | None = None) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(force, level, choose_mirror(mirror))


def _build_locked(force: bool, level: int, mirror: str) -> dict:
    t0 = time.monotonic()
    debootstrap(mirror)
    kdir = unpack_kernel(kernel_deb())
    python_deps()
    modules = kernel_modules(kdir)
    inputs = digest(
        (ROOT / ".byoi-stamp").read_text(),
        (SITE / ".byoi-stamp").read_text(),
        kdir.name,
        str(level),
        *(ko.name for ko in modules),
        Path(__file__).read_bytes(),
        *((HERE / n).read_bytes() for n in ("init.sh", "udhcpc.sh", "announce.py")),
        tree_digest(REPO / "agent"),
    )
    stamp = OUT / "stamp"
    if not force and stamp.exists() and stamp.read_text() == inputs and MANIFEST.exists():
        log(f"up to date ({time.monotonic() - t0:.1f} s)")
        return json.loads(MANIFEST.read_text())
    stamp.unlink(missing_ok=True)
    shutil.copy2(KERNEL_TREE / "boot" / f"vmlinuz-{kdir.name}", KERNEL)
    stage_tree(kdir, modules)
    log(f"packing (zstd -{level})")
    pack(INITRD, level)
    unpacked = sum(f.stat().st_size for f in STAGE.rglob("*") if f.is_file() and not f.is_symlink())
    manifest = {
        "kernel": str(KERNEL),
        "kernel_version": kdir.name,
        "initrd": str(INITRD),
        "initrd_size": INITRD.stat().st_size,
        "unpacked_size": unpacked,
        "kernel_size": KERNEL.stat().st_size,
        "largest": [{"dir": name, "bytes": size} for size, name in du_top(STAGE)],
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(STAGE)
    stamp.write_text(inputs)
    return manifest


def report(manifest: dict) -> str:
    mib = 1024 * 1024
    lines = [
        f"kernel  {manifest['kernel']} ({manifest['kernel_size'] / mib:.1f} MiB, "
        f"{manifest['kernel_version']})",
        f"initrd  {manifest['initrd']} ({manifest['initrd_size'] / mib:.1f} MiB compressed, "
        f"{manifest['unpacked_size'] / mib:.1f} MiB unpacked)",
        "largest directories (unpacked):",
    ]
    lines += [f"  {e['bytes'] / mib:7.1f} MiB  /{e['dir']}" for e in manifest["largest"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="repack even if up to date")
    parser.add_argument("--level", type=int, default=19, help="zstd level (default 19)")
    parser.add_argument(
        "--mirror",
        help=f"Debian mirror URL (default: ${MIRROR_ENV}, else this machine's apt sources)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("rescue/build.py: run as root (debootstrap)", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):
        print(report(build(force=args.force, level=args.level, mirror=args.mirror)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Small sample cloud images for the demo and the tests, built without mounting anything.

A GPT image with an EFI system partition (FAT, holding an EFI/BOOT directory) and a Linux
partition (ext4 populated with ``mke2fs -d``), or the same on an MBR table. The filesystems are
built as separate files and copied in at their partition's offset, so no loop device, partition
node or mount is needed.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

MiB = 1024 * 1024


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120)


def _copy_in(image: Path, fs: Path, offset: int) -> None:
    with open(image, "r+b") as out, open(fs, "rb") as src:
        out.seek(offset)
        while chunk := src.read(4 * MiB):
            out.write(chunk)


def build_raw(
    path: Path,
    *,
    table: str = "gpt",
    size_mib: int = 48,
    sector_size: int = 512,
    marker: str = "byoi sample image",
) -> Path:
    """Build a raw disk image: partition 1 an ESP (16 MiB FAT), partition 2 ext4 (the rest)."""
    esp_start, esp_size = 1 * MiB, 16 * MiB
    root_start = esp_start + esp_size
    root_size = (size_mib * MiB) - root_start - 1 * MiB  # leave room for the backup GPT
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    ss = sector_size
    if table == "gpt":
        args = [
            "sgdisk",
            "-o",
            f"-n1:{esp_start // ss}:{(root_start // ss) - 1}",
            "-t1:ef00",
            "-c1:EFI",
            f"-n2:{root_start // ss}:{(root_start + root_size) // ss - 1}",
            "-t2:8300",
            "-c2:root",
            str(path),
        ]
        if ss != 512:
            raise ValueError("4Kn sample images are built on a 4096-byte loop device")
        _run(*args)
    elif table == "dos":
        script = (
            f"label: dos\nstart={esp_start // 512}, size={esp_size // 512}, type=ef, bootable\n"
            f"start={root_start // 512}, size={root_size // 512}, type=83\n"
        )
        subprocess.run(
            ["sfdisk", "--no-reread", "--no-tell-kernel", str(path)],
            input=script.encode(),
            check=True,
            capture_output=True,
            timeout=60,
        )
    else:
        raise ValueError(table)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        esp = tmpdir / "esp.fat"
        with open(esp, "wb") as f:
            f.truncate(esp_size)
        _run("mkfs.vfat", "-F", "16", "-n", "EFI", str(esp))
        boot = tmpdir / "BOOTX64.EFI"
        boot.write_bytes(b"MZ placeholder, not a real EFI binary\n")
        _run("mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT")
        _run("mcopy", "-i", str(esp), str(boot), "::/EFI/BOOT/BOOTX64.EFI")
        _copy_in(path, esp, esp_start)

        tree = tmpdir / "root"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "byoi-sample").write_text(marker + "\n")
        rootfs = tmpdir / "root.ext4"
        with open(rootfs, "wb") as f:
            f.truncate(root_size)
        _run("mke2fs", "-q", "-t", "ext4", "-L", "cloudimg-rootfs", "-d", str(tree), str(rootfs))
        _copy_in(path, rootfs, root_start)
    return path


def build_image(path: Path, *, fmt: str = "qcow2", table: str = "gpt", size_mib: int = 48) -> Path:
    """A sample image in ``fmt`` (qcow2 or raw)."""
    if fmt == "raw":
        return build_raw(path, table=table, size_mib=size_mib)
    raw = path.with_suffix(".raw-tmp")
    try:
        build_raw(raw, table=table, size_mib=size_mib)
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    finally:
        raw.unlink(missing_ok=True)
    return path


def build_odd_gpt(path: Path, size_mib: int = 32) -> Path:
    """A valid but unusual GPT image: its entry array at LBA 2048 (``sgdisk -j``), beyond the
    first MiB, and a hybrid MBR that also lists the ESP (``sgdisk -h``)."""
    path.write_bytes(bytes(size_mib * 1024 * 1024))
    for args in (
        ["-j", "2048", "-n", "1:4096:+4M", "-t", "1:ef00", "-n", "2:0:0"],
        ["-h", "1"],
    ):
        subprocess.run(["sgdisk", *args, str(path)], check=True, capture_output=True)
    return path

"""The install benchmark's images: GPT disks (EFI + Linux partition) full of random data.

Like the issue's 734 MB qcow2: a 4 GiB virtual disk whose ext4 root partition holds ~700 MiB
of random files (incompressible, no zero clusters to skip), as qcow2; and a raw image with the
same kind of content in a tight 1 GiB disk (raw images are usually shipped without much empty
room). Built once into bench/out/images/<size>/ and reused while their stamp matches: the
filesystems are made in place (``mke2fs -E offset=``), so the raw files stay sparse and no
loop device or mount is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
ESP_START = 1 * MiB
ESP_SIZE = 64 * MiB
STAMP_VERSION = 1


@dataclass(frozen=True)
class Size:
    """One benchmark size: the qcow2's and the raw image's virtual sizes, and the random data."""

    qcow2_virtual: int
    raw_virtual: int
    data: int


SIZES = {
    "734m": Size(qcow2_virtual=4 * GiB, raw_virtual=1 * GiB, data=700 * MiB),
    "1.9g": Size(qcow2_virtual=6 * GiB, raw_virtual=2 * GiB, data=1800 * MiB),
}


@dataclass(frozen=True)
class Image:
    path: Path
    fmt: str
    sha256: str
    size: int  # bytes on the wire
    virtual_size: int


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=900)


def _random_tree(tree: Path, total: int) -> None:
    """Files of random bytes, 64 MiB each, varied per block so nothing dedups or compresses."""
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "byoi-sample").write_text("byoi install benchmark image\n")
    data = tree / "data"
    data.mkdir()
    block = os.urandom(16 * MiB)
    n = 0
    left = total
    while left > 0:
        with open(data / f"blob{n:03d}", "wb") as f:
            for i in range(min(left, 64 * MiB) // (16 * MiB)):
                f.write((n * 64 + i).to_bytes(8, "little") + block[8:])
        left -= 64 * MiB
        n += 1


def _esp(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(ESP_SIZE)
    _run("mkfs.vfat", "-F", "32", "-n", "EFI", str(path))
    boot = path.with_name("BOOTX64.EFI")
    boot.write_bytes(b"MZ placeholder, not a real EFI binary\n")
    _run("mmd", "-i", str(path), "::/EFI", "::/EFI/BOOT")
    _run("mcopy", "-i", str(path), str(boot), "::/EFI/BOOT/BOOTX64.EFI")


def build_disk(path: Path, virtual: int, tree: Path, esp: Path) -> None:
    """A sparse raw GPT disk: partition 1 the ESP, partition 2 ext4 holding ``tree``."""
    with open(path, "wb") as f:
        f.truncate(virtual)
    root_start = ESP_START + ESP_SIZE
    root_end = virtual - 1 * MiB  # room for the backup GPT
    _run(
        "sgdisk",
        "-o",
        f"-n1:{ESP_START // 512}:{root_start // 512 - 1}",
        "-t1:ef00",
        "-c1:EFI",
        f"-n2:{root_start // 512}:{root_end // 512 - 1}",
        "-t2:8300",
        "-c2:root",
        str(path),
    )
    with open(path, "r+b") as out, open(esp, "rb") as src:
        out.seek(ESP_START)
        shutil.copyfileobj(src, out, 4 * MiB)
    blocks = (root_end - root_start) // 4096
    _run(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-L",
        "cloudimg-rootfs",
        "-E",
        f"offset={root_start}",
        "-d",
        str(tree),
        str(path),
        str(blocks),
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _load(stamp: Path, want: dict) -> dict[str, Image] | None:
    try:
        have = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    if have.get("params") != want:
        return None
    images = {}
    for fmt, d in have["images"].items():
        image = Image(Path(d["path"]), fmt, d["sha256"], d["size"], d["virtual_size"])
        if not image.path.exists() or image.path.stat().st_size != image.size:
            return None
        images[fmt] = image
    return images


def ensure_images(out: Path, size_name: str) -> dict[str, Image]:
    """The qcow2 and raw images of ``size_name`` under ``out``, built if missing or stale."""
    size = SIZES[size_name]
    folder = out / "images" / size_name
    stamp = folder / "stamp.json"
    want = {"version": STAMP_VERSION, **asdict(size)}
    cached = _load(stamp, want)
    if cached:
        return cached
    print(f"building the {size_name} images in {folder} (once) ...", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    scratch = folder / "scratch"
    scratch.mkdir(parents=True)
    _random_tree(scratch / "tree", size.data)
    _esp(scratch / "esp.fat")
    big = scratch / "disk.raw"
    build_disk(big, size.qcow2_virtual, scratch / "tree", scratch / "esp.fat")
    qcow2 = folder / "image.qcow2"
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(big), str(qcow2))
    big.unlink()
    raw = folder / "image.raw"
    build_disk(raw, size.raw_virtual, scratch / "tree", scratch / "esp.fat")
    shutil.rmtree(scratch)
    images = {
        "qcow2": Image(qcow2, "qcow2", _sha256(qcow2), qcow2.stat().st_size, size.qcow2_virtual),
        "raw": Image(raw, "raw", _sha256(raw), raw.stat().st_size, size.raw_virtual),
    }
    for d in (out, out / "images", folder):  # nginx workers run as an unprivileged user
        d.chmod(0o755)
    for image in images.values():
        image.path.chmod(0o644)
    record = {fmt: {**asdict(i), "path": str(i.path)} | {"fmt": fmt} for fmt, i in images.items()}
    stamp.write_text(json.dumps({"params": want, "images": record}, indent=2))
    return images

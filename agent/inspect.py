"""Image inspection: is the file what the customer declared, and is it safe to convert?

The declared ``imageType`` is never trusted: the format is detected from the content (qcow2's
header is parsed here, and qemu-img's own probe is asked too). A qcow2 image can point at other
files (backing file, external data file) or need a key (encryption); converting such an image
would read files of the rescue system or fail half-way, so it is refused before any write.
``qemu-img info`` runs under resource limits, since a crafted image can make it burn CPU/memory.
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent import messages as msg
from agent.messages import InstallError
from agent.tools import ToolError, run

QCOW2_MAGIC = b"QFI\xfb"
# qcow2 incompatible feature bits this agent understands: dirty, corrupt, external data file,
# compression type, extended L2 entries. Anything else is refused.
_QCOW2_KNOWN_INCOMPATIBLE = 0b11111
_QCOW2_CORRUPT = 1 << 1
_QCOW2_EXTERNAL_DATA = 1 << 2

_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, QCOW2_MAGIC, "qcow2"),
    (0, b"QFI", "qcow"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"QEVM", "qed"),
    (0, b"\x43\x4f\x57\x44", "cow"),
    (0, b"cloop", "cloop"),
    (0, b"DMG", "dmg"),
)


@dataclass(frozen=True)
class ImageInfo:
    format: str  # qemu-img's name: raw, qcow2, ...
    virtual_size: int
    partition_table: str | None  # "gpt" | "dos" | None
    sector_size: int | None  # logical sector size the GPT was made for (512 | 4096)


def detect_format(head: bytes) -> str:
    """qemu-img's format name for an image from its first bytes (``raw`` when none matches)."""
    for offset, magic, name in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return "raw"


def qcow2_problems(head: bytes) -> list[str]:
    """Why a qcow2 header is unsafe to convert (empty when safe). Pure, from the first 4 KiB."""
    problems: list[str] = []
    if len(head) < 72:
        return ["truncated qcow2 header"]
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    (crypt_method,) = struct.unpack_from(">I", head, 32)
    if version not in (2, 3):
        problems.append(f"unsupported qcow2 version {version}")
    if backing_offset != 0 or backing_size != 0:
        problems.append("it has a backing file")
    if crypt_method != 0:
        problems.append("it is encrypted")
    if version >= 3 and len(head) >= 80:
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        if incompatible & ~_QCOW2_KNOWN_INCOMPATIBLE:
            problems.append(f"unknown incompatible features {incompatible:#x}")
        if incompatible & _QCOW2_EXTERNAL_DATA:
            problems.append("it has an external data file")
        if incompatible & _QCOW2_CORRUPT:
            problems.append("it is marked corrupt")
    return problems


def partition_table(sectors: bytes) -> tuple[str | None, int | None]:
    """(table type, GPT sector size) from the first 8 KiB of a disk image.

    A protective MBR alone is not a GPT: the GPT header must be at LBA 1, which is byte 512 on
    512-byte-sector disks and byte 4096 on 4Kn disks.
    """
    for sector_size in (512, 4096):
        if sectors[sector_size : sector_size + 8] == b"EFI PART":
            return "gpt", sector_size
    if len(sectors) >= 512 and sectors[510:512] == b"\x55\xaa":
        entries = [sectors[446 + 16 * i : 462 + 16 * i] for i in range(4)]
        if any(e[4] != 0 for e in entries) and all(e[0] in (0, 0x80) for e in entries):
            return "dos", None
    return None, None


def _limit_resources() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_CPU, (30, 30))
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def qemu_img_info(path: Path, fmt: str) -> dict:
    """``qemu-img info`` for a format we have already detected (never let it probe raw)."""
    args = ["qemu-img", "info", "--output=json", "-f", fmt, str(path)]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_limit_resources,  # noqa: PLW1509
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ToolError("qemu-img info timed out") from None
    if proc.returncode != 0:
        raise ToolError(f"qemu-img info: {proc.stderr.strip()[-1000:]}")
    return json.loads(proc.stdout)


def _guest_head(path: Path, fmt: str, size: int = 8192) -> bytes:
    """The first bytes of the disk the image describes (through qcow2's mapping when needed)."""
    if fmt == "raw":
        with open(path, "rb") as f:
            return f.read(size)
    out = path.with_name(path.name + ".head")
    try:
        run(
            [
                "qemu-img",
                "dd",
                "-f",
                fmt,
                "-O",
                "raw",
                "bs=512",
                f"count={size // 512}",
                f"if={path}",
                f"of={out}",
            ],
            timeout=60,
        )
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def describe_contents(path: Path) -> str:
    """What a raw image without a partition table seems to hold, for the error message."""
    proc = run(["blkid", "-p", "-o", "export", str(path)], check=False, timeout=30)
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if fields.get("TYPE"):
        label = f" labelled {fields['LABEL']}" if fields.get("LABEL") else ""
        return f"{fields['TYPE']} filesystem{label}"
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.strip(b"\0"):
        return "only zeroes at its start"
    return "unrecognised data"


def inspect_image(path: Path, declared: str) -> ImageInfo:
    """Check the downloaded file against the declared type; return what the writer needs."""
    with open(path, "rb") as f:
        head = f.read(4096)
    detected = detect_format(head)
    if detected != declared:
        raise InstallError(msg.format_mismatch(detected, declared))
    if detected == "qcow2":
        problems = qcow2_problems(head)
        if problems:
            raise InstallError(msg.unsafe_qcow2(", ".join(problems)))
    try:
        info = qemu_img_info(path, detected)
    except (ToolError, json.JSONDecodeError) as exc:
        detail = exc.detail if isinstance(exc, ToolError) else str(exc)
        if detected == "qcow2":
            raise InstallError(msg.unsafe_qcow2("qemu-img cannot open it"), detail) from None
        raise InstallError(msg.format_mismatch("unknown", declared), detail) from None
    spec = (info.get("format-specific") or {}).get("data") or {}
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InstallError(msg.unsafe_qcow2("it has a backing file"))
    if spec.get("data-file") or info.get("encrypted") or spec.get("encrypt"):
        raise InstallError(msg.unsafe_qcow2("it has an external data file or encryption"))
    try:
        guest = _guest_head(path, detected)
    except ToolError as exc:
        raise InstallError(msg.unsafe_qcow2("its content cannot be read"), exc.detail) from None
    table, sector_size = partition_table(guest)
    if declared == "raw" and table is None:
        raise InstallError(msg.raw_without_partition_table(describe_contents(path)))
    return ImageInfo(
        format=detected,
        virtual_size=int(info["virtual-size"]),
        partition_table=table,
        sector_size=sector_size,
    )


def check_fits_disk(info: ImageInfo, device: str, disk_size: int) -> None:
    if info.virtual_size > disk_size:
        raise InstallError(msg.image_larger_than_disk(info.virtual_size, device, disk_size))


def check_sector_size(info: ImageInfo, device: str, disk_sector_size: int) -> None:
    """A GPT made for one logical sector size is unreadable on a disk with another."""
    if info.sector_size is not None and info.sector_size != disk_sector_size:
        raise InstallError(msg.sector_size_mismatch(info.sector_size, device, disk_sector_size))

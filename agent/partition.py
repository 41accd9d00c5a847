"""The partition table after the image is written: GPT backup relocation and the config drive.

An image is usually smaller than the disk, so its backup GPT ends up in the middle of the disk
(or is missing when the image was cut short); ``sgdisk -e`` rebuilds it at the disk's end, and
the usable area then reaches the end, where the config-drive partition goes.

This host's kernel (and many rescue kernels) creates no partition nodes, so the drive is written
into the whole-disk device at the partition's byte offset. Decisions (where the partition goes,
whether one can be reused) are pure functions over a parsed table; the rest is thin tool I/O.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from agent import messages
from agent.blockdev import reread_partition_table
from agent.messages import InstallError
from agent.tools import ToolError, run

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_DRIVE = 64 * MIB
CONFIG_LABELS = ("config-2", "CONFIG-2")
CONFIG_FSTYPES = ("iso9660", "vfat")
GPT_NAME = "config-2"
# Basic data on both tables: every OS treats it as a plain data volume. Windows only gives a
# volume (what cloudbase-init's FAT reader opens) to basic-data / FAT-typed partitions, while
# Linux (blkid by label) and FreeBSD (glabel) ignore the type. 8300 would hide it from Windows.
GPT_TYPE = "0700"
MBR_TYPE = "c"  # W95 FAT32 (LBA), the MBR counterpart of basic data
MBR_LIMIT_SECTORS = 2**32  # MBR start and size are 32-bit sector counts
EXTENDED_TYPES = {"5", "f", "85"}
GPT_SIGNATURE = b"EFI PART"


class DiskLike(Protocol):
    path: str
    size: int
    logical_sector_size: int


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str
    name: str = ""

    @property
    def end(self) -> int:
        return self.start + self.size - 1


@dataclass(frozen=True)
class Table:
    label: Literal["gpt", "dos"]
    sector_size: int
    partitions: tuple[Partition, ...]
    first_lba: int | None = None  # GPT only
    last_lba: int | None = None  # GPT only


# --- reading ------------------------------------------------------------------------------------


def _pttype(path: str | Path) -> str:
    proc = run(["blkid", "-p", "-s", "PTTYPE", "-o", "value", str(path)], check=False, timeout=60)
    return proc.stdout.strip().lower() if proc.returncode == 0 else ""


def table_type(path: str | Path) -> Literal["gpt", "dos"] | None:
    """The partition table libblkid finds at the start of ``path`` (a disk or an image file).

    A protective MBR whose GPT is unreadable counts as GPT, so that the GPT step runs and
    fails loudly instead of the disk being treated as an MBR one.
    """
    value = _pttype(path)
    if value in ("gpt", "pmbr"):
        return "gpt"
    if value == "dos":
        return "dos"
    return None


def parse_sfdisk_json(text: str, disk_path: str) -> Table:
    """``sfdisk --json`` output -> ``Table`` (partition numbers from the node names)."""
    pt = json.loads(text)["partitiontable"]
    parts = []
    for p in pt.get("partitions", []):
        suffix = p["node"][len(disk_path) :] if p["node"].startswith(disk_path) else p["node"]
        digits = suffix.lstrip("p")
        if not digits.isdigit():
            digits = "".join(c for c in reversed(p["node"]) if c.isdigit())[::-1] or "0"
        parts.append(
            Partition(
                number=int(digits),
                start=int(p["start"]),
                size=int(p["size"]),
                type=str(p.get("type", "")).lower(),
                name=str(p.get("name", "")),
            )
        )
    return Table(
        label="gpt" if pt["label"] == "gpt" else "dos",
        sector_size=int(pt.get("sectorsize", 512)),
        partitions=tuple(sorted(parts, key=lambda q: q.number)),
        first_lba=pt.get("firstlba"),
        last_lba=pt.get("lastlba"),
    )


def read_table(path: str) -> Table:
    """The disk's partition table, as sfdisk sees it (GPT or MBR)."""
    proc = run(["sfdisk", "--json", path], timeout=60)
    return parse_sfdisk_json(proc.stdout, path)


def probe_label(path: str, offset: int, size: int) -> tuple[str, str]:
    """(LABEL, TYPE) of the filesystem at byte ``offset`` of ``path``, as cloud-init's blkid
    lookup would see it on the partition device; ("", "") when none."""
    proc = run(
        ["blkid", "-p", "-O", str(offset), "-S", str(size), "-o", "export", path],
        check=False,
        timeout=60,
    )
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return values.get("LABEL", ""), values.get("TYPE", "")


# --- decisions (pure) ---------------------------------------------------------------------------


def plan_new_partition(table: Table, disk_sectors: int, drive_bytes: int) -> tuple[int, int]:
    """(start, size) in sectors of a new partition for a ``drive_bytes`` drive: its start 1 MiB
    aligned, its end the last usable sector; ValueError with the reason when it cannot go there.

    MBR: the partition must end below the 32-bit sector limit (2 TiB on 512-byte sectors), and a
    fifth primary does not exist. A logical partition would need the extended partition to reach
    the disk's end and boot loaders that do not care; refusing is the predictable choice.
    """
    ss = table.sector_size
    align = max(MIB // ss, 1)
    size_mib = max(-(-drive_bytes // MIB), 1)
    if size_mib * MIB > MAX_DRIVE:
        raise ValueError(f"the drive is {drive_bytes} bytes; a config drive is at most 64 MiB")
    size = size_mib * align
    if table.label == "gpt":
        if table.last_lba is None:
            raise ValueError("the GPT has no last usable LBA")
        last = table.last_lba
    else:
        primaries = {p.number for p in table.partitions if p.number <= 4}
        if len(primaries) >= 4:
            raise ValueError(
                "all four primary MBR partitions are in use; no room for a config-drive "
                "partition (use a GPT image or leave a primary slot free)"
            )
        last = min(disk_sectors, MBR_LIMIT_SECTORS) - 1
    start = (last + 1 - size) // align * align
    size = last - start + 1  # the slack below one alignment unit goes to the drive
    if size * ss > MAX_DRIVE:
        raise ValueError(f"the drive is {drive_bytes} bytes; no aligned partition of 64 MiB fits")
    used_end = max((p.end for p in table.partitions), default=0)
    floor = max(used_end + 1, table.first_lba or align)
    if start < floor:
        raise ValueError(
            f"no free {size_mib} MiB at the end of the disk: partitions reach sector {used_end} "
            f"and the usable area ends at sector {last}"
        )
    return start, size


def find_existing(table: Table, labels: dict[int, tuple[str, str]]) -> Partition | None:
    """The partition to reuse: GPT name ``config-2`` or a config-2 labelled ISO/FAT filesystem
    (``labels``: partition number -> (LABEL, TYPE) probed at its offset)."""
    for part in table.partitions:
        if part.type in EXTENDED_TYPES:
            continue
        label, fstype = labels.get(part.number, ("", ""))
        if part.name == GPT_NAME or (label in CONFIG_LABELS and fstype in CONFIG_FSTYPES):
            return part
    return None


# --- device I/O ---------------------------------------------------------------------------------


def _read_at(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _write_drive(path: str, offset: int, drive: Path, length: int) -> None:
    """Write the drive at ``offset`` and zero the rest of the ``length``-byte partition (old
    signatures there would make blkid report an ambiguous filesystem), then fsync."""
    chunk = 4 * MIB
    zeros = bytes(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        done = 0
        with open(drive, "rb") as src:
            while data := src.read(chunk):
                os.pwrite(fd, data, offset + done)
                done += len(data)
        # A huge reused partition: clear the area a filesystem probe looks at (head and tail).
        regions = (
            [(done, length)]
            if length <= 4 * MAX_DRIVE
            else [
                (done, MAX_DRIVE),
                (length - MIB, length),
            ]
        )
        for begin, end in regions:
            pos = begin
            while pos < end:
                n = min(chunk, end - pos)
                os.pwrite(fd, zeros[:n], offset + pos)
                pos += n
        os.fsync(fd)
    finally:
        os.close(fd)


def _drive_is_iso(drive: Path) -> bool:
    with open(drive, "rb") as f:
        f.seek(32768 + 1)
        return f.read(5) == b"CD001"


# --- before writing -----------------------------------------------------------------------------


def relocated(table: Table, disk_sectors: int) -> Table:
    """The image's table as it will read on the disk after ``sgdisk -e`` (pure): a GPT's usable
    area then ends before a standard 16 KiB backup entry array and header at the disk's end."""
    if table.label != "gpt":
        return table
    last = disk_sectors - 2 - 16384 // table.sector_size
    return Table(table.label, table.sector_size, table.partitions, table.first_lba, last)


def _image_copy(image: Path, fmt: str, virtual_size: int, out: Path, length: int) -> Path:
    """A sparse raw file of the image's size holding its first ``length`` bytes: enough for a
    partition tool to read the table of a qcow2 image without converting all of it."""
    count = min(length, virtual_size) // 512
    run(
        ["qemu-img", "dd", "-f", fmt, "-O", "raw", "bs=512", f"count={count}"]
        + [f"if={image}", f"of={out}"],
        timeout=120,
    )
    os.truncate(out, virtual_size)
    return out


def _image_labels(image: Path, fmt: str, table: Table, scratch: Path) -> dict[int, tuple[str, str]]:
    """(LABEL, TYPE) at the start of each partition of the image (its first 64 KiB)."""
    labels = {}
    for part in table.partitions:
        if part.type in EXTENDED_TYPES:
            continue
        offset, length = part.start * table.sector_size, min(part.size * table.sector_size, 65536)
        if fmt == "raw":
            labels[part.number] = probe_label(str(image), offset, length)
            continue
        chunk = scratch / f"part{part.number}.head"
        try:
            # a raw window over the image's format (qemu-img dd's skip/count semantics differ
            # between qemu versions)
            window = f"driver=raw,offset={offset},size={length},file.driver={fmt}"
            run(
                ["qemu-img", "convert", "--image-opts", f"{window},file.file.filename={image}"]
                + ["-O", "raw", str(chunk)],
                timeout=120,
            )
            labels[part.number] = probe_label(str(chunk), 0, length)
        finally:
            chunk.unlink(missing_ok=True)
    return labels


def check_room(
    image: Path, fmt: str, virtual_size: int, disk: DiskLike, drive: Path, scratch: Path
) -> None:
    """Refuse, before anything is written, an image that leaves no place for the config drive.

    The image's partitions are read from the image itself and the config-drive partition is
    planned as ``add_config_drive`` will plan it on the disk (after the GPT move): an image that
    ends (almost) at the disk's end, or an MBR image with four primaries and no config-2
    partition of its own, would otherwise be written, wiping the disk, and only then fail.
    Unreadable tables are left to the steps after the write, which check again.
    """
    copy = scratch / "table.img"
    ss = disk.logical_sector_size
    try:
        source = image if fmt == "raw" else _image_copy(image, fmt, virtual_size, copy, MIB)
        listing = run(["sfdisk", "--json", str(source)], timeout=60).stdout
        table = parse_sfdisk_json(listing, str(source))
        existing = find_existing(table, _image_labels(image, fmt, table, scratch))
    except (ToolError, OSError, KeyError, ValueError) as exc:
        log.info("config-drive room not checked before the write: %s", exc)
        return
    finally:
        copy.unlink(missing_ok=True)
    if table.sector_size != ss or existing is not None:
        return  # sfdisk reads files with 512-byte sectors; the sector-size check is inspect's
    try:
        plan_new_partition(relocated(table, disk.size // ss), disk.size // ss, drive.stat().st_size)
    except ValueError as exc:
        raise InstallError(
            messages.CONFIGDRIVE_FAILED, f"{disk.path}: nothing written: {exc}"
        ) from None


# --- public steps -------------------------------------------------------------------------------


def relocate_backup_gpt(disk: DiskLike) -> None:
    """Move the backup GPT header and table to the last sectors of the disk (no-op on MBR).

    Works when the backup sits at the image's end in the middle of the disk and when it is
    missing entirely (sgdisk rebuilds it from the primary). Checked twice: ``sgdisk -v`` must
    report no problem, and the last LBA must hold a GPT header.
    """
    pttype = _pttype(disk.path)
    if pttype == "pmbr":
        # sgdisk -e would "repair" this by writing an empty GPT: every partition lost.
        raise InstallError(
            messages.GPT_MOVE_FAILED, f"{disk.path}: protective MBR but no valid GPT header"
        )
    if pttype != "gpt":
        return
    try:
        before = _layout(read_table(disk.path))
        run(["sgdisk", "-e", disk.path], timeout=120)
        verify = run(["sgdisk", "-v", disk.path], timeout=120)
        after = _layout(read_table(disk.path))
    except ToolError as exc:
        raise InstallError(messages.GPT_MOVE_FAILED, exc.detail) from exc
    if "No problems found" not in verify.stdout:
        raise InstallError(
            messages.GPT_MOVE_FAILED,
            f"sgdisk -v: {verify.stdout.strip()} {verify.stderr.strip()}"[-2000:],
        )
    if before != after:
        raise InstallError(messages.GPT_MOVE_FAILED, f"partitions changed: {before} became {after}")
    ss = disk.logical_sector_size
    last = disk.size // ss - 1
    header = _read_at(disk.path, last * ss, 8)
    if header != GPT_SIGNATURE:
        raise InstallError(
            messages.GPT_MOVE_FAILED, f"no GPT header at the last LBA {last} after sgdisk -e"
        )
    reread_partition_table(disk.path)
    log.info("backup GPT moved to LBA %d of %s", last, disk.path)


def _layout(table: Table) -> list[tuple[int, int, int, str]]:
    return [(p.number, p.start, p.size, p.type) for p in table.partitions]


def add_config_drive(disk: DiskLike, drive: Path) -> int:
    """Put the config drive in a partition at the end of the disk; return its number.

    An existing config-2 partition (the image's own, or one from an earlier run) is reused, so
    there is never more than one. Every failure is CONFIGDRIVE_FAILED with the reason.
    """
    try:
        return _add_config_drive(disk, drive)
    except ToolError as exc:
        raise InstallError(messages.CONFIGDRIVE_FAILED, exc.detail) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise InstallError(messages.CONFIGDRIVE_FAILED, f"{disk.path}: {exc!r}") from exc


def _add_config_drive(disk: DiskLike, drive: Path) -> int:
    def fail(reason: str) -> InstallError:
        return InstallError(messages.CONFIGDRIVE_FAILED, f"{disk.path}: {reason}")

    ss = disk.logical_sector_size
    drive_bytes = drive.stat().st_size
    if drive_bytes == 0 or drive_bytes > MAX_DRIVE:
        raise fail(f"config drive image is {drive_bytes} bytes")
    if ss != 512 and _drive_is_iso(drive):
        raise fail(f"an ISO 9660 drive is unreadable on {ss}-byte sectors; build a FAT one")
    kind = table_type(disk.path)
    if kind is None:
        raise fail("no partition table on the disk")
    table = read_table(disk.path)
    if table.sector_size != ss:
        raise fail(f"sfdisk sees {table.sector_size}-byte sectors, the disk has {ss}")
    disk_sectors = disk.size // ss
    if table.label == "gpt" and (table.last_lba or 0) < disk_sectors - 1 - (16384 // ss + 1):
        try:  # the usable area must reach the disk's end first
            relocate_backup_gpt(disk)
        except InstallError as exc:
            raise fail(f"backup GPT not at the end of the disk: {exc.detail}") from exc
        table = read_table(disk.path)

    labels = {
        p.number: probe_label(disk.path, p.start * ss, p.size * ss)
        for p in table.partitions
        if p.type not in EXTENDED_TYPES
    }
    existing = find_existing(table, labels)
    if existing is not None:
        if existing.size * ss < drive_bytes:
            raise fail(
                f"existing config-2 partition {existing.number} holds {existing.size * ss} "
                f"bytes, the drive needs {drive_bytes}"
            )
        number, start, size = existing.number, existing.start, existing.size
        log.info("reusing config-2 partition %d of %s", number, disk.path)
    else:
        try:
            start, size = plan_new_partition(table, disk_sectors, drive_bytes)
        except ValueError as exc:
            raise fail(str(exc)) from None
        number = _create_partition(disk.path, table, start, size)
        log.info("created config-2 partition %d of %s at sector %d", number, disk.path, start)

    _write_drive(disk.path, start * ss, drive, size * ss)
    label, fstype = probe_label(disk.path, start * ss, size * ss)
    if label not in CONFIG_LABELS or fstype not in CONFIG_FSTYPES:
        raise fail(f"after writing, partition {number} probes as LABEL={label!r} TYPE={fstype!r}")
    reread_partition_table(disk.path)
    return number


def _create_partition(path: str, table: Table, start: int, size: int) -> int:
    end = start + size - 1
    if table.label == "gpt":
        align = max(MIB // table.sector_size, 1)
        run(
            [
                "sgdisk",
                "-a",
                str(align),
                "-n",
                f"0:{start}:{end}",
                "-t",
                f"0:{GPT_TYPE}",
                "-c",
                f"0:{GPT_NAME}",
                path,
            ],
            timeout=120,
        )
    else:
        run(
            ["sfdisk", "--append", "--no-reread", "--no-tell-kernel", "--wipe", "never", path],
            input_bytes=f"start={start}, size={size}, type={MBR_TYPE}\n".encode(),
            timeout=120,
        )
    created = [p for p in read_table(path).partitions if p.start == start]
    if len(created) != 1:
        raise InstallError(
            messages.CONFIGDRIVE_FAILED, f"{path}: the new partition at sector {start} is missing"
        )
    return created[0].number

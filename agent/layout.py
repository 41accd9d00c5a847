"""The disk's final layout, planned before anything is written.

From the image's first MiB, its partition table and the config drive, ``plan`` decides every
byte range the write phase touches:

- the **head** (the first MiB: MBR, primary GPT, boot code) with the final tables, written last,
  so that until the install's last write the disk holds no table, no boot code and no signature
  that firmware or blkid accepts: an install killed at any moment (SIGKILL, OOM, power loss)
  leaves a disk that boots nothing and that the next install takes cleanly;
- the **body** (the rest of the image) copied by qemu-img through offset windows;
- the **tail** (the GPT backup, moved to the disk's last sectors);
- the **config drive**'s partition (a new one at the end of the usable area, or the image's own
  config-2 partition reused);
- what to zero first: the head, and the stale metadata of the old disk (its tables, old
  partitions' superblocks, a mid-disk backup GPT) outside the body, which the copy overwrites.

Everything that can refuse the image (no table, a corrupt GPT, no room or no free slot for the
config drive) is found here, before the first write: the planning fails closed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent import gpt, ptable
from agent.ptable import EXTENDED_TYPES, Partition, Table
from agent.regions import Region, merge, subtract
from agent.tools import UNTRUSTED, ToolError, opt_value, run
from agent.units import CONFIG_DRIVE_MAX, HEAD_SIZE, MiB

log = logging.getLogger(__name__)

CONFIG_LABELS = ("config-2", "CONFIG-2")
CONFIG_FSTYPES = ("iso9660", "vfat")
MBR_LIMIT_SECTORS = 2**32  # MBR start and size are 32-bit sector counts
PROBED_PARTITION_MAX = 1024 * MiB  # larger partitions are not config drives: not probed


class DiskLike(Protocol):
    path: str
    size: int
    logical_sector_size: int


class PlanError(ValueError):
    """The image cannot be laid out on the disk; ``kind`` is "table" or "configdrive"."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class DiskPlan:
    sector_size: int
    disk_size: int
    label: str  # "gpt" | "dos"
    tables: gpt.Tables  # head (written last), tail (GPT backup)
    body: Region  # image bytes copied at the same disk offset
    zero_first: tuple[Region, ...]  # zeroed before the body is copied
    drive_offset: int
    drive_length: int  # the partition's bytes (the drive is at most this long)
    partition_number: int
    reused: bool  # the image's own config-2 partition
    expected: tuple[tuple[int, int, int], ...]  # (number, start, size) the disk must show

    @property
    def head_length(self) -> int:
        return len(self.tables.head)


# --- decisions (pure) ---------------------------------------------------------------------------


def plan_new_partition(table: Table, disk_sectors: int, drive_bytes: int) -> tuple[int, int]:
    """(start, size) in sectors of a new partition for a ``drive_bytes`` drive: its start 1 MiB
    aligned, its end the last usable sector; ValueError with the reason when it cannot go there.

    MBR: the partition must end below the 32-bit sector limit (2 TiB on 512-byte sectors), and a
    fifth primary does not exist. A logical partition would need the extended partition to reach
    the disk's end and boot loaders that do not care; refusing is the predictable choice.
    """
    ss = table.sector_size
    align = max(MiB // ss, 1)
    size_mib = max(-(-drive_bytes // MiB), 1)
    if size_mib * MiB > CONFIG_DRIVE_MAX:
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
    if size * ss > CONFIG_DRIVE_MAX:
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
        if part.name == "config-2" or (label in CONFIG_LABELS and fstype in CONFIG_FSTYPES):
            return part
    return None


def relocated(table: Table, disk_sectors: int) -> Table:
    """The image's table as it will read on the disk: a GPT's usable area then ends before a
    standard 16 KiB backup entry array and header at the disk's end."""
    if table.label != "gpt":
        return table
    last = disk_sectors - 2 - 16384 // table.sector_size
    return Table(table.label, table.sector_size, table.partitions, table.first_lba, last)


@dataclass(frozen=True)
class ImageTable:
    """What the image's head says: its table, and the raw parse the tables are built from."""

    table: Table
    gpt: gpt.ImageGpt | None
    mbr: list[gpt.MbrEntry] | None

    @property
    def backup_start(self) -> int | None:
        """Byte offset where the image's own GPT backup area begins (after its usable area)."""
        if self.gpt is None:
            return None
        return (self.gpt.header.last_usable + 1) * self.gpt.sector_size


def image_table(head: bytes, sector_size: int) -> ImageTable:
    """The image's partition table from its first bytes; PlanError("table") when unusable."""
    try:
        if head[sector_size : sector_size + 8] == b"EFI PART":
            found = gpt.read_gpt(head, sector_size)
            return ImageTable(ptable.from_gpt(found), found, None)
        entries = gpt.read_mbr(head)
    except gpt.TableError as exc:
        raise PlanError("table", str(exc)) from None
    if any(e.type == gpt.PROTECTIVE for e in entries):
        raise PlanError("table", "protective MBR but no valid GPT header")
    return ImageTable(ptable.from_mbr(entries, sector_size), None, entries)


def layout(
    image: ImageTable,
    head: bytes,
    virtual_size: int,
    disk_size: int,
    stale: Sequence[Region],
    drive_bytes: int,
    labels: dict[int, tuple[str, str]],
) -> DiskPlan:
    """The whole plan (pure): see the module docstring. ``stale``: old metadata to clear."""
    ss = image.table.sector_size
    sectors = disk_size // ss
    table = relocated(image.table, sectors)
    existing = find_existing(table, labels)
    new = None
    if existing is not None:
        if existing.size * ss < drive_bytes:
            raise PlanError(
                "configdrive",
                f"the image's config-2 partition {existing.number} holds {existing.size * ss} "
                f"bytes, the drive needs {drive_bytes}",
            )
        start, size, reused = existing.start, existing.size, True
    else:
        try:
            start, size = plan_new_partition(table, sectors, drive_bytes)
        except ValueError as exc:
            raise PlanError("configdrive", str(exc)) from None
        new, reused = gpt.NewPartition(start, size), False
    try:
        if image.gpt is not None:
            tables = gpt.relocated_gpt(head, image.gpt, sectors, new)
        else:
            tables = gpt.mbr_with(head, image.mbr or [], new)
    except gpt.TableError as exc:
        raise PlanError("table", str(exc)) from None
    number = existing.number if existing is not None else tables.number
    assert number is not None
    ends = [virtual_size, disk_size]
    ends += [x for x in (image.backup_start, tables.tail_offset or None) if x]
    if not reused:
        ends.append(start * ss)
    body = (len(head), max(0, min(ends) - len(head)))
    clear = [(0, len(head)), *stale, (body[0] + body[1], virtual_size - body[0] - body[1])]
    expected = [(p.number, p.start, p.size) for p in table.partitions if p.number <= 4 or image.gpt]
    if new is not None:
        expected.append((number, start, size))
    return DiskPlan(
        sector_size=ss,
        disk_size=disk_size,
        label=table.label,
        tables=tables,
        body=body,
        zero_first=tuple(subtract(merge(clear, disk_size, ss), body)),
        drive_offset=start * ss,
        drive_length=size * ss,
        partition_number=number,
        reused=reused,
        expected=tuple(sorted(expected)),
    )


# --- reading the image --------------------------------------------------------------------------


def image_bytes(image: Path, fmt: str, offset: int, length: int, scratch: Path) -> bytes:
    """``length`` bytes of the disk the image describes, from ``offset`` (through its format)."""
    if fmt == "raw":
        with open(image, "rb") as f:
            f.seek(offset)
            return f.read(length).ljust(length, b"\0")
    fd, name = tempfile.mkstemp(prefix="window-", suffix=".raw", dir=scratch)
    os.close(fd)
    out = Path(name)  # a name of its own: windows may be read side by side
    window = f"driver=raw,offset={offset},size={length},file.driver={fmt}"
    source = f"{window},file.file.driver=file,file.file.filename={opt_value(image)}"
    try:
        run(
            ["qemu-img", "convert", "--image-opts", source, "-O", "raw", str(out)],
            timeout=120,
            limits=UNTRUSTED,
        )
        return out.read_bytes().ljust(length, b"\0")
    finally:
        out.unlink(missing_ok=True)


def head_length(head: bytes, virtual_size: int, sector_size: int) -> int:
    """How much of the image the head is, judged from its first MiB (pure): that MiB, or more
    when its GPT's entry array reaches further (whole MiBs, within the virtual disk)."""
    length = min(HEAD_SIZE, virtual_size)
    if head[sector_size : sector_size + 8] == b"EFI PART":
        try:
            header = gpt.parse_header(head[sector_size : 2 * sector_size])
        except gpt.TableError:
            return length  # image_table says why
        end = header.entries_lba * sector_size + header.entries_bytes()
        if end > length:
            return min(-(-end // MiB) * MiB, virtual_size)
    return length


def read_head(
    image: Path, fmt: str, virtual_size: int, sector_size: int, scratch: Path, known: bytes = b""
) -> bytes:
    """The image's head (``head_length``). ``known``: a head already read from the image, used
    when it covers what is needed (the inspection read it with the disk's sector size)."""
    first = min(HEAD_SIZE, virtual_size)
    head = known if len(known) >= first else image_bytes(image, fmt, 0, first, scratch)
    length = head_length(head, virtual_size, sector_size)
    if len(head) < length:
        head = image_bytes(image, fmt, 0, length, scratch)
    return head[:length]


def probe_labels(image: Path, fmt: str, table: Table, scratch: Path) -> dict[int, tuple[str, str]]:
    """(LABEL, TYPE) at the start of each small partition of the image (its first 64 KiB)."""
    labels = {}
    ss = table.sector_size
    for part in table.partitions:
        if part.type in EXTENDED_TYPES or part.size * ss > PROBED_PARTITION_MAX:
            continue
        length = min(part.size * ss, 65536)
        chunk = scratch / f"part{part.number}.head"
        chunk.write_bytes(image_bytes(image, fmt, part.start * ss, length, scratch))
        try:
            labels[part.number] = ptable.probe_label(chunk, 0, length)
        finally:
            chunk.unlink(missing_ok=True)
    return labels


def _is_iso(drive: Path) -> bool:
    with open(drive, "rb") as f:
        f.seek(32768 + 1)
        return f.read(5) == b"CD001"


def plan(
    image: Path,
    fmt: str,
    virtual_size: int,
    disk: DiskLike,
    drive: Path,
    stale: Sequence[Region],
    scratch: Path,
    known_head: bytes = b"",
) -> DiskPlan:
    """Read what the plan needs from the image and lay it out on ``disk`` (nothing written).
    ``known_head``: the head the inspection read, if any (``read_head``)."""
    ss = disk.logical_sector_size
    if ss != 512 and _is_iso(drive):
        raise PlanError("configdrive", f"an ISO 9660 drive is unreadable on {ss}-byte sectors")
    try:
        head = read_head(image, fmt, virtual_size, ss, scratch, known_head)
    except (ToolError, OSError) as exc:
        raise PlanError("table", f"the image's head cannot be read: {exc}") from None
    found = image_table(head, ss)
    try:
        labels = probe_labels(image, fmt, found.table, scratch)
    except (ToolError, OSError) as exc:
        raise PlanError("table", f"the image's partitions cannot be read: {exc}") from None
    result = layout(found, head, virtual_size, disk.size, stale, drive.stat().st_size, labels)
    log.info(
        "plan for %s: %s, body %d+%d, config drive partition %d at byte %d%s",
        disk.path,
        result.label,
        *result.body,
        result.partition_number,
        result.drive_offset,
        " (the image's own)" if result.reused else "",
    )
    return result

"""Partition tables as bytes: read an image's GPT or MBR, and build the disk's final ones.

The disk's tables are built here, off the disk, from the image's first MiB: the GPT's backup
moved to the disk's last sectors (what ``sgdisk -e`` does) and the config-drive partition added
(what ``sgdisk -n`` / ``sfdisk --append`` do). Doing it in pure code on bytes means no partition
tool touches the disk before the very end (gdisk sleeps a second after each write to a block
device, and the util-linux here has no ``--sector-size`` for image files), works the same for
512- and 4096-byte sectors, and lets the writer put the head on the disk last, in one write.
The result is checked on the disk afterwards by ``sgdisk -v`` and ``sfdisk --json``.

Layouts follow the UEFI specification (GPT header and entries, protective MBR) and the classic
MBR (four 16-byte entries at byte 446, signature 0x55AA at 510).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, replace

from agent.units import GPT_SIGNATURE

HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 bytes of a GPT header
ENTRY = struct.Struct("<16s16sQQQ72s")  # one 128-byte partition entry
MBR_ENTRY = struct.Struct("<B3sB3sII")
MBR_TABLE = 446
PROTECTIVE = 0xEE
BASIC_DATA = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")


class TableError(ValueError):
    """The image's partition table is unusable (the message says why)."""


@dataclass(frozen=True)
class GptHeader:
    revision: int
    header_size: int
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entries_lba: int
    entries_count: int
    entry_size: int
    entries_crc: int

    def entries_bytes(self) -> int:
        return self.entries_count * self.entry_size

    def pack(self, entries_crc: int | None = None) -> bytes:
        """The header's bytes with its CRC computed (``header_size`` bytes)."""
        crc = self.entries_crc if entries_crc is None else entries_crc
        fields = [
            GPT_SIGNATURE,
            self.revision,
            self.header_size,
            0,
            0,
            self.my_lba,
            self.alternate_lba,
            self.first_usable,
            self.last_usable,
            self.disk_guid,
            self.entries_lba,
            self.entries_count,
            self.entry_size,
            crc,
        ]
        raw = HEADER.pack(*fields).ljust(self.header_size, b"\0")
        fields[3] = zlib.crc32(raw)
        return HEADER.pack(*fields).ljust(self.header_size, b"\0")


@dataclass(frozen=True)
class Entry:
    slot: int  # 0-based; the partition number is slot + 1
    type_guid: uuid.UUID
    first: int
    last: int
    name: str


def parse_header(sector: bytes) -> GptHeader:
    """A GPT header from its sector; TableError unless the signature and CRC are right."""
    if len(sector) < HEADER.size or sector[:8] != GPT_SIGNATURE:
        raise TableError("no GPT header")
    fields = HEADER.unpack_from(sector)
    header_size = fields[2]
    if not HEADER.size <= header_size <= len(sector):
        raise TableError(f"GPT header size {header_size} is invalid")
    blank = bytearray(sector[:header_size])
    blank[16:20] = bytes(4)
    if zlib.crc32(blank) != fields[3]:
        raise TableError("the GPT header's CRC is wrong")
    header = GptHeader(fields[1], header_size, *fields[5:])
    if header.entry_size < ENTRY.size or header.entry_size % 8 or header.entries_count > 16384:
        raise TableError("the GPT's partition entry array is invalid")
    return header


def parse_entries(data: bytes, header: GptHeader) -> list[Entry]:
    """The used entries of a GPT entry array (CRC checked)."""
    if zlib.crc32(data[: header.entries_bytes()]) != header.entries_crc:
        raise TableError("the GPT's partition entry array CRC is wrong")
    entries = []
    for slot in range(header.entries_count):
        raw = data[slot * header.entry_size : slot * header.entry_size + ENTRY.size]
        type_guid, _unique, first, last, _attrs, name = ENTRY.unpack(raw)
        if type_guid == bytes(16):
            continue
        label = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        entries.append(Entry(slot, uuid.UUID(bytes_le=type_guid), first, last, label))
    return entries


@dataclass(frozen=True)
class ImageGpt:
    """An image's primary GPT: where it lies in the head and what it holds."""

    sector_size: int
    header: GptHeader
    entries: list[Entry]

    @property
    def head_end(self) -> int:
        """Bytes from the disk's start through the end of the primary entry array."""
        return self.header.entries_lba * self.sector_size + self.header.entries_bytes()


def read_gpt(head: bytes, sector_size: int) -> ImageGpt:
    """The primary GPT in an image's first bytes (``head`` must reach its entry array)."""
    header = parse_header(head[sector_size : 2 * sector_size])
    if header.my_lba != 1:
        raise TableError(f"the primary GPT header says it lives at LBA {header.my_lba}")
    start = header.entries_lba * sector_size
    data = head[start : start + header.entries_bytes()]
    if header.entries_lba < 2 or len(data) < header.entries_bytes():
        raise TableError("the GPT's partition entries are not in the image's first MiB")
    return ImageGpt(sector_size, header, parse_entries(data, header))


@dataclass(frozen=True)
class MbrEntry:
    slot: int  # 0..3; the partition number is slot + 1
    type: int
    start: int  # sectors
    size: int


def read_mbr(head: bytes) -> list[MbrEntry]:
    """The used primary entries of a classic MBR (TableError when there is none)."""
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        raise TableError("no MBR signature")
    entries = []
    for slot in range(4):
        status, _chs, kind, _chs2, start, size = MBR_ENTRY.unpack_from(head, MBR_TABLE + 16 * slot)
        if status not in (0, 0x80):
            raise TableError(f"MBR entry {slot + 1} has an invalid status byte {status:#x}")
        if kind and size:
            entries.append(MbrEntry(slot, kind, start, size))
    if not entries:
        raise TableError("the MBR has no partition")
    return entries


# --- building the disk's tables -----------------------------------------------------------------


@dataclass(frozen=True)
class NewPartition:
    start: int  # sectors
    size: int
    name: str = "config-2"
    type_guid: uuid.UUID = BASIC_DATA
    mbr_type: int = 0x0C  # W95 FAT32 (LBA): the MBR counterpart of basic data


@dataclass(frozen=True)
class Tables:
    """The disk's final head (written last) and the GPT backup at the disk's end."""

    head: bytes
    tail_offset: int  # bytes; 0 with an empty tail (MBR)
    tail: bytes
    number: int | None  # the new partition's number, if one was added


def free_slot(used: list[int], count: int) -> int:
    for slot in range(count):
        if slot not in used:
            return slot
    raise TableError("no free partition entry")


def _entry_bytes(new: NewPartition, entry_size: int) -> bytes:
    name = new.name.encode("utf-16-le")[:72]
    raw = ENTRY.pack(
        new.type_guid.bytes_le, uuid.uuid4().bytes_le, new.start, new.start + new.size - 1, 0, name
    )
    return raw.ljust(entry_size, b"\0")


def _protective(head: bytearray, disk_sectors: int) -> None:
    """Make a protective MBR cover the disk (its size was the image's). A hybrid MBR (other
    entries beside the protective one) is left as it is, as gdisk leaves it."""
    slots = [MBR_ENTRY.unpack_from(head, MBR_TABLE + 16 * i) for i in range(4)]
    used = [(i, e) for i, e in enumerate(slots) if e[2] and e[5]]
    if len(used) != 1 or used[0][1][2] != PROTECTIVE:
        return
    slot, (status, chs, kind, chs2, start, _size) = used[0]
    size = min(disk_sectors - start, 0xFFFFFFFF)
    MBR_ENTRY.pack_into(head, MBR_TABLE + 16 * slot, status, chs, kind, chs2, start, size)


def relocated_gpt(
    head: bytes, gpt: ImageGpt, disk_sectors: int, new: NewPartition | None
) -> Tables:
    """The head and tail of a disk of ``disk_sectors`` holding the image: the backup entry array
    and header in the last sectors, the usable area up to them, and ``new`` added in the first
    free entry. Pure: ``head`` is the image's first bytes, returned modified."""
    ss, old = gpt.sector_size, gpt.header
    array = old.entries_bytes()
    array_sectors = -(-array // ss)
    last = disk_sectors - 1
    backup_entries = last - array_sectors
    primary = replace(old, alternate_lba=last, last_usable=backup_entries - 1)
    for entry in gpt.entries:
        if entry.last > primary.last_usable or entry.first < old.first_usable:
            raise TableError(f"partition {entry.slot + 1} lies outside the disk's usable area")
    start = old.entries_lba * ss
    entries = bytearray(head[start : start + array])
    number = None
    if new is not None:
        slot = free_slot([e.slot for e in gpt.entries], old.entries_count)
        size = old.entry_size
        entries[slot * size : (slot + 1) * size] = _entry_bytes(new, size)
        number = slot + 1
    crc = zlib.crc32(entries)
    out = bytearray(head)
    _protective(out, disk_sectors)
    out[ss : ss + old.header_size] = primary.pack(crc)
    out[start : start + array] = entries
    backup = replace(primary, my_lba=last, alternate_lba=1, entries_lba=backup_entries)
    tail = bytes(entries).ljust(array_sectors * ss, b"\0") + backup.pack(crc).ljust(ss, b"\0")
    return Tables(bytes(out), backup_entries * ss, tail, number)


def mbr_with(head: bytes, entries: list[MbrEntry], new: NewPartition | None) -> Tables:
    """The MBR head with ``new`` in the first free primary slot (CHS fields: LBA-only)."""
    out = bytearray(head)
    number = None
    if new is not None:
        slot = free_slot([e.slot for e in entries], 4)
        lba_only = b"\xfe\xff\xff"
        MBR_ENTRY.pack_into(
            out, MBR_TABLE + 16 * slot, 0, lba_only, new.mbr_type, lba_only, new.start, new.size
        )
        number = slot + 1
    return Tables(bytes(out), 0, b"", number)

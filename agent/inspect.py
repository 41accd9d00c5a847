"""Image inspection: is the file what the customer declared, whole, and safe to convert?

Everything here runs before the disk is touched, so a refused image leaves the disk exactly as
it was. In order:

1. the format, from the content (``agent.formats``: oslo.utils' inspectors); the declared
   ``imageType`` is never trusted, and a polyglot that matches two formats is refused;
2. qcow2 safety: no backing file, external data file, encryption or unknown feature (oslo's
   checks, then ``qemu-img info`` for the format already detected: qemu never probes);
3. qcow2 integrity: ``qemu-img check`` finds no corruption, and every data cluster that
   ``qemu-img map`` reports lies inside the file (a truncated download is caught here, where
   the read-back after the write could not: it compares with the same truncated file);
4. the virtual disk starts with a partition table, read as the disk layout reads it
   (``layout.image_table``): a GPT or an MBR with partitions. A protective MBR (type 0xEE)
   without its GPT is not one. (A GPT with bad checksums is one, but broken: the layout
   refuses it, before any write, as a GPT that cannot be moved.)

Every tool that reads the untrusted image runs through ``tools.run(..., limits=UNTRUSTED)``.
"""

from __future__ import annotations

import json
import logging
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent import formats, gpt, layout
from agent import messages as msg
from agent.messages import InstallError
from agent.tools import UNTRUSTED, ToolError, run
from agent.units import GPT_SIGNATURE

log = logging.getLogger(__name__)
_TIMEOUT = 300  # s; the CPU limit (UNTRUSTED) ends a runaway tool sooner


@dataclass(frozen=True)
class ImageInfo:
    format: str  # qemu-img's name: raw or qcow2 (what the writer passes as -f)
    virtual_size: int
    partition_table: str | None  # "gpt" | "dos"
    sector_size: int | None  # logical sector size the GPT was made for (512 | 4096)
    # (offset, length) ranges of the virtual disk that hold data, merged (``data_extents``)
    data_extents: tuple[tuple[int, int], ...] = ()
    # the virtual disk's head as read here (``read_head``), so the layout need not read it again
    head: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Table:
    """What the first sectors of a disk hold: ``kind`` "gpt" | "dos" | None; ``problem``
    says why something that looks like a table is not a usable one (for the message)."""

    kind: str | None
    sector_size: int | None = None
    problem: str = ""


# --- pure decisions ------------------------------------------------------------------------


def _fat_boot_sector(head: bytes) -> bool:
    """A FAT filesystem's boot sector also ends in 55 AA: oslo's GPT inspector's test (two
    FATs on a fixed disk), with the FAT type string, so that boot code is never taken for it."""
    fat_type = head[0x36:0x39] == b"FAT" or head[0x52:0x57] == b"FAT32"
    return len(head) >= 512 and head[0x10] == 2 and head[0x15] == 0xF8 and fat_type


def gpt_sector_size(head: bytes) -> int:
    """The logical sector size a GPT in ``head`` was made for (512 when there is none)."""
    at_4k = head[4096 : 4096 + 8] == GPT_SIGNATURE
    return 4096 if at_4k and head[512 : 512 + 8] != GPT_SIGNATURE else 512


def partition_table(head: bytes) -> Table:
    """The partition table at the start of a virtual disk, as the disk layout will read it
    (``layout.image_table``, so that what inspect accepts is what the writer can lay out).

    Pure. A disk with no table at all (a bare filesystem, zeroes, a protective MBR alone) has
    kind None, and is described by ``problem`` or by its content. A GPT that is there but
    broken (bad checksums) is kind "gpt" with its ``problem``: the layout refuses it before
    anything is written, with the SPEC's message for a GPT that cannot be moved.
    """
    ss = gpt_sector_size(head)
    has_gpt = head[ss : ss + 8] == GPT_SIGNATURE
    if not has_gpt and _fat_boot_sector(head):
        return Table(None)
    try:
        found = layout.image_table(head, ss)
    except layout.PlanError as exc:
        if has_gpt:
            return Table("gpt", ss, str(exc))
        entries = [head[446 + 16 * i : 462 + 16 * i] for i in range(4)]
        if head[510:512] == b"\x55\xaa" and any(e[4] == gpt.PROTECTIVE for e in entries):
            return Table(None, None, "a protective MBR (type 0xEE) without a GPT header")
        return Table(None)
    return Table(found.table.label, ss if found.gpt else None)


def mapping_problem(entries: list[dict], file_size: int) -> str:
    """Why ``qemu-img map`` shows an image whose data is not all in the file ("" if none)."""
    for e in entries:
        if e.get("data") and "offset" in e and e["offset"] + e["length"] > file_size:
            return (
                f"data at virtual offset {e['start']} is mapped to file offset {e['offset']}, "
                f"beyond the end of the {file_size}-byte file (truncated?)"
            )
    return ""


def merge_extents(entries: list[dict]) -> list[tuple[int, int]]:
    """(offset, length) of the virtual disk's ranges holding data, adjacent ranges merged."""
    out: list[tuple[int, int]] = []
    for e in entries:
        if not e.get("data") or e.get("zero"):
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


def printable(text: str, limit: int = 64) -> str:
    """Text from an untrusted image made safe for a result message."""
    keep = "".join(c if c in string.printable and c not in "\r\n\t\x0b\x0c" else "?" for c in text)
    return keep[:limit]


def describe_probe(fields: dict[str, str], head: bytes) -> str:
    """What a disk without partition table seems to hold, from ``blkid -p -o export``."""
    if fields.get("TYPE"):
        kind = printable(fields["TYPE"], 32)
        what = f"{kind} filesystem" if fields.get("USAGE", "filesystem") == "filesystem" else kind
        label = fields.get("LABEL", "").replace("\\ ", " ")
        return f"{what} labelled {printable(label)}" if label else what
    if not head.strip(b"\0"):
        return "only zeroes at its start"
    return "unrecognised data"


# --- the tools -----------------------------------------------------------------------------


def _qemu_img(*args: str, check: bool = True) -> str:
    return run(["qemu-img", *args], timeout=_TIMEOUT, limits=UNTRUSTED, check=check).stdout


def qemu_img_info(path: Path, fmt: str) -> dict:
    """``qemu-img info`` for a format we have already detected (never let it probe)."""
    return json.loads(_qemu_img("info", "--output=json", "-f", fmt, str(path)))


def qemu_img_check(path: Path, fmt: str) -> dict:
    """``qemu-img check``'s findings (exit 2 for corruptions and 3 for leaks still report)."""
    out = _qemu_img("check", "--output=json", "-f", fmt, str(path), check=False)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise ToolError(f"qemu-img check gave no report: {out[-500:]!r}") from None


def image_map(path: Path, fmt: str) -> list[dict]:
    """``qemu-img map``: how the virtual disk's ranges are stored."""
    return json.loads(_qemu_img("map", "--output=json", "-f", fmt, str(path)))


def data_extents(path: Path, fmt: str) -> list[tuple[int, int]]:
    """(offset, length) of the guest ranges holding data, e.g. to sample a read-back."""
    return merge_extents(image_map(path, fmt))


def describe_contents(head: bytes, scratch: Path) -> str:
    """What a virtual disk without partition table seems to hold, for the error message."""
    probe = scratch.with_name(scratch.name + ".probe")
    try:
        probe.write_bytes(head)
        proc = run(
            ["blkid", "-p", "-o", "export", str(probe)], check=False, timeout=60, limits=UNTRUSTED
        )
    finally:
        probe.unlink(missing_ok=True)
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return describe_probe(fields, head)


# --- the inspection --------------------------------------------------------------------------


def _check_format(path: Path, declared: str) -> formats.Detection:
    found = formats.detect(path)
    if found.polyglot:
        raise InstallError(msg.ambiguous_format(found.described))
    if found.as_declared(declared) != declared:
        raise InstallError(msg.format_mismatch(found.name, declared))
    if found.problems:
        raise InstallError(msg.unsafe_qcow2(", ".join(found.problems)))
    return found


def _info(path: Path, fmt: str) -> dict:
    try:
        info = qemu_img_info(path, fmt)
    except (ToolError, json.JSONDecodeError) as exc:
        raise InstallError(msg.damaged_image(fmt, "qemu-img cannot open it"), str(exc)) from None
    spec = (info.get("format-specific") or {}).get("data") or {}
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InstallError(msg.unsafe_qcow2("it has a backing file"))
    if spec.get("data-file"):
        raise InstallError(msg.unsafe_qcow2("it has an external data file"))
    if info.get("encrypted") or spec.get("encrypt"):
        raise InstallError(msg.unsafe_qcow2("it is encrypted"))
    if spec.get("corrupt"):
        raise InstallError(msg.damaged_image(fmt, "it is marked corrupt"))
    return info


def _check(path: Path, fmt: str) -> None:
    """qcow2: ``qemu-img check`` finds no corruption."""
    if fmt != "qcow2":
        return
    try:
        report = qemu_img_check(path, fmt)
    except (ToolError, json.JSONDecodeError) as exc:
        reason = "its cluster tables cannot be read"
        raise InstallError(msg.damaged_image(fmt, reason), str(exc)) from None
    bad, errors = report.get("corruptions", 0), report.get("check-errors", 0)
    if bad or errors:
        found = [f"{bad} corruptions"] * bool(bad) + [f"{errors} errors"] * bool(errors)
        raise InstallError(msg.damaged_image(fmt, f"qemu-img check found {' and '.join(found)}"))


def _mapped(path: Path, fmt: str) -> list[dict]:
    """The image's map, every data cluster inside the file."""
    try:
        entries = image_map(path, fmt)
    except (ToolError, json.JSONDecodeError) as exc:
        reason = "its cluster tables cannot be read"
        raise InstallError(msg.damaged_image(fmt, reason), str(exc)) from None
    problem = mapping_problem(entries, path.stat().st_size)
    if problem:
        raise InstallError(msg.damaged_image(fmt, problem))
    return entries


def read_head(path: Path, fmt: str, virtual_size: int) -> bytes:
    """The virtual disk's first MiB, or more when its GPT's entries reach further (as the
    layout reads it)."""
    head = layout.read_head(path, fmt, virtual_size, 512, path.parent)
    if gpt_sector_size(head) == 4096:
        head = layout.read_head(path, fmt, virtual_size, 4096, path.parent, head)
    return head


def _head(path: Path, fmt: str, virtual_size: int) -> bytes:
    try:
        return read_head(path, fmt, virtual_size)
    except (ToolError, OSError) as exc:
        reason = "its content cannot be read"
        raise InstallError(msg.damaged_image(fmt, reason), str(exc)) from None


def _table(path: Path, fmt: str, head: bytes, extents: list[tuple[int, int]]) -> Table:
    table = partition_table(head)
    if table.kind is not None:
        if table.problem:
            log.warning("the image's %s is unusable: %s", table.kind, table.problem)
        return table
    if table.problem:
        contents = table.problem
    elif fmt == "qcow2" and not extents:
        contents = "nothing (no cluster holds data)"
    else:
        contents = describe_contents(head, path)
    if fmt == "raw":
        raise InstallError(msg.raw_without_partition_table(contents))
    raise InstallError(msg.qcow2_without_partition_table(contents))


def inspect_image(path: Path, declared: str) -> ImageInfo:
    """Check the downloaded file against the declared type; return what the writer needs.

    Raises ``InstallError`` with the SPEC's format messages, or ours for an unsafe, damaged,
    polyglot or table-less image; nothing is written before this returns.
    """
    _check_format(path, declared)
    info = _info(path, declared)
    virtual_size = int(info["virtual-size"])
    # Once qemu-img info has found no backing or data file, the three reads are independent:
    # they run side by side (about 35 ms less), their verdicts are taken in the order above.
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="inspect") as pool:
        checked = pool.submit(_check, path, declared)
        mapped = pool.submit(_mapped, path, declared)
        read = pool.submit(_head, path, declared, virtual_size)
        checked.result()
        extents = merge_extents(mapped.result())
        head = read.result()
    table = _table(path, declared, head, extents)
    return ImageInfo(
        format=declared,
        virtual_size=virtual_size,
        partition_table=table.kind,
        sector_size=table.sector_size,
        data_extents=tuple(extents),
        head=head,
    )


def check_fits_disk(info: ImageInfo, device: str, disk_size: int) -> None:
    if info.virtual_size > disk_size:
        raise InstallError(msg.image_larger_than_disk(info.virtual_size, device, disk_size))


def check_sector_size(info: ImageInfo, device: str, disk_sector_size: int) -> None:
    """A GPT made for one logical sector size is unreadable on a disk with another; an MBR
    does not say which it was made for, and MBR images are made for 512-byte sectors."""
    if info.sector_size is not None and info.sector_size != disk_sector_size:
        raise InstallError(msg.sector_size_mismatch(info.sector_size, device, disk_sector_size))
    if info.partition_table == "dos" and disk_sector_size != 512:
        raise InstallError(msg.mbr_on_large_sectors(device, disk_sector_size))

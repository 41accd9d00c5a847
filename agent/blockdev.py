"""Low-level block device work: sizes, sector sizes, wiping stale metadata, re-reading tables.

Thin I/O around ioctls and util-linux; the decisions (which byte ranges to zero, what sector
size an image was made for) are pure functions so they can be tested without a device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import threading
from collections.abc import Iterator, Sequence

from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from agent import ptable
from agent.regions import Region, merge
from agent.tools import ToolError, run
from agent.units import GPT_SIGNATURE, MiB

log = logging.getLogger(__name__)

BLKRRPART = 0x125F
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKFLSBUF = 0x1261
BLKGETSIZE64 = 0x80081272

WIPE_SPAN = MiB  # zeroed at the head and tail of the disk and of every old partition


# --- sizes --------------------------------------------------------------------------------------


def _ioctl_int(path: str | os.PathLike[str], request: int, fmt: str) -> int | None:
    """An integer ioctl on a block device, or None for a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return None
        buf = fcntl.ioctl(fd, request, bytes(struct.calcsize(fmt)))
        return int(struct.unpack(fmt, buf)[0])
    finally:
        os.close(fd)


def size_bytes(path: str | os.PathLike[str]) -> int:
    """Real size in bytes: BLKGETSIZE64 for a block device, the end offset for a file."""
    size = _ioctl_int(path, BLKGETSIZE64, "Q")
    if size is not None:
        return size
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def logical_sector_size(path: str | os.PathLike[str]) -> int:
    """Logical sector size (BLKSSZGET): what LBAs count in. 512 for a regular file."""
    return _ioctl_int(path, BLKSSZGET, "i") or 512


def physical_sector_size(path: str | os.PathLike[str]) -> int:
    """Physical sector size (BLKPBSZGET). 512 for a regular file."""
    return _ioctl_int(path, BLKPBSZGET, "I") or 512


# --- sector size of an image --------------------------------------------------------------------


# --- what to wipe -------------------------------------------------------------------------------


def alternate_gpt_regions(head: bytes, disk_size: int) -> list[Region]:
    """Where the backup GPT that a primary GPT points to lives, if not at the disk's end.

    An image written earlier without moving its backup GPT leaves it at the old image's end,
    in the middle of the disk; it is found through the primary header's AlternateLBA. The
    region ends with that header and covers its partition entries before it.
    """
    regions = []
    for sector in (512, 4096):
        header = head[sector : sector + 92]
        if len(header) < 92 or header[:8] != GPT_SIGNATURE:
            continue
        alternate_lba = struct.unpack_from("<Q", header, 32)[0]
        entries, entry_size = struct.unpack_from("<II", header, 80)
        end = (alternate_lba + 1) * sector
        if 0 < end <= disk_size:
            length = min(end, max(WIPE_SPAN, sector + entries * entry_size))
            regions.append((end - length, length))
    return regions


def wipe_regions(
    disk_size: int,
    sector: int,
    old_partitions: Sequence[Region] = (),
    extra: Sequence[Region] = (),
) -> list[Region]:
    """Byte ranges to zero so that no old metadata survives, merged and sorted.

    The first and last ``WIPE_SPAN`` (at least 34 sectors: MBR, primary GPT at LBA 1-33 on
    512-byte disks, LBA 1-5 on 4Kn; the backup GPT header at the last LBA with its entries
    before it), and the head and tail of every old partition (filesystem, LVM and RAID
    superblocks live there: md 1.1/1.2 and LVM near the start, md 0.90/1.0 and ZFS labels at
    the end).
    """
    span = max(WIPE_SPAN, 34 * sector)
    wanted: list[Region] = [(0, span), (disk_size - span, span)]
    for start, length in old_partitions:
        edge = min(span, length)
        wanted += [(start, edge), (start + length - edge, edge)]
    wanted += list(extra)
    return merge(wanted, disk_size, sector)


def old_partitions(path: str) -> list[Region]:
    """(offset, length) of every partition in the disk's current table (sfdisk), or []."""
    try:
        table = ptable.read_table(path)
    except (ToolError, ValueError, KeyError) as exc:
        log.debug("no readable partition table on %s: %s", path, exc)
        return []
    ss = table.sector_size
    return [(p.start * ss, p.size * ss) for p in table.partitions if p.size > 0]


def stale_regions(path: str) -> list[Region]:
    """Where the disk's old metadata lives, to be cleared before an image is written.

    An image rarely covers the whole disk, so whatever it does not overwrite survives: a backup
    GPT at the disk's end next to a new MBR confuses firmware and tools, an old md or LVM
    superblock gets assembled at boot. The regions: the first and last MiB, the head and tail
    of every partition in the current table (read by offset: this kernel may have no nodes for
    them) and a mid-disk backup GPT found through the primary header. The writer zeroes those
    the image's copy does not overwrite anyway.
    """
    size = size_bytes(path)
    sector = logical_sector_size(path)
    with open(path, "rb") as f:
        head = f.read(8192)
    return wipe_regions(size, sector, old_partitions(path), alternate_gpt_regions(head, size))


def flush(path: str) -> None:
    """fsync the device and drop its page cache (what is read next comes from the disk)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


def zero(path: str, regions: Sequence[Region], *, durable: bool = True) -> None:
    """Zero byte ranges of the disk, durably; ``durable=False`` leaves them to a flush that
    follows (a write that must not reach the disk ahead of them has to wait for that one)."""
    zeros = bytes(4 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for offset, length in regions:
            done = 0
            while done < length:
                done += os.pwrite(fd, zeros[: min(len(zeros), length - done)], offset + done)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:
        flush(path)


def invalidate(path: str) -> None:
    """Make a half-written disk unbootable and obviously empty: zero its first and last MiB.

    After a write that failed, the disk may hold the final tables over a partial or wrong rest:
    without its tables nothing boots, and every tool reports the disk as empty.
    """
    size = size_bytes(path)
    zero(path, wipe_regions(size, logical_sector_size(path)))
    log.warning("cleared the partition tables of %s", path)


# --- re-reading the partition table -------------------------------------------------------------


def _is_ebusy(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EBUSY


_CLAIMED: dict[str, int] = {}
_CLAIMED_LOCK = threading.Lock()


@contextlib.contextmanager
def claimed(path: str, fd: int) -> Iterator[None]:
    """Record that this process holds ``path`` open with ``O_EXCL`` on ``fd`` (agent/claim.py).

    The kernel refuses BLKRRPART through any other descriptor of a claimed disk (EBUSY), so the
    re-read uses this one while the claim lasts.
    """
    with _CLAIMED_LOCK:
        _CLAIMED[path] = fd
    try:
        yield
    finally:
        with _CLAIMED_LOCK:
            _CLAIMED.pop(path, None)


def claimed_fd(path: str) -> int | None:
    with _CLAIMED_LOCK:
        return _CLAIMED.get(path)


def _blkrrpart(path: str) -> None:
    held = claimed_fd(path)
    if held is not None:
        fcntl.ioctl(held, BLKRRPART)
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKRRPART)
    finally:
        os.close(fd)


def reread_partition_table(path: str, *, attempts: int = 8, wait_max: float = 2.0) -> None:
    """Make the kernel see the disk's current partition table.

    BLKRRPART, retried while the device is briefly busy (EBUSY: a udev probe, a closing
    opener). A device that cannot re-read by itself (EINVAL: e.g. a loop device without
    partition scanning), or one still busy after the retries, gets ``partx``, which parses the
    table in user space and deletes/adds partitions one by one. Then
    ``udevadm settle`` where udev runs. Failures are logged, not raised: the kernel's view is a
    convenience, every later step works on the whole disk by offset.
    """
    if not stat.S_ISBLK(os.stat(path).st_mode):
        return
    try:
        for attempt in Retrying(
            retry=retry_if_exception(_is_ebusy),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.1, max=wait_max),
            reraise=True,
        ):
            with attempt:
                _blkrrpart(path)
    except OSError as exc:
        log.info("BLKRRPART on %s: %s; refreshing the partitions with partx", path, exc)
        _partx_update(path)
    if shutil.which("udevadm"):
        try:
            run(["udevadm", "settle", "--timeout=30"], timeout=40)
        except ToolError as exc:
            log.info("udevadm settle: %s", exc.detail)


def _partx_update(path: str) -> None:
    """Replace the kernel's partitions of ``path`` with the ones in its table (user space).

    ``partx --update`` does not drop a partition that vanished from the middle of the table,
    so all are deleted and the current ones added. A partition in use cannot be deleted; the
    rest still gets refreshed.
    """
    if not shutil.which("partx"):
        return
    for action in ("--delete", "--add"):
        proc = run(["partx", action, path], timeout=60, check=False)
        if proc.returncode != 0:
            log.info("partx %s %s: %s", action, path, proc.stderr.strip())

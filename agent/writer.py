"""Putting the planned layout (agent/layout.py) on the disk, head last.

The body of the image goes on with ``qemu-img convert`` through offset windows on both sides
(``--image-opts`` / ``--target-image-opts``, qcow2 becomes raw), out-of-order writes and 16
coroutines (``-W -m 16``: measured about twice as fast as the defaults on a loop device), the
host page cache bypassed (``-t none``). qemu-img does not flush the disk when it ends
(``cache.no-flush``): the agent flushes the body once, beside the read-back (``BodyFlush``),
and waits for it before the first table is written, so the tables never reach the disk ahead
of the body. The small pieces (the config drive, the GPT backup, the head) are written with
``pwrite`` and ``fsync``, then read back after the device's page cache is dropped.

A zero exit status of qemu-img is not proof that the disk holds the image (a device that drops
writes, a fake-capacity disk that wraps around, a controller bug), so the body is read back
with ``qemu-img compare`` bypassing the page cache (``--verify``): ``full`` compares all of it;
``sample`` (the default) compares every range the image maps as data and a spread of samples of
its zero ranges; ``none`` skips the read-back.

``checkpoint(name)`` marks the points where a test may freeze the agent to kill it
(``BYOI_TEST_FREEZE_AT=name``, or ``convert:PERCENT`` to stop qemu-img half-way through the
body): the crash-safety tests use it; it does nothing otherwise.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent import messages as msg
from agent import ptable
from agent.blockdev import flush, zero
from agent.layout import CONFIG_FSTYPES, CONFIG_LABELS, DiskPlan
from agent.messages import InstallError
from agent.regions import Region, merge
from agent.tools import Limits, ToolError, opt_value, run, spawn, stop
from agent.units import MiB

log = logging.getLogger(__name__)
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
VERIFY_MODES = ("full", "sample", "none")
COALESCE_GAP = 16 * MiB  # data extents closer than this are compared as one range
ZERO_SAMPLES = 16
ZERO_SAMPLE = MiB
VERIFY_LANES = 2
# one more qemu-img compare costs about what comparing 12 MiB does (measured: a 1-2 MiB
# compare takes 8-14 ms from spawn to exit, a long one runs at about 1.4 GB/s)
COMPARE_OVERHEAD = 12 * MiB
Progress = Callable[[int, int | None], None]


def checkpoint(name: str) -> None:
    """Freeze here for a crash test when ``BYOI_TEST_FREEZE_AT`` names this point."""
    if os.environ.get("BYOI_TEST_FREEZE_AT") == name:
        sys.stderr.write(f"frozen at {name}\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)


def _midway(proc: subprocess.Popen[bytes], tool: str, done: int, length: int) -> None:
    """``BYOI_TEST_FREEZE_AT=convert:50``: once the copy passes 50 %, stop qemu-img where it
    is (SIGSTOP) and freeze, so that a crash test kills the agent in the middle of a write."""
    wanted = os.environ.get("BYOI_TEST_FREEZE_AT", "")
    if not wanted.startswith(f"{tool}:") or done * 100 < int(wanted.split(":")[1]) * length:
        return
    os.kill(proc.pid, signal.SIGSTOP)
    checkpoint(wanted)


def _source(image: Path, fmt: str, window: Region) -> str:
    """The image through its format, cut to ``window`` (qemu option syntax)."""
    cut = f"driver=raw,offset={window[0]},size={window[1]}"
    if fmt == "raw":
        return f"{cut},file.driver=file,file.filename={opt_value(image)}"
    return f"{cut},file.driver={fmt},file.file.driver=file,file.file.filename={opt_value(image)}"


def target_opts(target: str, window: Region, *, sized: bool = True, flush: bool = True) -> str:
    """``target`` cut to ``window`` (qemu option syntax). ``flush=False``: qemu-img does not
    flush the disk when it closes it (``cache.no-flush``); the agent's ``BodyFlush`` does, once,
    beside the read-back."""
    driver = "host_device" if target.startswith("/dev/") else "file"
    cut = f"driver=raw,offset={window[0]}" + (f",size={window[1]}" if sized else "")
    cut += "" if flush else ",cache.no-flush=on"
    return f"{cut},file.driver={driver},file.filename={opt_value(target)}"


def convert_args(image: Path, fmt: str, target: str, window: Region, direct: bool) -> list[str]:
    """qemu-img convert of the image's ``window`` to the same offsets of ``target``, not
    flushed (see ``BodyFlush``)."""
    args = ["qemu-img", "convert", "-p", "-n", "-W", "-m", "16"]
    args += ["-t", "none"] if direct else ["-t", "writeback"]
    args += ["--image-opts", _source(image, fmt, window)]
    return [*args, "--target-image-opts", target_opts(target, window, sized=False, flush=False)]


def compare_args(image: Path, fmt: str, target: str, window: Region) -> list[str]:
    """qemu-img compare of one window: the device read with O_DIRECT (the disk, not a cache)."""
    disk = target_opts(target, window) + ",cache.direct=on"
    return ["qemu-img", "compare", "-p", "--image-opts", _source(image, fmt, window), disk]


def follow(args: list[str], length: int, on_progress: Progress | None, timeout: float) -> str:
    """Run a qemu-img with ``-p``, feeding its percentage to ``on_progress``; returns stderr.
    Raises ToolError on failure. An exception from ``on_progress`` (an interrupt) kills it."""
    proc = spawn(args, limits=Limits(address_space=4 << 30, cpu_seconds=int(timeout)))
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    try:
        while chunk := proc.stdout.read1(4096):
            buffer = (buffer + chunk)[-256:]
            found = _PROGRESS.findall(buffer)
            if found and on_progress:
                on_progress(int(float(found[-1]) / 100 * length), length)
            if found:
                _midway(proc, args[1], int(float(found[-1]) / 100 * length), length)
            if time.monotonic() > deadline:
                raise ToolError(f"{args[1]} timed out after {timeout:.0f} s")
        stderr = proc.stderr.read().decode(errors="replace")
        code = proc.wait()
    finally:
        stop(proc)
    if code != 0:
        raise ToolError(f"qemu-img {args[1]}: exit {code}: {stderr.strip()[-2000:]}", code)
    return stderr


def copy_body(
    image: Path,
    fmt: str,
    target: str,
    plan: DiskPlan,
    image_type: str,
    on_progress: Progress | None = None,
    timeout: float = 6 * 3600,
) -> None:
    """Copy the image's body (everything but its head) to the disk; cant_write on failure.
    Not yet durable when it returns: ``BodyFlush`` makes it so."""
    window = plan.body
    if window[1] == 0:
        return
    try:
        try:
            follow(convert_args(image, fmt, target, window, True), window[1], on_progress, timeout)
        except ToolError as first:
            # Some block devices refuse O_DIRECT; buffered writes plus a flush are durable too.
            if "O_DIRECT" not in first.detail and "Invalid argument" not in first.detail:
                raise
            log.warning("direct I/O refused on %s, retrying with buffered writes", target)
            args = convert_args(image, fmt, target, window, False)
            follow(args, window[1], on_progress, timeout)
    except (ToolError, OSError) as exc:
        raise InstallError(msg.cant_write(image_type), str(exc)) from None
    if on_progress:
        on_progress(window[1], window[1])


class BodyFlush:
    """The body's one flush, run beside the read-back: the disk writes back what the copy left
    in its cache while the compare reads it (through O_DIRECT, which sees the completed writes
    whether or not they are durable yet). ``wait`` returns once the body is durable, before
    anything of the tables is written; a failed flush is a failed write.

    On a real disk the flush is the drive emptying its cache, no host CPU, so it hides behind
    the compare. On this project's test host (a file-backed loop device: the flush is the
    host's writeback, and it competes with the two compare lanes for the 2 CPUs) it gained
    less: 725 MB qcow2, 8 alternated rounds of convert + flush + compare, 0.82-0.92 s against
    0.86-1.00 s while the host wrote fast, no difference (2.57 s against 2.48 s median) once it
    wrote slowly (the convert then took 1.8-2.2 s either way)."""

    def __init__(self, target: str, image_type: str) -> None:
        self.target, self.image_type = target, image_type
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            flush(self.target)
        except OSError as exc:
            self.error = exc

    def wait(self, *, check: bool = True) -> None:
        """Until the flush has ended; with ``check``, cant_write if it failed."""
        self._thread.join()
        if check and self.error is not None:
            raise InstallError(msg.cant_write(self.image_type), f"flush: {self.error}")


# --- verification -------------------------------------------------------------------------------


def clip(regions: list[Region], window: Region) -> list[Region]:
    begin, end = window[0], window[0] + window[1]
    out = []
    for start, length in regions:
        s, e = max(start, begin), min(start + length, end)
        if e > s:
            out.append((s, e - s))
    return out


def sample_regions(data: list[Region], window: Region, samples: int = ZERO_SAMPLES) -> list[Region]:
    """What ``--verify sample`` compares (pure): every data range of the window (ranges closer
    than ``COALESCE_GAP`` joined, so a fragmented image costs few reads), and ``samples``
    evenly spread 1 MiB ranges of the window (mostly its zero ranges: a disk that drops or
    misplaces writes does so in more than one place)."""
    joined: list[Region] = []
    for start, length in clip(data, window):
        if joined and start - (joined[-1][0] + joined[-1][1]) < COALESCE_GAP:
            joined[-1] = (joined[-1][0], start + length - joined[-1][0])
        else:
            joined.append((start, length))
    step = max(window[1] // max(samples, 1), ZERO_SAMPLE)
    spread = [(window[0] + i * step, ZERO_SAMPLE) for i in range(samples)]
    return merge(joined + clip(spread, window), window[0] + window[1], MiB)


def verify_regions(mode: str, data: list[Region] | None, window: Region) -> list[Region]:
    """The byte ranges to compare for a verify ``mode`` (pure)."""
    if mode == "none" or window[1] == 0:
        return []
    if mode == "full" or data is None:
        return [window]
    return sample_regions(data, window)


def lanes(
    regions: list[Region], count: int, align: int = MiB, overhead: int = 0
) -> list[list[Region]]:
    """``regions`` shared out into at most ``count`` lanes of about equal cost, each in disk
    order (pure). A range costs its bytes plus ``overhead`` (what starting one compare costs,
    in bytes compared in that time), so a lane of many small ranges gets fewer bytes. A range
    is cut where a lane is full, at a multiple of ``align``."""
    total = sum(length + overhead for _, length in regions)
    share = -(-total // max(count, 1))
    out: list[list[Region]] = [[]]
    room = share
    for start, length in regions:
        while length:
            if room <= 0 and len(out) < count:
                out.append([])
                room = share
            cut = length
            if len(out) < count and room < length + overhead:
                cut = (start + room - overhead) // align * align - start
                if cut <= 0:  # full at this alignment: the next lane starts here
                    room = 0
                    continue
            out[-1].append((start, cut))
            start, length, room = start + cut, length - cut, room - cut - overhead
    return [lane for lane in out if lane]


def verify_body(
    image: Path,
    fmt: str,
    target: str,
    plan: DiskPlan,
    image_type: str,
    mode: str = "sample",
    on_progress: Progress | None = None,
    timeout: float = 6 * 3600,
    extents: Sequence[Region] | None = None,
) -> int:
    """Read the body back and compare it with the image; cant_write if it differs. Returns
    the number of bytes compared. ``extents``: the image's data ranges (inspect's
    ``qemu-img map``), which ``sample`` compares in full; without them it compares all."""
    regions = verify_regions(mode, list(extents) if extents else None, plan.body)
    total = _compare_in_lanes(regions, image, fmt, target, image_type, on_progress, timeout)
    log.info("verified %d bytes of %s against the image (%s)", total, target, mode)
    return total


def _compare_in_lanes(
    regions: list[Region],
    image: Path,
    fmt: str,
    target: str,
    image_type: str,
    on_progress: Progress | None,
    timeout: float,
) -> int:
    """Compare ``regions`` of the image with the same ranges of ``target``; cant_write if they
    differ. Returns the bytes compared.

    The ranges are compared in ``VERIFY_LANES`` lanes side by side: one ``qemu-img compare`` waits
    for the device about as long as it compares, so two keep both busy (measured on 731 MiB
    read back from a loop device: 0.395 s in one lane, 0.279 s in two; a third gained
    nothing). ``on_progress`` is called from this thread only; an exception from it stops
    the lanes and reaches the caller."""
    total = sum(length for _, length in regions)
    work = lanes(regions, VERIFY_LANES, overhead=COMPARE_OVERHEAD)
    done = [0] * len(work)
    failures: list[BaseException] = []
    stopping = threading.Event()

    def lane(index: int, windows: list[Region]) -> None:
        base = 0
        for window in windows:

            def progress(n: int, _total: int | None, base: int = base) -> None:
                if stopping.is_set():
                    raise _Stopped
                done[index] = base + n

            try:
                args = compare_args(image, fmt, target, window)
                follow(args, window[1], progress, timeout)
            except ToolError as exc:
                what = "differs from the image" if exc.returncode == 1 else "could not be read back"
                failures.append(
                    InstallError(
                        msg.cant_write(image_type),
                        f"{target} {what} in bytes {window[0]}-{window[0] + window[1] - 1}: "
                        f"{exc.detail}",
                    )
                )
            except _Stopped:
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                failures.append(exc)
            if failures:
                stopping.set()
                return
            base += window[1]
            done[index] = base

    threads = [
        threading.Thread(target=lane, args=(i, w), name=f"verify-{i}", daemon=True)
        for i, w in enumerate(work)
    ]
    for thread in threads:
        thread.start()
    try:
        while alive := [thread for thread in threads if thread.is_alive()]:
            alive[0].join(0.1)
            if on_progress:
                on_progress(sum(done), total)
    finally:
        stopping.set()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    if on_progress:
        on_progress(total, total)
    return total


class _Stopped(Exception):
    """One verify lane failed (or the install is stopping): the others end too."""


# --- small writes -------------------------------------------------------------------------------


def write_checked(path: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset``, make it durable, read it back from the disk; OSError if
    what the disk returns differs."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done : done + 4 * MiB], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)
    flush(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        back = b"".join(
            os.pread(fd, min(4 * MiB, len(data) - pos), offset + pos)
            for pos in range(0, len(data), 4 * MiB)
        )
    finally:
        os.close(fd)
    if back != data:
        raise OSError(f"{path}: bytes {offset}-{offset + len(data) - 1} read back differ")


def write_drive(path: str, plan: DiskPlan, drive: Path) -> None:
    """The config drive at its partition, the rest of the partition's edges zeroed (an old
    signature there would make blkid report an ambiguous filesystem)."""
    data = drive.read_bytes()
    length = plan.drive_length
    rest = [(len(data), length - len(data))]
    if length > 4 * 64 * MiB:  # a huge reused partition: clear where probes look
        rest = [(len(data), 64 * MiB - len(data)), (length - MiB, MiB)]
    write_checked(path, plan.drive_offset, data)
    zero(path, [(plan.drive_offset + start, n) for start, n in rest if n > 0])


def write_tail(path: str, plan: DiskPlan) -> None:
    """The GPT backup (entry array and header) at the disk's last sectors."""
    if plan.tables.tail:
        write_checked(path, plan.tables.tail_offset, plan.tables.tail)


def write_head(path: str, plan: DiskPlan) -> None:
    """The install's last write: the first MiB with the final tables and boot code."""
    checkpoint("head")
    write_checked(path, 0, plan.tables.head)


def gpt_verified(report: str) -> bool:
    """Does ``sgdisk -v``'s report pass the disk (pure)? It says "No problems found" even
    after loading a corrupt header or table (a bad CRC, a damaged backup header, which it
    rebuilt in memory from the other copy): its cautions about those fail it too."""
    text = report.lower()
    return "no problems found" in text and "corrupt" not in text and "crc" not in text


def result_problems(path: str, plan: DiskPlan) -> list[str]:
    """What is wrong with the finished disk, read back through the tools firmware-facing code
    trusts (sfdisk, sgdisk, blkid): empty when the disk is as planned."""
    problems = []
    # the finished disk's reads are independent: side by side (20 ms less than in a row)
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="result") as pool:
        read = pool.submit(ptable.read_table, path)
        checked = None
        if plan.label == "gpt":
            checked = pool.submit(run, ["sgdisk", "-v", path], check=False, timeout=120)
        probed = pool.submit(ptable.probe_label, path, plan.drive_offset, plan.drive_length)
        try:
            table = read.result()
        except ToolError as exc:
            return [f"sfdisk cannot read the table: {exc.detail}"]
        verify = checked.result() if checked is not None else None
        label, fstype = probed.result()
    seen = table.layout()
    if plan.label == "dos":  # logical partitions (5+) are the image's, inside its extended one
        seen = [p for p in seen if p[0] <= 4]
    if table.label != plan.label or tuple(seen) != plan.expected:
        problems.append(f"the table reads {table.label} {seen}, planned {plan.expected}")
    if verify is not None and not gpt_verified(verify.stdout):
        problems.append(f"sgdisk -v: {verify.stdout.strip()[-1000:]}")
    if label not in CONFIG_LABELS or fstype not in CONFIG_FSTYPES:
        problems.append(f"the config drive probes as LABEL={label!r} TYPE={fstype!r}")
    return problems

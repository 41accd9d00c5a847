"""Writing the image onto the disk with ``qemu-img convert`` (qcow2 is converted to raw).

The target is the whole-disk block device, opened without creating anything (``-n``); qemu-img
writes with the host page cache bypassed (``-t none``) so that the end of the convert means the
data is on the disk, and it reports its progress on stdout, which we feed to the status model.

A zero exit status of qemu-img is not proof that the disk holds the image (a device that drops
writes, a fake-capacity disk that wraps around, a controller bug), so the written range is read
back with ``qemu-img compare`` bypassing the page cache, limited to the image's virtual size
(qemu-img otherwise also demands that the rest of a larger disk be zeroes, reading all of it).
Up to ``FULL_VERIFY_LIMIT`` the whole range is compared: it costs about one more pass at the
disk's read speed (measured: 1 GiB qcow2 written in 0.42 s, compared in 0.45 s on a loop device).
Above, the head and tail (partition tables, boot loaders) and evenly spread samples are.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from agent import messages as msg
from agent.messages import InstallError
from agent.redact import scrub

log = logging.getLogger(__name__)
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
MiB = 1024 * 1024
GiB = 1024 * MiB
FULL_VERIFY_LIMIT = 64 * GiB
SAMPLE_SIZE = 64 * MiB
SAMPLES = 16
Region = tuple[int, int]  # (offset, length) in bytes


def convert_args(image: Path, fmt: str, target: str, direct: bool = True) -> list[str]:
    """The qemu-img command line: explicit source format (never probed), raw target, no create."""
    args = ["qemu-img", "convert", "-p", "-f", fmt, "-O", "raw", "-n"]
    if direct:
        args += ["-t", "none"]
    return [*args, str(image), target]


def write_image(
    image: Path,
    fmt: str,
    target: str,
    image_type: str,
    virtual_size: int,
    on_progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 6 * 3600,
) -> None:
    """Convert ``image`` onto ``target``; raise the documented message on any failure."""
    try:
        _convert(convert_args(image, fmt, target), virtual_size, on_progress, timeout)
    except InstallError as first:
        # Some block devices refuse O_DIRECT; buffered writes plus a flush are still durable.
        if "O_DIRECT" not in first.detail and "Invalid argument" not in first.detail:
            raise
        log.warning("direct I/O refused on %s, retrying with buffered writes", target)
        _convert(convert_args(image, fmt, target, direct=False), virtual_size, on_progress, timeout)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    verify_written(image, fmt, target, image_type, virtual_size, timeout=timeout)


def verify_regions(virtual_size: int, full_limit: int = FULL_VERIFY_LIMIT) -> list[Region]:
    """The byte ranges of the image to read back and compare (pure).

    All of it up to ``full_limit``; above, the first and last ``SAMPLE_SIZE`` (MBR/GPT, boot
    code, the backup GPT) and ``SAMPLES`` ranges spread evenly in between (a disk that silently
    loses or misplaces writes does so in more than one place).
    """
    if virtual_size <= full_limit:
        return [(0, virtual_size)]
    step = (virtual_size - 2 * SAMPLE_SIZE) // (SAMPLES + 1)
    regions = [(0, SAMPLE_SIZE)]
    regions += [(SAMPLE_SIZE + i * step, SAMPLE_SIZE) for i in range(1, SAMPLES + 1)]
    regions.append((virtual_size - SAMPLE_SIZE, SAMPLE_SIZE))
    aligned = []
    for offset, length in regions:
        start = offset - offset % MiB
        aligned.append((start, min(length, virtual_size - start)))
    return aligned


def compare_args(image: Path, fmt: str, target: str, offset: int, length: int) -> list[str]:
    """``qemu-img compare`` of one range: the image through its format, the device raw with
    O_DIRECT (so the disk is read, not our page cache), both cut to the same window."""
    window = f"driver=raw,offset={offset},size={length}"
    source = f"{window},file.driver={fmt},file.file.driver=file,file.file.filename={image}"
    if fmt == "raw":
        source = f"{window},file.driver=file,file.filename={image}"
    disk = f"{window},file.driver=host_device,file.filename={target},cache.direct=on"
    return ["qemu-img", "compare", "--image-opts", source, disk]


def verify_written(
    image: Path,
    fmt: str,
    target: str,
    image_type: str,
    virtual_size: int,
    *,
    full_limit: int = FULL_VERIFY_LIMIT,
    timeout: float = 6 * 3600,
) -> None:
    """Read the written range back and compare it with the image; cant_write if it differs."""
    for offset, length in verify_regions(virtual_size, full_limit):
        args = compare_args(image, fmt, target, offset, length)
        if not target.startswith("/dev/"):
            args = [a.replace("host_device", "file") for a in args]
        try:
            proc = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        except subprocess.TimeoutExpired:
            raise InstallError(msg.cant_write(image_type), "qemu-img compare timed out") from None
        if proc.returncode != 0:
            what = "differs from the image" if proc.returncode == 1 else "could not be read back"
            raise InstallError(
                msg.cant_write(image_type),
                scrub(
                    f"{target} {what} in bytes {offset}-{offset + length - 1}: "
                    f"{(proc.stdout + proc.stderr).strip()[-1000:]}"
                ),
            )
    log.info("verified %s against the image", target)


def _die_with_parent() -> None:  # runs in the child, before exec
    """Ask the kernel to SIGKILL the tool if the agent dies (killed, crashed): a qemu-img
    writing on after its agent is gone would race the next install on the same disk."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _convert(
    args: list[str],
    virtual_size: int,
    on_progress: Callable[[int, int | None], None] | None,
    timeout: float,
) -> None:
    image_type = "qcow2" if args[args.index("-f") + 1] == "qcow2" else "raw"
    log.info("writing: %s", " ".join(args))
    try:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
    except FileNotFoundError as exc:
        raise InstallError(msg.cant_write(image_type), f"qemu-img: {exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    buffer = b""
    try:
        while chunk := proc.stdout.read1(4096):
            buffer = (buffer + chunk)[-256:]
            found = _PROGRESS.findall(buffer)
            if found and on_progress:
                on_progress(int(float(found[-1]) / 100 * virtual_size), virtual_size)
        stderr = proc.stderr.read().decode(errors="replace")
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InstallError(msg.cant_write(image_type), "qemu-img convert timed out") from None
    finally:
        # An interrupt (SIGTERM/SIGINT turned into an exception) or a timeout: the writer
        # must not outlive this call, or it keeps writing after the install has ended.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if code != 0:
        raise InstallError(msg.cant_write(image_type), scrub(f"qemu-img convert: {stderr}"))
    if on_progress:
        on_progress(virtual_size, virtual_size)

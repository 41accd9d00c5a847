"""Writing the image onto the disk with ``qemu-img convert`` (qcow2 is converted to raw).

The target is the whole-disk block device, opened without creating anything (``-n``); qemu-img
writes with the host page cache bypassed (``-t none``) so that the end of the convert means the
data is on the disk, and it reports its progress on stdout, which we feed to the status model.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from agent import messages as msg
from agent.messages import InstallError
from agent.redact import scrub

log = logging.getLogger(__name__)
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


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


def _convert(
    args: list[str],
    virtual_size: int,
    on_progress: Callable[[int, int | None], None] | None,
    timeout: float,
) -> None:
    image_type = "qcow2" if args[args.index("-f") + 1] == "qcow2" else "raw"
    log.info("writing: %s", " ".join(args))
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        proc.kill()
        proc.wait()
        raise InstallError(msg.cant_write(image_type), "qemu-img convert timed out") from None
    if code != 0:
        raise InstallError(msg.cant_write(image_type), scrub(f"qemu-img convert: {stderr}"))
    if on_progress:
        on_progress(virtual_size, virtual_size)

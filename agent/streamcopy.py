"""``--stream``: the image's body goes onto the disk while the download is still running.

The download hands its progress to ``StreamCopy.progress``; from the first report that knows
the final size (Content-Length), a thread serves the growing tmpfs file as an NBD export
(agent/stream.py) and copies the image's body, everything after its first MiB, to the same
offsets of the disk with ``qemu-img convert`` (a raw image in one pass, a qcow2 in windows of
one L2 table). Before the first byte, it zeroes the disk's first MiB: as in the normal path,
the disk then has no partition table until the install's very last write.

What the stream does not change: the image still lands whole in tmpfs, the checksum and the
full inspection (integrity, partition table) run on it afterwards, and the head is written only
once they pass. Only the start of the stream checks the format from the image's first 2 MiB
(declared type, qcow2 safety: no backing or data file, no encryption) and its size against the
disk, so an unsafe image is never read through qemu.

In this mode a failed install (bad checksum, damaged image, dropped download) has overwritten
the old disk's contents: the disk is left with no partition table. The disk is taken as soon as
the image's first 2 MiB are there and pass, even when the install is already stopping by then
(a checksum that fails the moment the download ends): otherwise the outcome of a failure would
depend on which thread ran first.

The read-back stays after the download (the verify step). Reading each window back as soon
as it was written (``qemu-img map`` of the window, then ``compare``, through the export) was
measured and dropped: on 2 CPUs the download already keeps both busy, the copy fell behind and
the install took longer (725 MB qcow2, 5 alternated rounds: 2.39 s against 2.15 s median, the
write step waiting 0.74 s for the backlog, 0.25 s more CPU). So was running the copy at a
lower priority (nice 10: the download 0.18 s faster, the install 0.06 s slower). And a raw image
copied from the plain file in 128 MiB windows, each once whole, instead of through the
export: 2.10 s against 2.04 s, 0.14 s more CPU (a qemu-img start per window).

A stream that cannot finish for a reason of its own (the server without Content-Length, a
download restarted from byte 0, a qemu-img error) is not a failed install: ``succeeded`` stays
False and the pipeline copies the body from the complete file as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from agent import blockdev, formats, stream
from agent.tools import ToolError
from agent.units import HEAD_SIZE, MiB
from agent.writer import Progress, follow, target_opts

log = logging.getLogger(__name__)
DETECT_BYTES = 2 * MiB
SOCKET_PATH_ROOM = 80  # the export adds its socket's name; sun_path holds 107 bytes


@contextlib.contextmanager
def _socket_dir(workdir: Path) -> Iterator[Path]:
    """A directory for the export's Unix socket: the work area, or a short private one when
    the work area's path is too long for a socket address (108 bytes)."""
    if len(str(workdir)) < SOCKET_PATH_ROOM:
        yield workdir
        return
    short = Path(
        tempfile.mkdtemp(prefix="byoi-nbd-", dir="/run" if os.access("/run", os.W_OK) else None)
    )
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


class StreamCopy:
    """The body copy that runs beside the download (one per install)."""

    def __init__(self, image: Path, fmt: str, target: str, disk_size: int, workdir: Path) -> None:
        self.image, self.fmt, self.target = image, fmt, target
        self.disk_size, self.workdir = disk_size, workdir
        self.growing: stream.Growing | None = None
        self.touched = False  # the disk's head was zeroed: a failure must clear it
        self.succeeded = False
        self.reason = ""  # why the stream gave up, for the log
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.on_progress: Progress | None = None

    # --- the download's side ----------------------------------------------------------------
    def progress(self, done: int, total: int | None) -> None:
        """The download's progress hook: bytes written to the file so far."""
        if self.growing is None:
            if self.reason:
                return
            if total is None:
                self.reason = "the server sent no Content-Length"
                return
            self.growing = stream.Growing(total)
            self._thread = threading.Thread(target=self._run, name="stream-copy", daemon=True)
            self._thread.start()
        if done < self.growing.have:
            self.growing.fail("the download restarted from the beginning")
        else:
            self.growing.advance(done)

    def downloaded(self) -> None:
        """The whole file is there: the copy catches up while the checksum and inspection run."""
        if self.growing is not None:
            self.growing.finish()

    def wait(self, on_progress: Progress | None = None) -> bool:
        """Wait for the copy to end (its progress to ``on_progress``); True when it copied the
        whole body."""
        self.on_progress = on_progress
        if self._thread is not None:
            self._thread.join()
        return self.succeeded

    def stop(self) -> None:
        """End the copy now (an interrupt or a failure): blocked reads fail, qemu-img exits."""
        self._cancel.set()
        if self.growing is not None:
            self.growing.fail("the install is stopping")
        if self._thread is not None:
            self._thread.join()

    # --- the copy thread --------------------------------------------------------------------
    def _run(self) -> None:
        assert self.growing is not None
        try:
            self._copy(self.growing)
            self.succeeded = not self._cancel.is_set()
        except (ToolError, OSError, stream.StreamFailed, ValueError) as exc:
            self.reason = str(exc)
        if not self.succeeded:
            log.warning(
                "streaming write stopped (%s): the body is copied after the download",
                self.reason or "stopped",
            )

    def _copy(self, growing: stream.Growing) -> None:
        size = growing.size
        # Once the image's first bytes are there, the disk is taken (its head zeroed) even if
        # the install is already stopping: a checksum failing the moment the download ends must
        # not race this thread and leave the old table on some runs and none on others.
        growing.wait_for(min(size, DETECT_BYTES), self._cancel, data_wins=True)
        virtual = self._virtual_size(size)
        if virtual > self.disk_size:
            raise ValueError(f"the image's {virtual} bytes do not fit the disk")
        body = (HEAD_SIZE, max(0, virtual - HEAD_SIZE))
        blockdev.zero(self.target, [(0, min(HEAD_SIZE, self.disk_size))])
        self.touched = True
        with (
            _socket_dir(self.workdir) as where,
            stream.export(self.image, size, growing, where) as nbd,
        ):
            parts = stream.windows(body) if self.fmt == "qcow2" else [body]
            for offset, length in parts:
                if self._cancel.is_set():
                    return
                args = ["qemu-img", "convert", "-p", "-n", "-W", "-m", "16", "-t", "none"]
                args += stream.source_args(nbd, self.fmt, offset, length)
                target = target_opts(self.target, (offset, length), flush=False)
                args += ["--target-image-opts", target]
                follow(args, length, self._reporter(offset - body[0], body[1]), 6 * 3600)
        log.info(
            "streamed %d bytes of %s onto %s (%d reads waited for the download)",
            body[1],
            self.image.name,
            self.target,
            growing.blocked,
        )

    def _reporter(self, base: int, total: int) -> Callable[[int, int | None], None]:
        def report(done: int, _total: int | None) -> None:
            if self.on_progress:
                self.on_progress(base + done, total)

        return report

    def _virtual_size(self, size: int) -> int:
        """The declared type checked on the image's first bytes; its virtual size."""
        found = formats.detect(self.image)
        if found.polyglot or found.as_declared(self.fmt) != self.fmt or found.problems:
            raise ValueError(f"the image's start reads as {found.described}: not streamed")
        if self.fmt == "raw":
            return size
        with open(self.image, "rb") as f:
            header = f.read(32)
        return int(struct.unpack_from(">Q", header, 24)[0])

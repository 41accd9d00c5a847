"""Where the downloaded bytes go: the tmpfs file, the running hash, the RAM budget, progress.

Why it looks like this:

- The image lands in RAM (tmpfs), so the budget is enforced before the first byte when the
  server announces a length, and again on every chunk (the length may be missing or false).
- The receiving thread writes each chunk to the file; a hashing thread follows behind, reading
  the file back in large blocks. hashlib releases the GIL on large buffers, so hashing overlaps
  the network instead of adding its time, and the peak RSS stays at one block whatever the
  image size (the file in tmpfs is the only buffer).
- A chunk of zeros is not written but left as a hole (the file is only extended): a raw image's
  empty space then costs no RAM, and ``qemu-img convert`` skips it by SEEK_HOLE. Every byte is
  still hashed (a hole reads back as zeros).
- ``on_progress`` is called at most every ``progress_interval`` and on every state change; it
  may raise to cancel the download, and its exception reaches the caller unchanged.
- An optional bandwidth cap (a token bucket of one second) for operators sharing a link.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.checksum import new_hasher

ProgressCallback = Callable[[int, int | None], None]
_ZEROS = bytes(1024 * 1024)  # chunks longer than this are always written


class TooBig(Exception):
    """The image does not fit in the memory budget (or the tmpfs is full)."""


class WriteFailed(Exception):
    """Writing the local file failed for another reason than a full tmpfs."""


class Overrun(Exception):
    """The server sent more bytes than it announced."""


class Sink:
    """The local copy of one download: ``done`` bytes written (and being hashed) so far."""

    def __init__(
        self,
        dest: Path,
        checksum_type: str | None,
        budget: int | None,
        on_progress: ProgressCallback | None,
        *,
        hash_block: int,
        progress_interval: float,
        max_rate: float | None = None,
    ) -> None:
        self.dest = dest
        self.budget = budget
        self.done = 0
        self.total: int | None = None
        self._on_progress = on_progress
        self._interval = progress_interval
        self._last_call = 0.0
        self._limit = RateLimit(max_rate) if max_rate else None
        self.fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.hasher = _Hasher(checksum_type, dest, hash_block) if checksum_type else None

    def expect(self, total: int | None, source: str) -> None:
        """The server announced the file's size: refuse it now if it cannot fit."""
        if total is not None and self.budget is not None and total > self.budget:
            raise TooBig(f"{source} {total} bytes exceeds the memory budget of {self.budget}")
        self.total = total
        self.progress(force=True)

    def take(self, chunk: bytes | memoryview) -> None:
        end = self.done + len(chunk)
        if self.total is not None and end > self.total:
            raise Overrun(f"the server sent more than its announced {self.total} bytes")
        if self.budget is not None and end > self.budget:
            raise TooBig(f"received {end} bytes, over the memory budget of {self.budget}")
        try:
            self._write(chunk)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC: the tmpfs is full
                raise TooBig(f"writing {self.dest}: {exc}") from None
            raise WriteFailed(f"writing {self.dest}: {exc}") from None
        if self.hasher:
            self.hasher.advance(self.done)
        if self._limit:
            self._limit.take(len(chunk))
        self.progress()

    def _write(self, chunk: bytes | memoryview) -> None:
        # memcmp against a zero buffer: stops at the first non-zero byte of real data
        if chunk and _ZEROS.startswith(chunk):
            self.done += len(chunk)
            os.ftruncate(self.fd, self.done)  # a hole: extends the file, allocates nothing
            return
        view = memoryview(chunk)
        while view:
            written = os.pwrite(self.fd, view, self.done)
            view = view[written:]
            self.done += written

    def restart(self) -> None:
        """Drop what we have: the next bytes are the file's first."""
        os.ftruncate(self.fd, 0)
        self.done = 0
        self.total = None
        if self.hasher:
            self.hasher.reset()
        self.progress(force=True)

    def progress(self, force: bool = False) -> None:
        if not self._on_progress:
            return
        now = time.monotonic()
        if force or now - self._last_call >= self._interval:
            self._last_call = now
            self._on_progress(self.done, self.total)

    def finish(self) -> str | None:
        """The hex digest once every byte is hashed (None without a checksum type)."""
        hasher, self.hasher = self.hasher, None
        return hasher.finish() if hasher else None

    def close(self) -> None:
        if self.hasher:
            self.hasher.abandon()
            self.hasher = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RateLimit:
    """A token bucket holding one second of ``rate`` bytes: the average stays under the cap
    and a pause (a retry wait) does not earn a burst larger than one second's worth."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self._clock = clock
        self._tokens = self.rate
        self._last = clock()

    def take(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        if self._tokens < 0:
            time.sleep(-self._tokens / self.rate)


class _Hasher:
    """A thread hashing the file behind the writer, in large blocks read back from tmpfs.

    Reading back (a memory copy on tmpfs, GIL released) lets each ``update`` cover megabytes, so
    the hashing thread takes the GIL a few times per block instead of once per network chunk:
    measured, hashing 256 KiB pieces handed through a queue lost up to half the hash speed to GIL
    hand-overs with the receiving thread. The file itself is the buffer: no queue to bound, and
    the RSS holds one block.
    """

    def __init__(self, checksum_type: str, path: Path, block: int) -> None:
        self._type = checksum_type
        self._hash = new_hasher(checksum_type)
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._block = bytearray(block)
        self._cond = threading.Condition()
        self._written = 0  # bytes the writer has put in the file
        self._hashed = 0
        self._generation = 0  # bumped by reset(): the file was truncated
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="download-hash", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        view = memoryview(self._block)
        try:
            while True:
                with self._cond:
                    # wait for a whole block (or the end): a hasher woken for every network
                    # chunk hashes 256 KiB pieces and fights the receiving thread for the GIL
                    while self._written - self._hashed < len(view) and not self._closing:
                        self._cond.wait()
                    if self._written <= self._hashed:
                        return
                    generation, start = self._generation, self._hashed
                    want = min(self._written - start, len(view))
                n = os.preadv(self._fd, [view[:want]], start)
                if n <= 0:
                    raise OSError(f"short read back at byte {start}")
                self._hash.update(view[:n])
                with self._cond:
                    if generation == self._generation:
                        self._hashed += n
                    else:
                        self._hash = new_hasher(self._type)
                        self._hashed = 0
        except BaseException as exc:
            self._error = exc
        finally:
            os.close(self._fd)

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            if written - self._hashed >= len(self._block):
                self._cond.notify()

    def reset(self) -> None:
        with self._cond:
            self._generation += 1
            self._written = self._hashed = 0
            self._hash = new_hasher(self._type)
            self._cond.notify()

    def finish(self) -> str:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        if self._error:
            raise self._error
        return self._hash.hexdigest()

    def abandon(self) -> None:
        with self._cond:
            self._closing = True
            self._written = self._hashed = 0
            self._cond.notify()
        self._thread.join()

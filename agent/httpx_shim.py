"""The one place that reaches into httpx/httpcore internals (versions pinned in pyproject.toml).

Why it exists: two things the download needs have no public API.

- The socket read size. httpcore's HTTP/1.1 connection reads ``READ_NUM_BYTES`` (64 KiB) per
  call; 256 KiB reads cut the receiving thread's CPU per byte, which is what bounds the
  download on a fast link (measured with bench/bench_download.py --read-kib).
- Bytes past the announced Content-Length: httpx silently drops them, and h11 may already hold
  them in its buffer when the body ends, where no socket check can see them.

- The body itself: h11 copies every piece twice (into its receive buffer, then out of it) and
  httpcore allocates a new bytes object per read; for a 2 GB image that was most of the
  difference with curl (measured: 0.9-1.5 s of CPU against 0.4-0.5 s for ``recv_into`` one
  reused buffer). ``RawBody`` reads the rest of a Content-Length body straight from the socket,
  after the bytes h11 already buffered (its public ``trailing_data``). The connection is then
  not reused (h11 never saw the body end), which costs nothing for one large transfer.

All degrade safely: if the layout changes, the read size stays httpcore's default, the body is
read through httpx, and the excess check falls back to the socket alone.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import httpcore
import httpx
from httpcore._backends.sync import SyncStream


def tune_read_size(read_size: int) -> None:
    """Make httpcore read the socket in pieces of ``read_size`` (harmless to other users)."""
    http11 = getattr(getattr(httpcore, "_sync", None), "http11", None)
    conn = getattr(http11, "HTTP11Connection", None)
    if conn is not None and getattr(conn, "READ_NUM_BYTES", 0) < read_size:
        conn.READ_NUM_BYTES = read_size


def has_excess(response: httpx.Response) -> bool:
    """Did the server send bytes beyond its Content-Length? Checked once the announced body
    is in: data buffered by h11, or data waiting on the socket. Best effort: a server that
    sends the excess later is not seen."""
    stream = response.extensions.get("network_stream")
    if stream is None:
        return False
    if _h11_leftover(response):
        return True
    with contextlib.suppress(Exception):  # EOF/reset after the body is fine
        if stream.get_extra_info("is_readable"):
            return bool(stream.read(1, timeout=0.01))
    return False


def _h11_leftover(response: httpx.Response) -> bool:
    """Bytes h11 received past the end of the body."""
    trailing = _h11_trailing(response)
    return bool(trailing and trailing[0])


def _h11_trailing(response: httpx.Response) -> tuple[bytes, bool] | None:
    """h11's buffered, unprocessed bytes (walks httpx -> httpcore -> h11)."""
    layer: object = response.stream
    for _ in range(8):
        conn = getattr(layer, "_connection", None)
        if conn is not None:
            trailing = getattr(getattr(conn, "_h11_state", None), "trailing_data", None)
            return trailing if isinstance(trailing, tuple) else None
        layer = getattr(layer, "_stream", None) or getattr(layer, "_httpcore_stream", None)
        if layer is None:
            return None
    return None


class RawBody:
    """The remaining ``length`` bytes of a body, read from the socket into one reused buffer.

    Each chunk is a view of that buffer, valid until the next one is asked for (the sink writes
    it at once). Errors are httpx's, so the retry rule sees what it would see from httpx.
    ``on_idle`` is called about every ``IDLE_TICK`` seconds of silence (an exception from it
    ends the body: a stop request reaches a stalled download at once, not after ``timeout``).
    """

    IDLE_TICK = 1.0

    def __init__(
        self,
        sock: socket.socket,
        buffered: bytes,
        length: int,
        timeout: float,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self._sock, self._buffered, self._length, self._timeout = sock, buffered, length, timeout
        self._on_idle = on_idle
        self.excess = len(buffered) > length

    def __iter__(self) -> Iterator[bytes | memoryview]:
        first = self._buffered[: self._length]
        left = self._length - len(first)
        if first:
            yield first
        buf = memoryview(bytearray(min(max(left, 1), 1024 * 1024)))
        tick = min(self._timeout, self.IDLE_TICK) if self._on_idle else self._timeout
        self._sock.settimeout(tick)
        silent = 0.0
        while left > 0:
            try:
                n = self._sock.recv_into(buf, min(left, len(buf)))
            except TimeoutError as exc:
                silent += tick
                if silent >= self._timeout:
                    raise httpx.ReadTimeout(f"no byte for {self._timeout:.0f} s") from exc
                if self._on_idle:
                    self._on_idle()
                continue
            except OSError as exc:
                raise httpx.ReadError(str(exc)) from exc
            if n == 0:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            left -= n
            silent = 0.0
            yield buf[:n]
        if not self.excess:
            with contextlib.suppress(OSError):
                self._sock.settimeout(0.01)
                self.excess = bool(self._sock.recv(1, socket.MSG_PEEK))


def raw_body(
    response: httpx.Response,
    length: int,
    timeout: float,
    on_idle: Callable[[], None] | None = None,
) -> RawBody | None:
    """A ``RawBody`` for the rest of this response's body, or None (then use ``iter_raw``):
    only for a plain HTTP/1.1 socket stream (TLS included, not TLS inside a proxy tunnel)."""
    stream = response.extensions.get("network_stream")
    trailing = _h11_trailing(response)
    if type(stream) is not SyncStream or trailing is None or response.http_version != "HTTP/1.1":
        return None
    sock = stream.get_extra_info("socket")
    if not isinstance(sock, socket.socket):
        return None
    return RawBody(sock, trailing[0], length, timeout, on_idle)

"""The one place that reaches into httpx/httpcore internals (versions pinned in pyproject.toml).

Why it exists: two things the download needs have no public API.

- The socket read size. httpcore's HTTP/1.1 connection reads ``READ_NUM_BYTES`` (64 KiB) per
  call; 256 KiB reads cut the receiving thread's CPU per byte, which is what bounds the
  download on a fast link (measured with bench/bench_download.py --read-kib).
- Bytes past the announced Content-Length: httpx silently drops them, and h11 may already hold
  them in its buffer when the body ends, where no socket check can see them.

Both degrade safely: if the layout changes, the read size stays httpcore's default and the excess
check falls back to the socket alone.
"""

from __future__ import annotations

import contextlib

import httpcore
import httpx


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
    """Bytes h11 received past the end of the body (walks httpx -> httpcore -> h11)."""
    layer: object = response.stream
    for _ in range(8):
        conn = getattr(layer, "_connection", None)
        if conn is not None:
            state = getattr(conn, "_h11_state", None)
            trailing = getattr(state, "trailing_data", None)
            return bool(trailing and trailing[0])
        layer = getattr(layer, "_stream", None) or getattr(layer, "_httpcore_stream", None)
        if layer is None:
            return False
    return False

"""What to do with an answer to an image request: pure decisions, no I/O.

Why it looks like this: a resumed download is only correct if the bytes that come back continue
*the same file* exactly where the local copy stops. Every rule for that lives here, in functions
of (status, headers, what we know), so each case is one row of a table test:

- ``plan_range``: resume with ``Range`` + ``If-Range`` only with a validator that proves the file
  is the same (a strong ETag, else Last-Modified); through a caching proxy that did not serve
  the previous answer from its cache, start over with a plain GET instead, which the cache can
  store and share between a fleet of agents (squid does not cache ranges it forwards).
- ``judge``: 206 continues only when its Content-Range starts at our byte, runs to the end, and
  neither the total size nor the ETag changed; 200 (range ignored, or If-Range did not match)
  means the body is the whole file again; 416 on a resume means the file shrank or changed.
"""

from __future__ import annotations

import email.utils
import enum
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from agent.retry_policy import is_retryable_status


class Verdict(enum.Enum):
    CONTINUE = "continue"  # a 206 that appends to what we have
    FRESH = "fresh"  # a 200: the body is the whole file; drop what we have and take it
    RESTART = "restart"  # drop what we have, then try again (a retryable failure)
    RETRY = "retry"  # a retryable answer; what we have stays valid
    FAIL = "fail"  # no retry can fix it


@dataclass(frozen=True)
class Known:
    """What the first full answer told us about the remote file."""

    total: int | None = None
    etag: str | None = None


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    total: int | None = None  # the file's size when the answer tells it
    retry_after: float | None = None


def plan_range(done: int, validator: str | None, via_proxy: bool, cached: bool) -> int:
    """The byte to resume from: ``done``, or 0 for a plain GET of the whole file."""
    if done <= 0 or not validator:
        return 0
    if via_proxy and not cached:
        return 0
    return done


def judge(status: int, headers: Mapping[str, str], start: int, known: Known) -> Decision:
    """The verdict on an answer to a request that asked for bytes ``start``- (0: all)."""
    if is_retryable_status(status):
        return Decision(Verdict.RETRY, f"HTTP {status}", None, parse_retry_after(headers))
    resuming = start > 0
    if status == 416 and resuming:
        return Decision(Verdict.RESTART, "HTTP 416 on resume: the remote file changed")
    if status == 206 and resuming:
        return _judge_partial(headers, start, known)
    if status != 200:
        return Decision(Verdict.FAIL, f"HTTP {status}")
    return Decision(Verdict.FRESH, "", content_length(headers))


def _judge_partial(headers: Mapping[str, str], start: int, known: Known) -> Decision:
    raw = headers.get("content-range")
    parsed = parse_content_range(raw)
    etag = headers.get("etag")
    problem = ""
    if parsed is None:
        problem = f"bad Content-Range {raw!r}"
    elif parsed[0] != start or parsed[2] is None or parsed[1] != parsed[2] - 1:
        problem = f"Content-Range {raw} does not continue byte {start}"
    elif known.total is not None and parsed[2] != known.total:
        problem = f"total size changed from {known.total} to {parsed[2]}"
    elif etag and known.etag and etag != known.etag:
        problem = "ETag changed"
    else:
        length = content_length(headers)
        if length is not None and length != parsed[1] - parsed[0] + 1:
            problem = "Content-Length does not match Content-Range"
    if problem or parsed is None:
        return Decision(Verdict.RESTART, f"cannot resume: {problem}")
    return Decision(Verdict.CONTINUE, "", parsed[2])


def validator(headers: Mapping[str, str]) -> str | None:
    """What to send in ``If-Range``: a strong ETag, else Last-Modified (weak ETags may not)."""
    etag = headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("last-modified")


def served_from_cache(headers: Mapping[str, str]) -> bool:
    """Did a cache answer (RFC 9111 ``Age``, RFC 9211 ``Cache-Status``, squid's ``X-Cache``)?"""
    age = headers.get("age", "").strip()
    if age.isdigit() and int(age) > 0:
        return True
    status = headers.get("cache-status", "").lower()
    if "hit" in status and "fwd=" not in status:
        return True
    return headers.get("x-cache", "").upper().startswith("HIT")


def content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``(first, last, total)`` of a ``Content-Range: bytes a-b/n`` header, None if malformed."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None
    first, last = int(m[1]), int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total

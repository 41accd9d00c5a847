"""The resume validator's table: (status, headers, resume point, what we knew) -> verdict."""

from __future__ import annotations

import pytest

from agent.resume import (
    Known,
    Verdict,
    judge,
    parse_content_range,
    parse_retry_after,
    plan_range,
    served_from_cache,
    validator,
)

N = 1000  # the file's size
K = Known(total=N, etag='"v1"')
C, F, R, T, X = Verdict.CONTINUE, Verdict.FRESH, Verdict.RESTART, Verdict.RETRY, Verdict.FAIL


def cr(first: int, last: int = N - 1, total: int | str = N) -> dict[str, str]:
    return {"content-range": f"bytes {first}-{last}/{total}"}


@pytest.mark.parametrize(
    ("status", "headers", "start", "known", "verdict", "why"),
    [
        # a first request (start 0)
        (200, {"content-length": str(N)}, 0, Known(), F, ""),
        (200, {}, 0, Known(), F, ""),  # close-delimited: the sink finds the end
        (206, cr(0), 0, Known(), X, "HTTP 206"),  # we did not ask for a range
        (404, {}, 0, Known(), X, "HTTP 404"),
        (401, {}, 0, Known(), X, "HTTP 401"),
        (416, {}, 0, Known(), X, "HTTP 416"),
        (503, {"retry-after": "2"}, 0, Known(), T, "HTTP 503"),
        (429, {}, 0, Known(), T, "HTTP 429"),
        (408, {}, 0, Known(), T, "HTTP 408"),
        (599, {}, 0, Known(), T, "HTTP 599"),
        # a resume at byte 400
        (206, cr(400), 400, K, C, ""),
        (206, {**cr(400), "etag": '"v1"', "content-length": "600"}, 400, K, C, ""),
        (206, cr(400, total="*"), 400, K, R, "does not continue"),
        (206, cr(10), 400, K, R, "does not continue byte 400"),
        (206, cr(400, 800), 400, K, R, "does not continue"),  # stops before the end
        (206, cr(400, 1199, 1200), 400, K, R, "total size changed"),
        (206, {**cr(400), "etag": '"v2"'}, 400, K, R, "ETag changed"),
        (206, {**cr(400), "content-length": "5"}, 400, K, R, "Content-Length does not match"),
        (206, {"content-range": "bytes */1000"}, 400, K, R, "bad Content-Range"),
        (206, {}, 400, K, R, "bad Content-Range"),
        (200, {"content-length": str(N)}, 400, K, F, ""),  # range ignored / If-Range mismatch
        (416, {}, 400, K, R, "416 on resume"),
        (503, {}, 400, K, T, "HTTP 503"),  # what we have stays valid
        (403, {}, 400, K, X, "HTTP 403"),
    ],
)
def test_judge(status, headers, start, known, verdict, why) -> None:  # type: ignore[no-untyped-def]
    decision = judge(status, headers, start, known)
    assert decision.verdict is verdict
    assert why in decision.reason
    if verdict in (C, F) and (headers.get("content-length") or headers.get("content-range")):
        assert decision.total == N


def test_judge_passes_retry_after() -> None:
    assert judge(503, {"retry-after": "7"}, 0, Known()).retry_after == 7.0
    assert judge(503, {}, 0, Known()).retry_after is None


@pytest.mark.parametrize(
    ("done", "validator_", "via_proxy", "cached", "start"),
    [
        (0, '"v1"', False, False, 0),
        (500, '"v1"', False, False, 500),
        (500, None, False, False, 0),  # nothing proves the file is the same: start over
        (500, '"v1"', True, False, 0),  # the proxy had no copy: a GET it can cache and share
        (500, '"v1"', True, True, 500),  # the proxy serves it from its cache: a Range is cheap
    ],
)
def test_plan_range(done, validator_, via_proxy, cached, start) -> None:  # type: ignore[no-untyped-def]
    assert plan_range(done, validator_, via_proxy, cached) == start


def test_validator_prefers_a_strong_etag() -> None:
    lm = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert validator({"etag": '"a"', "last-modified": lm}) == '"a"'
    assert validator({"etag": 'W/"a"', "last-modified": lm}) == lm
    assert validator({}) is None


def test_served_from_cache() -> None:
    assert served_from_cache({"age": "3"})
    assert not served_from_cache({"age": "0"})
    assert served_from_cache({"x-cache": "HIT from squid"})
    assert not served_from_cache({"x-cache": "MISS from squid"})
    assert served_from_cache({"cache-status": "nginx; hit"})
    assert not served_from_cache({"cache-status": "nginx; fwd=uri-miss"})
    assert not served_from_cache({})


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    date = {"retry-after": "Thu, 01 Jan 1970 00:01:40 GMT"}
    assert parse_retry_after(date, now=40.0) == 60.0


def test_parse_content_range() -> None:
    assert parse_content_range("bytes 10-19/20") == (10, 19, 20)
    assert parse_content_range("bytes 10-19/*") == (10, 19, None)
    assert parse_content_range("bytes 10-20/20") is None
    assert parse_content_range("bytes 19-10/20") is None
    assert parse_content_range("items 1-2/3") is None

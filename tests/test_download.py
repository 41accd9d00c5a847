"""The download engine against a real, misbehaving HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import messages as msg
from agent.download import DownloadSettings, download
from agent.messages import InstallError
from tests.badserver import BadServer, Origin, send_head, serve

PAYLOAD = os.urandom(3 * 1024 * 1024 + 12345)
FAST = DownloadSettings(
    connect_timeout=2,
    stall_timeout=0.5,
    total_timeout=20,
    outage_tolerance=1.5,
    backoff_initial=0.01,
    backoff_max=0.05,
    retry_after_cap=2,
)
GiB = 1024**3
TiB = 1024**4


@pytest.fixture
def server() -> Iterator[BadServer]:
    srv = BadServer(PAYLOAD).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "dl"
    d.mkdir()
    return d / "image"


def fetch(url: str, dest: Path, **kw):  # type: ignore[no-untyped-def]
    args = {
        "headers": {},
        "image_type": "qcow2",
        "checksum_type": "sha256",
        "memory_budget": 8 * GiB,
        "settings": FAST,
    }
    args.update(kw)
    return download(url, dest, **args)


def assert_ok(result, dest: Path, data: bytes = PAYLOAD) -> None:  # type: ignore[no-untyped-def]
    assert result.path == dest
    assert result.size == len(data)
    assert dest.read_bytes() == data
    assert result.digest == hashlib.sha256(data).hexdigest()


def assert_failed(exc: pytest.ExceptionInfo[InstallError], url: str, dest: Path) -> None:
    assert exc.value.message == msg.download_failed(url)
    assert list(dest.parent.iterdir()) == []


def route(server: BadServer, path: str):  # type: ignore[no-untyped-def]
    def register(fn):  # type: ignore[no-untyped-def]
        server.routes[path] = fn
        return fn

    return register


# --- the happy path -----------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["md5", "sha1", "sha256", "sha512", None])
def test_plain_download_and_digests(server: BadServer, out: Path, ctype: str | None) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    seen: list[tuple[int, int | None]] = []
    result = fetch(
        server.url("/img"), out, checksum_type=ctype, on_progress=lambda d, t: seen.append((d, t))
    )
    assert out.read_bytes() == PAYLOAD
    assert result.digest == (hashlib.new(ctype, PAYLOAD).hexdigest() if ctype else None)
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert all(d <= len(PAYLOAD) for d, _ in seen)
    req = server.requests[0]
    assert req.header("accept-encoding") == "identity"
    assert req.header("range") is None


def test_request_headers_are_sent(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    fetch(server.url("/img"), out, headers={"X-Token-Id": "abc123"})
    assert server.requests[0].header("x-token-id") == "abc123"


# --- drops and resume ---------------------------------------------------------------------------


def test_drop_resumes_with_range(server: BadServer, out: Path) -> None:
    half = len(PAYLOAD) // 2

    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        serve(s, sock, req, cut_at=half if n == 1 else None)

    assert_ok(fetch(server.url("/img"), out), out)
    assert server.count("/img") == 2
    second = server.requests[1]
    assert second.header("range") == f"bytes={half}-"
    assert second.header("if-range") == '"v1"'


def test_drop_resumes_with_last_modified(server: BadServer, out: Path) -> None:
    lm = "Wed, 21 Oct 2015 07:28:00 GMT"

    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        serve(s, sock, req, etag=None, cut_at=1000 if n == 1 else None,
              extra_headers={"Last-Modified": lm})  # fmt: skip

    assert_ok(fetch(server.url("/img"), out), out)
    assert server.requests[1].header("if-range") == lm


def test_drop_without_range_support_starts_over(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        serve(s, sock, req, ranges=False, cut_at=len(PAYLOAD) // 3 if n <= 2 else None)

    assert_ok(fetch(server.url("/img"), out), out)
    assert server.count("/img") == 3  # each drop made progress, so it is not counted as stuck


def test_changed_file_on_resume_starts_over(server: BadServer, out: Path) -> None:
    new = os.urandom(len(PAYLOAD))

    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        if n == 1:
            serve(s, sock, req, cut_at=5000)
        else:  # If-Range "v1" no longer matches: the server sends the new file whole (200)
            serve(s, sock, req, data=new, etag='"v2"')

    assert_ok(fetch(server.url("/img"), out), out, data=new)


def test_bad_content_range_starts_over(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        if n == 1:
            serve(s, sock, req, cut_at=5000)
        elif n == 2:  # a 206 that does not continue where we stopped
            body = PAYLOAD[10:]
            send_head(sock, "206 Partial Content", {
                "Content-Range": f"bytes 10-{len(PAYLOAD) - 1}/{len(PAYLOAD)}",
                "Content-Length": len(body), "ETag": '"v1"', "Connection": "close"})  # fmt: skip
            sock.sendall(body)
        else:
            serve(s, sock, req)

    assert_ok(fetch(server.url("/img"), out), out)
    assert server.requests[2].header("range") is None


def test_drop_every_time_fails(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req, ranges=False, cut_at=100)
    url = server.url("/img")
    with pytest.raises(InstallError) as exc:
        fetch(url, out, settings=FAST)
    assert_failed(exc, url, out)
    assert "ended" in exc.value.detail or "peer closed" in exc.value.detail


def test_chunked_body_cut_is_not_complete(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        send_head(sock, "200 OK", {"Transfer-Encoding": "chunked", "Connection": "close"})
        sock.sendall(b"%x\r\n" % 4096 + PAYLOAD[:4096] + b"\r\n")  # no final 0-chunk

    url = server.url("/img")
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert server.count("/img") >= 3  # retried until the outage tolerance ran out
    assert "outage tolerance" in exc.value.detail


# --- lies about the length ----------------------------------------------------------------------


def test_content_length_too_high_fails(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(
        s, sock, req, length=len(PAYLOAD) + 1000, ranges=False
    )
    url = server.url("/img")
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)


def test_content_length_too_low_fails(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req, length=len(PAYLOAD) - 1000)
    url = server.url("/img")
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert "more than" in exc.value.detail
    assert server.count("/img") == 1  # a lie is not retried


# --- stalls and time limits ---------------------------------------------------------------------


def test_stall_then_resume(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        if n == 1:
            serve(s, sock, req, cut_at=100_000)  # never closes: stalls
            s.sleep(30)
        else:
            serve(s, sock, req)

    t0 = time.monotonic()
    assert_ok(fetch(server.url("/img"), out), out)
    assert time.monotonic() - t0 < 5
    assert server.requests[1].header("range") == "bytes=100000-"


def test_stall_forever_fails(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        send_head(sock, "200 OK", {"Content-Length": len(PAYLOAD)})
        s.sleep(30)

    url = server.url("/img")
    t0 = time.monotonic()
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert "Timeout" in exc.value.detail
    assert time.monotonic() - t0 < 8


def test_total_time_limit(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        send_head(sock, "200 OK", {"Content-Length": len(PAYLOAD), "Connection": "close"})
        for i in range(0, len(PAYLOAD), 1000):  # slow but never stalled
            sock.sendall(PAYLOAD[i : i + 1000])
            s.sleep(0.02)

    url = server.url("/img")
    settings = DownloadSettings(stall_timeout=0.5, total_timeout=1.0, backoff_initial=0.01)
    with pytest.raises(InstallError) as exc:
        fetch(url, out, settings=settings)
    assert_failed(exc, url, out)
    assert "longer than" in exc.value.detail


# --- statuses -----------------------------------------------------------------------------------


def test_503_honours_retry_after(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        if n == 1:
            send_head(sock, "503 Service Unavailable", {"Retry-After": 1, "Content-Length": 0})
        else:
            serve(s, sock, req)

    t0 = time.monotonic()
    assert_ok(fetch(server.url("/img"), out), out)
    assert time.monotonic() - t0 >= 1.0  # Retry-After is a minimum; the jitter comes on top


def test_retry_after_is_capped(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        if n == 1:
            send_head(sock, "429 Too Many Requests", {"Retry-After": 3600, "Content-Length": 0})
        else:
            serve(s, sock, req)

    t0 = time.monotonic()
    settings = DownloadSettings(backoff_initial=0.01, retry_after_cap=0.3)
    assert_ok(fetch(server.url("/img"), out, settings=settings), out)
    assert 0.25 <= time.monotonic() - t0 < 3


def test_429_retried_then_gives_up(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: send_head(
        sock, "429 Too Many Requests", {"Content-Length": 0}
    )
    url = server.url("/img")
    t0 = time.monotonic()
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert time.monotonic() - t0 >= FAST.outage_tolerance - FAST.backoff_max  # time, not count
    assert server.count("/img") >= 3
    assert "429" in exc.value.detail and "outage tolerance" in exc.value.detail


@pytest.mark.parametrize("status", ["404 Not Found", "403 Forbidden", "410 Gone"])
def test_other_4xx_is_final(server: BadServer, out: Path, status: str) -> None:
    server.routes["/img"] = lambda s, sock, req, n: send_head(sock, status, {"Content-Length": 0})
    url = server.url("/img")
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert server.count("/img") == 1


def test_connection_refused(tmp_path: Path, out: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/img"
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)


# --- authentication and redirects ---------------------------------------------------------------

BASIC = "Basic " + base64.b64encode(b"user:s3cr3t-pw").decode()


def _auth_route(s, sock, req, n):  # type: ignore[no-untyped-def]
    if req.header("authorization") != BASIC:
        send_head(sock, "401 Unauthorized", {"WWW-Authenticate": 'Basic realm="x"',
                                             "Content-Length": 0})  # fmt: skip
    else:
        serve(s, sock, req)


def test_401_without_header(server: BadServer, out: Path) -> None:
    server.routes["/img"] = _auth_route
    url = server.url("/img")
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert server.count("/img") == 1


def test_basic_header_succeeds(server: BadServer, out: Path) -> None:
    server.routes["/img"] = _auth_route
    assert_ok(fetch(server.url("/img"), out, headers={"Authorization": BASIC}), out)


def test_url_password_works_and_never_shows(
    server: BadServer, out: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.routes["/img"] = _auth_route
    assert_ok(fetch(server.url("/img", userinfo="user:s3cr3t-pw"), out), out)
    bad = server.url("/nope", userinfo="user:s3cr3t-pw")
    with pytest.raises(InstallError) as exc:
        fetch(bad, out)
    assert exc.value.message == msg.download_failed(server.url("/nope", userinfo="user:***"))
    for text in (exc.value.message, exc.value.detail, caplog.text):
        assert "s3cr3t-pw" not in text
        assert BASIC.split()[1] not in text
    assert "user:***@" in caplog.text


def test_authorization_never_logged(
    server: BadServer, out: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.routes["/img"] = lambda s, sock, req, n: serve(
        s, sock, req, cut_at=1000 if n == 1 else None
    )
    fetch(server.url("/img"), out, headers={"Authorization": BASIC})
    assert server.count("/img") == 2
    assert BASIC.split()[1] not in caplog.text


def test_redirect_followed(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    server.routes["/r1"] = lambda s, sock, req, n: send_head(
        sock, "302 Found", {"Location": "/r2", "Content-Length": 0}
    )
    server.routes["/r2"] = lambda s, sock, req, n: send_head(
        sock, "301 Moved", {"Location": s.url("/img"), "Content-Length": 0}
    )
    assert_ok(fetch(server.url("/r1"), out), out)
    assert [r.path for r in server.requests] == ["/r1", "/r2", "/img"]


def test_redirect_loop_fails(server: BadServer, out: Path) -> None:
    server.routes["/a"] = lambda s, sock, req, n: send_head(
        sock, "302 Found", {"Location": "/b", "Content-Length": 0}
    )
    server.routes["/b"] = lambda s, sock, req, n: send_head(
        sock, "302 Found", {"Location": "/a", "Content-Length": 0}
    )
    url = server.url("/a")
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert len(server.requests) == FAST.max_redirects + 1  # not retried


def test_authorization_dropped_on_foreign_redirect(server: BadServer, out: Path) -> None:
    # 127.0.0.1 -> localhost: same machine, another origin for the client.
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    server.routes["/away"] = lambda s, sock, req, n: send_head(
        sock, "302 Found", {"Location": s.url("/img", host="localhost"), "Content-Length": 0}
    )
    server.routes["/here"] = lambda s, sock, req, n: send_head(
        sock, "302 Found", {"Location": "/img", "Content-Length": 0}
    )
    headers = {"Authorization": BASIC, "X-Auth-Token": "tok-12345", "X-Plain": "kept"}
    assert_ok(fetch(server.url("/here"), out, headers=headers), out)
    out.unlink()
    assert_ok(fetch(server.url("/away"), out, headers=headers), out)
    same, foreign = server.requests[1], server.requests[3]
    assert (same.header("authorization"), same.header("x-auth-token")) == (BASIC, "tok-12345")
    assert foreign.header("authorization") is None
    assert foreign.header("x-auth-token") is None
    assert foreign.header("x-plain") is None  # every header the request brought is dropped
    assert same.header("x-plain") == "kept"


def test_redirect_to_https_is_verified(
    server: BadServer, out: Path, https_dir: tuple[Path, str, Path]
) -> None:
    """The trust store is loaded at the first TLS handshake, not up front: an http URL that
    redirects to https is still verified, and the CA bundle still applies."""
    root, base_url, ca_file = https_dir
    (root / "img").write_bytes(PAYLOAD)
    https_url = f"{base_url}/img"
    server.routes["/r"] = lambda s, sock, req, n: send_head(
        sock, "302 Found", {"Location": https_url, "Content-Length": 0}
    )
    url = server.url("/r")
    with pytest.raises(InstallError) as exc:
        fetch(url, out)
    assert_failed(exc, url, out)
    assert "CERTIFICATE_VERIFY_FAILED" in exc.value.detail
    trusted = dataclasses.replace(FAST, ca_bundle=str(ca_file))
    assert_ok(fetch(url, out, settings=trusted), out)
    assert_ok(fetch(https_url, out, settings=trusted), out)


# --- memory budget ------------------------------------------------------------------------------


def test_100_tib_refused_before_any_byte(server: BadServer, out: Path) -> None:
    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        send_head(sock, "200 OK", {"Content-Length": 100 * TiB})
        sock.sendall(PAYLOAD)
        s.sleep(30)

    seen: list[int] = []
    with pytest.raises(InstallError) as exc:
        fetch(server.url("/img"), out, image_type="raw", on_progress=lambda d, t: seen.append(d))
    assert exc.value.message == msg.too_big_for_memory("raw")
    assert exc.value.message == "Could not download, raw image is too big to download in memory."
    assert set(seen) <= {0}
    assert list(out.parent.iterdir()) == []
    assert server.count("/img") == 1


def test_missing_length_over_budget_aborts_early(server: BadServer, out: Path) -> None:
    sent = []

    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        send_head(sock, "200 OK", {"Connection": "close"})
        for _ in range(1000):  # up to 3 GiB if nobody stops it
            sock.sendall(PAYLOAD)
            sent.append(len(PAYLOAD))

    budget = 2 * len(PAYLOAD)
    with pytest.raises(InstallError) as exc:
        fetch(server.url("/img"), out, memory_budget=budget)
    assert exc.value.message == msg.too_big_for_memory("qcow2")
    assert list(out.parent.iterdir()) == []
    assert sum(sent) < 20 * len(PAYLOAD)


def test_within_budget_without_length(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req, length=None)
    result = fetch(server.url("/img"), out, memory_budget=len(PAYLOAD))
    assert_ok(result, out)
    assert not result.length_verified  # the end of a close-delimited body is unverifiable


def test_length_verified_with_content_length(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    assert fetch(server.url("/img"), out).length_verified


def test_budget_exact_and_one_byte_short(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    assert_ok(fetch(server.url("/img"), out, memory_budget=len(PAYLOAD)), out)
    out.unlink()
    with pytest.raises(InstallError) as exc:
        fetch(server.url("/img"), out, memory_budget=len(PAYLOAD) - 1)
    assert exc.value.message == msg.too_big_for_memory("qcow2")


# --- proxies ------------------------------------------------------------------------------------


def test_http_proxy_is_used(server: BadServer, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bad server plays the proxy: it receives the absolute URL as the request target.
    server.routes["http://image.example.invalid/img"] = lambda s, sock, req, n: serve(s, sock, req)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url(""))
    assert_ok(fetch("http://image.example.invalid/img", out), out)
    assert server.requests[0].path == "http://image.example.invalid/img"


def test_no_proxy_bypasses_proxy(
    server: BadServer, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert_ok(fetch(server.url("/img"), out), out)


# --- outages, connection reuse, proxies ----------------------------------------------------------


@pytest.fixture
def origin() -> Iterator[Origin]:
    srv = Origin(PAYLOAD, retry_after=0).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_error_bodies_are_read_so_the_connection_is_reused(origin: Origin, out: Path) -> None:
    origin.outage(0.3)
    assert_ok(fetch(origin.url(), out), out)
    statuses = [h.status for h in origin.hits]
    assert statuses.count(503) >= 2 and statuses[-1] == 200
    assert {h.connection for h in origin.hits} == {1}  # one connection for every attempt


def test_outage_is_bounded_by_time_not_by_a_count(origin: Origin, out: Path) -> None:
    origin.outage(2.5)
    settings = DownloadSettings(backoff_initial=0.05, backoff_max=0.2, outage_tolerance=1.0)
    with pytest.raises(InstallError) as exc:
        fetch(origin.url(), out, settings=settings)
    assert "outage tolerance" in exc.value.detail and "503" in exc.value.detail
    out.parent.mkdir(exist_ok=True)
    origin.outage(2.5)
    settings = DownloadSettings(backoff_initial=0.05, backoff_max=0.2, outage_tolerance=10)
    assert_ok(fetch(origin.url(), out, settings=settings), out)
    assert sum(h.status == 503 for h in origin.hits) >= 10  # far more than the old 8 answers


def test_on_progress_exception_propagates_and_the_file_is_removed(
    server: BadServer, out: Path
) -> None:
    class Cancelled(Exception):
        pass

    cancel = Cancelled("operator cancelled")
    calls: list[int] = []

    def on_progress(done: int, total: int | None) -> None:
        calls.append(done)
        if done > len(PAYLOAD) // 3:
            raise cancel

    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    settings = DownloadSettings(progress_interval=0.0)
    with pytest.raises(Cancelled) as exc:
        fetch(server.url("/img"), out, on_progress=on_progress, settings=settings)
    assert exc.value is cancel
    assert not out.exists()
    assert server.count("/img") == 1  # not retried
    assert len(calls) > 3  # called often, not only at the start and the end


def test_max_rate_caps_the_bandwidth(server: BadServer, out: Path) -> None:
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    rate = 2 * 1024 * 1024
    t0 = time.monotonic()
    assert_ok(fetch(server.url("/img"), out, settings=DownloadSettings(max_rate=rate)), out)
    elapsed = time.monotonic() - t0
    print(f"\n{len(PAYLOAD)} bytes at --max-rate {rate}: {len(PAYLOAD) / elapsed / 1e6:.2f} MB/s")
    # a bucket of one second: the first second's worth comes at once, the rest at the rate
    assert elapsed >= (len(PAYLOAD) - rate) / rate * 0.95


def test_zero_blocks_become_holes_and_are_hashed(server: BadServer, out: Path) -> None:
    data = os.urandom(4096) + bytes(8 * 1024 * 1024) + os.urandom(5000) + bytes(300_000)
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req, data=data)
    assert_ok(fetch(server.url("/img"), out), out, data=data)
    allocated = out.stat().st_blocks * 512
    print(f"\n{len(data)} bytes of mostly zeros: {allocated} bytes allocated")
    assert allocated < len(data) // 2


def _proxy_route(cache_headers: dict[str, str | int]):  # type: ignore[no-untyped-def]
    def route(s, sock, req, n):  # type: ignore[no-untyped-def]
        half = len(PAYLOAD) // 2
        serve(s, sock, req, cut_at=half if n == 1 else None, extra_headers=cache_headers)

    return route


@pytest.mark.parametrize(
    ("cache_headers", "resumed"),
    [
        ({"X-Cache": "MISS from squid", "Via": "1.1 squid"}, False),
        ({"X-Cache": "HIT from squid", "Age": 12}, True),
        ({"Cache-Status": "nginx; hit"}, True),
    ],
)
def test_drop_through_a_proxy_resumes_only_from_its_cache(
    server: BadServer, out: Path, monkeypatch: pytest.MonkeyPatch, cache_headers, resumed
) -> None:
    """A proxy that was fetching from the origin keeps no partial copy (squid): a plain GET that
    it can cache and share beats a Range that it forwards uncached, once per agent."""
    url = "http://image.example.invalid/img"
    server.routes[url] = _proxy_route(cache_headers)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url(""))
    monkeypatch.setenv("http_proxy", server.url(""))
    assert_ok(fetch(url, out), out)
    second = server.requests[1].header("range")
    assert (second == f"bytes={len(PAYLOAD) // 2}-") if resumed else (second is None)


# --- a stop request reaches a download that is waiting -------------------------------------------


class Stop(Exception):
    """What a stop request raises from ``on_idle`` (the pipeline's Interrupted)."""


def _stop_after(seconds: float):  # type: ignore[no-untyped-def]
    """An ``on_idle`` that raises once ``seconds`` have passed; the calls it saw."""
    t0 = time.monotonic()
    calls: list[float] = []

    def on_idle() -> None:
        calls.append(time.monotonic() - t0)
        if calls[-1] >= seconds:
            raise Stop()

    return on_idle, calls


def test_stalled_body_sees_a_stop_within_a_second(server: BadServer, out: Path) -> None:
    """No byte for 30 s (the stall limit is 60 s): ``on_idle`` runs every second, and its
    exception ends the download at once, the partial file removed."""

    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        serve(s, sock, req, cut_at=100_000)  # never closes: stalls
        s.sleep(30)

    on_idle, calls = _stop_after(1.5)
    t0 = time.monotonic()
    with pytest.raises(Stop):
        fetch(server.url("/img"), out, settings=DownloadSettings(), on_idle=on_idle)
    assert time.monotonic() - t0 < 4
    assert len(calls) >= 2 and all(b - a >= 0.9 for a, b in zip(calls, calls[1:])), calls
    assert not out.exists()
    assert server.count("/img") == 1  # stopped, not retried


def test_retry_wait_sees_a_stop(server: BadServer, out: Path) -> None:
    """A 503 with Retry-After: 30: the wait before the next attempt is cut by a stop."""

    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        send_head(sock, "503 Service Unavailable", {"Retry-After": 30, "Content-Length": 0})

    on_idle, calls = _stop_after(1.0)
    t0 = time.monotonic()
    with pytest.raises(Stop):
        fetch(server.url("/img"), out, settings=DownloadSettings(), on_idle=on_idle)
    assert time.monotonic() - t0 < 4
    assert server.count("/img") == 1
    assert not out.exists()


def test_idle_hook_does_not_shorten_the_stall_limit(server: BadServer, out: Path) -> None:
    """With a hook that never stops, a stall still fails at the stall limit, not before."""

    @route(server, "/img")
    def _(s, sock, req, n):  # type: ignore[no-untyped-def]
        send_head(sock, "200 OK", {"Content-Length": len(PAYLOAD)})
        s.sleep(30)

    calls: list[float] = []
    settings = DownloadSettings(stall_timeout=2.0, max_attempts=1, backoff_initial=0.01)
    t0 = time.monotonic()
    with pytest.raises(InstallError) as exc:
        fetch(server.url("/img"), out, settings=settings, on_idle=lambda: calls.append(1))
    elapsed = time.monotonic() - t0
    assert "Timeout" in exc.value.detail
    assert 1.9 <= elapsed < 6, elapsed
    assert len(calls) >= 1

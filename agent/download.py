"""The download engine: stream the image into a tmpfs file, hashing it in flight.

This module runs the transfer: the HTTP client, the retry loop and the handling of each answer.
The decisions live in their own modules, each with its table of tests:

- agent/retry_policy.py: what is retried (5xx, 429, 408, connection errors, drops), how long
  to wait (full jitter on top of Retry-After) and for how long (the outage tolerance, in time).
- agent/resume.py: what an answer means for the local copy (continue / start over / fail).
- agent/image_sink.py: the file, the running hash, the RAM budget, progress and the rate cap.

Why the transfer looks like this:

- Drops are resumed with ``Range`` + ``If-Range`` so that the running hash simply continues;
  through a caching proxy that did not serve the file from its cache, a drop starts over with a
  plain GET instead, which the proxy can store and share with the rest of the fleet.
- A short body is never accepted as complete, and neither is a body longer than announced.
- A body with a Content-Length is read straight from the socket into one reused buffer
  (agent/httpx_shim.py): through h11 it cost a 2 GB download 50 % more CPU than curl's, and on a
  small machine the receiving thread's CPU is the download's speed.
- Error bodies are read (up to ``error_body_limit``) so the connection is reused, to the proxy
  as to the origin, instead of being torn down on every 503.
- Secrets never reach a log line or a message: the URL's password is taken out of the URL and
  sent as Basic auth (httpx logs the URL), and on a redirect to another origin every header the
  request brought is dropped, whatever its name.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import tenacity

from agent import httpx_shim, resume
from agent import messages as msg
from agent.image_sink import Overrun, ProgressCallback, Sink, TooBig, WriteFailed
from agent.messages import InstallError
from agent.redact import is_sensitive_header, redact_url, register_secret, scrub, url_secrets
from agent.retry_policy import RetryPolicy

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class DownloadSettings:
    """Knobs of the download engine; the defaults suit a real install, tests shrink the delays.

    ``read_size`` and ``hash_block`` were chosen with bench/bench_download.py (see the shim for
    the read size). ``outage_tolerance`` is how long the origin may answer 5xx, refuse
    connections or stall before the install gives up: minutes, so a fleet sits out a restart.
    """

    connect_timeout: float = 30.0
    stall_timeout: float = 60.0  # no byte at all for this long: the attempt fails (retried)
    total_timeout: float = 4 * 3600.0  # the whole download, retries and waits included
    outage_tolerance: float = 600.0  # time without a byte of progress before giving up
    max_attempts: int | None = None  # also give up after this many failures in a row (tests)
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_after_cap: float = 120.0
    max_redirects: int = 10
    max_rate: float | None = None  # bytes per second; None: no cap
    error_body_limit: int = 64 * 1024  # error bodies up to this are read so connections stay
    ca_bundle: str | None = None  # extra CA file; the system store is used otherwise
    verify_tls: bool = True
    trust_env: bool = True  # HTTP(S)_PROXY / NO_PROXY / SSL_CERT_FILE
    read_size: int = 256 * 1024
    hash_block: int = 4 * MiB  # one of the blocks the download gathers, writes and hashes
    progress_interval: float = 0.1
    user_agent: str = "byoi-agent"


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    digest: str | None  # hex digest of checksum_type, None without a checksum type
    # False when the server sent neither Content-Length nor chunked encoding: the body ended when
    # the connection closed, so a truncation could not be told from the end of the file.
    length_verified: bool = True


class _Transient(Exception):
    """A failure worth another attempt (network, 408/429/5xx, short body)."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class _Final(Exception):
    """A failure that no retry can fix (4xx, redirect loop, protocol lie, time limit)."""


def download(
    url: str,
    dest: Path,
    *,
    headers: dict[str, str],
    image_type: str,
    checksum_type: str | None,
    memory_budget: int | None,
    on_progress: ProgressCallback | None = None,
    settings: DownloadSettings | None = None,
    on_idle: Callable[[], None] | None = None,
) -> DownloadResult:
    """Download ``url`` into ``dest``; returns its size and its ``checksum_type`` digest.

    Raises ``InstallError`` with OVHcloud's download or memory message; ``dest`` is removed then,
    and also when ``on_progress`` raises (its exception propagates unchanged). ``on_idle`` is
    called about once a second while no byte comes (a stalled body, a wait between attempts),
    so that a stop request can end the download then; its exception propagates the same way.
    A body read through httpx itself (chunked, or TLS through a proxy tunnel) is only seen idle
    at its stall timeout.
    """
    settings = settings or DownloadSettings()
    shown = redact_url(url)
    for name, value in headers.items():
        if is_sensitive_header(name):
            register_secret(value)
    target, auth = _split_credentials(url)
    started = time.monotonic()
    log.info("downloading %s into %s", shown, dest)
    try:
        sink = Sink(
            dest,
            checksum_type,
            memory_budget,
            on_progress,
            hash_block=settings.hash_block,
            progress_interval=settings.progress_interval,
            max_rate=settings.max_rate,
        )
        try:
            transfer = _Transfer(target, headers, sink, settings, on_idle)
            transfer.run(auth)
            digest = sink.finish()
        finally:
            sink.close()
    except TooBig as exc:
        _fail(dest, shown, exc, "refused")
        raise InstallError(msg.too_big_for_memory(image_type), scrub(str(exc))) from None
    except (_Final, _Transient, WriteFailed, Overrun) as exc:
        _fail(dest, shown, exc, "failed")
        raise InstallError(msg.download_failed(shown), scrub(str(exc))) from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    elapsed = max(time.monotonic() - started, 1e-9)
    size = sink.done
    log.info(
        "downloaded %s: %d bytes in %.1f s (%.0f MB/s)", shown, size, elapsed, size / elapsed / 1e6
    )
    if not transfer.delimited:
        log.warning(
            "%s came without Content-Length or chunked encoding: its end is unverified", shown
        )
    return DownloadResult(dest, size, digest, transfer.delimited)


def _fail(dest: Path, shown: str, exc: BaseException, what: str) -> None:
    dest.unlink(missing_ok=True)
    log.error("download of %s %s: %s", shown, what, scrub(str(exc)))


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without its userinfo, and the Basic-auth pair it carried.

    httpx would turn the userinfo into Basic auth anyway, but it also logs the URL verbatim.
    """
    for secret in url_secrets(url):  # also the signature of a pre-signed URL's query
        register_secret(secret)
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    password = unquote(parts.password or "")
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=hostport)), (unquote(parts.username or ""), password)


def via_proxy(url: str, trust_env: bool) -> bool:
    """Does the request go through a proxy from the environment (HTTP(S)_PROXY, NO_PROXY)?"""
    if not trust_env:
        return False
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


class _LazyTrust(ssl.SSLContext):
    """A verifying client context that loads its trust store at its first handshake.

    Parsing the system store (144 certificates here) takes 35 ms, on the path to the first byte,
    and a plain-http download never needs it; an http URL that redirects to https, or an https
    proxy, still verifies, because every TLS connection starts in ``wrap_socket`` (or
    ``wrap_bio``, TLS through a TLS proxy)."""

    ca_bundle: str | None = None
    _loaded = False
    _lock = threading.Lock()

    def _trust(self) -> None:
        with self._lock:
            if not self._loaded:
                # the system store (honouring SSL_CERT_FILE/SSL_CERT_DIR), not certifi's copy
                self.load_default_certs(ssl.Purpose.SERVER_AUTH)
                if self.ca_bundle:
                    self.load_verify_locations(cafile=self.ca_bundle)
                self._loaded = True

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._trust()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._trust()
        return super().wrap_bio(*args, **kwargs)


def _ssl_context(settings: DownloadSettings) -> ssl.SSLContext | bool:
    """What ``ssl.create_default_context()`` makes for a client (hostname checked, certificate
    required), with the trust store loaded on first use (``_LazyTrust``)."""
    if not settings.verify_tls:
        return False
    ctx = _LazyTrust(ssl.PROTOCOL_TLS_CLIENT)
    ctx.ca_bundle = settings.ca_bundle
    return ctx


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Transfer:
    """The attempts of one download: the client, the retry loop, and each answer's handling."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        sink: Sink,
        settings: DownloadSettings,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.on_idle = on_idle
        self.origin = _origin(httpx.URL(url))
        self.headers = dict(headers)
        self.sink = sink
        self.s = settings
        self.known = resume.Known()
        self.validator: str | None = None
        self.cached = False  # the last answer came from a cache
        self.high_water = 0  # the most bytes ever held: more is progress
        self.delimited = True  # the body's end is known (Content-Length, chunked, Content-Range)
        self.proxied = via_proxy(url, settings.trust_env)
        self.policy = RetryPolicy(
            outage_tolerance=settings.outage_tolerance,
            total_timeout=settings.total_timeout,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
            retry_after_cap=settings.retry_after_cap,
            max_failures=settings.max_attempts,
        )

    def run(self, auth: tuple[str, str] | None) -> None:
        httpx_shim.tune_read_size(self.s.read_size)
        with self._client(auth) as client:
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(_Transient),
                wait=self._wait,
                stop=self._stop,
                before_sleep=self._log_retry,
                sleep=self._sleep,
                reraise=True,
            )
            retrying(self._attempt, client)

    def _client(self, auth: tuple[str, str] | None) -> httpx.Client:
        s = self.s
        timeout = httpx.Timeout(
            connect=s.connect_timeout, read=s.stall_timeout, write=s.stall_timeout,
            pool=s.connect_timeout,
        )  # fmt: skip
        return httpx.Client(
            auth=auth,
            verify=_ssl_context(s),
            trust_env=s.trust_env,
            timeout=timeout,
            follow_redirects=True,
            max_redirects=s.max_redirects,
            headers={"User-Agent": s.user_agent, "Accept-Encoding": "identity"},
            event_hooks={"request": [self._strip_foreign_headers]},
        )

    def _strip_foreign_headers(self, request: httpx.Request) -> None:
        """On a redirect to another origin (scheme, host or port), drop every header the request
        brought, whatever its name (``X-Api-Key`` as well as ``Authorization``), and every
        secret-bearing one (httpx keeps Authorization on an http->https upgrade of one host)."""
        if _origin(request.url) == self.origin:
            return
        brought = {name.lower() for name in self.headers} - {"host"}
        for name in list(request.headers):
            if name.lower() in brought or is_sensitive_header(name):
                del request.headers[name]

    # -- the retry policy, seen by tenacity: one delay drawn per failed attempt --

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return self.policy.delay(exc.retry_after if isinstance(exc, _Transient) else None)

    def _sleep(self, seconds: float) -> None:
        """The wait between attempts, in slices of at most a second with ``on_idle`` between."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
            if self.on_idle:
                self.on_idle()

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        reason = self.policy.gives_up(state.upcoming_sleep)
        if reason:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("download: giving up after %d attempts: %s", state.attempt_number, reason)
            if exc is not None:
                exc.args = (f"{exc}; {reason}",)
        return reason is not None

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "download attempt %d failed (%s); retrying in %.1f s from byte %d",
            state.attempt_number, scrub(str(exc)), state.upcoming_sleep, self.sink.done,
        )  # fmt: skip

    # -- one attempt --

    def _attempt(self, client: httpx.Client) -> None:
        try:
            self._fetch(client)
        except httpx.TooManyRedirects as exc:
            raise _Final(f"too many redirects: {exc}") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError) as exc:
            raise _Final(f"{type(exc).__name__}: {exc}") from None
        except httpx.ConnectError as exc:
            if _is_certificate_error(exc):
                raise _Final(f"TLS certificate rejected: {exc}") from None
            self._failed()
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        except httpx.TransportError as exc:  # timeouts, resets, bodies that end early
            self._failed()
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        except _Transient:
            self._failed()
            raise

    def _failed(self) -> None:
        """Count a failed attempt; bytes never held before (past the high-water mark) are
        progress, so a server that drops at the same byte every time still runs out of time."""
        if self.sink.done > self.high_water:
            self.high_water = self.sink.done
            self.policy.progress()
        self.policy.failed()

    def _fetch(self, client: httpx.Client) -> None:
        headers = dict(self.headers)
        start = resume.plan_range(self.sink.done, self.validator, self.proxied, self.cached)
        if start:
            headers["Range"] = f"bytes={start}-"
            headers["If-Range"] = self.validator or ""
            log.info("resuming the download at byte %d", start)
        elif self.sink.done:
            why = "through a proxy that had no copy" if self.validator else "no ETag/Last-Modified"
            log.info("restarting the download from byte 0 (%s)", why)
            self._restart()
        with client.stream("GET", self.url, headers=headers) as response:
            self._answer(response, start)
            length = resume.content_length(response.headers)
            raw = None
            if length is not None and "transfer-encoding" not in response.headers:
                raw = httpx_shim.raw_body(response, length, self.s.stall_timeout, self.on_idle)
            for chunk in raw if raw is not None else response.iter_raw():
                self.sink.take(chunk)
                if self.policy.timed_out():
                    raise _Final(f"the download took longer than {self.s.total_timeout:.0f} s")
            total = self.sink.total
            if total is not None and self.sink.done != total:
                raise _Transient(f"body ended at byte {self.sink.done} of {total}")
            excess = raw.excess if raw is not None else httpx_shim.has_excess(response)
            if total is not None and excess:
                raise _Final(f"the server sent more than its Content-Length of {total}")
        self.sink.progress(force=True)

    def _answer(self, response: httpx.Response, start: int) -> None:
        """Act on the status and headers before the body (which is then the file's bytes)."""
        h = response.headers
        decision = resume.judge(response.status_code, h, start, self.known)
        verdict = decision.verdict
        if verdict in (resume.Verdict.RETRY, resume.Verdict.RESTART, resume.Verdict.FAIL):
            self._drain(response)
            if verdict is resume.Verdict.FAIL:
                raise _Final(f"HTTP {response.status_code} {response.reason_phrase}")
            if verdict is resume.Verdict.RESTART:
                self._restart()
            raise _Transient(decision.reason, decision.retry_after)
        self.cached = resume.served_from_cache(h)
        if verdict is resume.Verdict.CONTINUE:
            self.sink.expect(decision.total, "Content-Range")
            return
        if self.sink.done:
            log.info("the server did not resume (Range ignored or file changed): starting over")
            self._restart()
        self.delimited = (
            decision.total is not None or "chunked" in h.get("transfer-encoding", "").lower()
        )
        self.validator = resume.validator(h)
        self.known = resume.Known(decision.total, h.get("etag"))
        self.sink.expect(decision.total, "Content-Length")

    def _drain(self, response: httpx.Response) -> None:
        """Read a small error body to its end so the connection goes back to the pool; a large
        or endless one is cut (the connection is then closed, not reused)."""
        limit = self.s.error_body_limit
        length = resume.content_length(response.headers)
        if length is not None and length > limit:
            return
        seen = 0
        with contextlib.suppress(httpx.TransportError):  # the answer is what counts
            for chunk in response.iter_raw():
                seen += len(chunk)
                if seen > limit:
                    return

    def _restart(self) -> None:
        self.sink.restart()
        self.known = resume.Known()
        self.validator = None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port

"""A deliberately misbehaving HTTP/1.1 server on 127.0.0.1, written on raw sockets.

http.server cannot lie about Content-Length, drop a connection half-way or stall on purpose, so
this one parses just enough of a request and then runs a named behaviour. Every request is
recorded (path, headers) so tests can check what the client sent and how often it asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


Behaviour = Callable[["BadServer", socket.socket, Request, int], None]


@dataclass
class BadServer:
    """``payload`` is the file every behaviour serves (or lies about)."""

    payload: bytes
    host: str = "127.0.0.1"
    requests: list[Request] = field(default_factory=list)
    routes: dict[str, Behaviour] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> BadServer:
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            block_on_close = False
            allow_reuse_address = True

        self._server = Server((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str, host: str | None = None, userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"http://{at}{host or self.host}:{self.port}{path}"

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts.get(path, 0)

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up when the server stops (so no test waits on a staller)."""
        self._stop.wait(seconds)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    # -- plumbing --

    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = sock.recv(65536)
                if not more:
                    return
                data += more
        except OSError:
            return
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        req = Request(method, path, headers)
        with self._lock:
            self.requests.append(req)
            n = self._counts[path] = self._counts.get(path, 0) + 1
        behaviour = self.routes.get(path.split("?")[0], not_found)
        try:
            behaviour(self, sock, req, n)
        except OSError:
            pass  # the client went away: that is often the point
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def send_head(sock: socket.socket, status: str, headers: dict[str, str | int]) -> None:
    # Every connection serves one request: say so, or clients race to reuse a closed socket.
    headers = {"Connection": "close", **headers}
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def not_found(server: BadServer, sock: socket.socket, req: Request, n: int) -> None:
    send_head(sock, "404 Not Found", {"Content-Length": 0, "Connection": "close"})


_RANGE = re.compile(r"bytes=(\d+)-$")


def serve(
    server: BadServer,
    sock: socket.socket,
    req: Request,
    *,
    data: bytes | None = None,
    etag: str | None = '"v1"',
    ranges: bool = True,
    cut_at: int | None = None,
    length: int | None = -1,
    extra_headers: dict[str, str | int] | None = None,
) -> None:
    """Serve ``data`` (default the payload) honestly, unless told to lie or cut.

    ``length``: -1 = the true Content-Length, None = no Content-Length (close-delimited),
    another number = that Content-Length whatever is sent. ``cut_at``: close after sending this
    many body bytes. Range requests are honoured when ``ranges`` and the If-Range matches.
    """
    body = server.payload if data is None else data
    headers: dict[str, str | int] = {"Connection": "close"}
    if etag:
        headers["ETag"] = etag
    if ranges:
        headers["Accept-Ranges"] = "bytes"
    status = "200 OK"
    m = _RANGE.match(req.header("range") or "")
    if ranges and m and (req.header("if-range") in (None, etag)):
        start = int(m.group(1))
        if start >= len(body):
            send_head(sock, "416 Range Not Satisfiable", {"Content-Length": 0, **headers})
            return
        headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        body = body[start:]
        status = "206 Partial Content"
    if length == -1:
        headers["Content-Length"] = len(body)
    elif length is not None:
        headers["Content-Length"] = length
    headers.update(extra_headers or {})
    send_head(sock, status, headers)
    sock.sendall(body if cut_at is None else body[:cut_at])


# --- a well-behaved origin with keep-alive, outages and cuts (the fleet and reuse tests) --------


@dataclass
class Hit:
    """One request the origin received."""

    at: float  # time.monotonic()
    path: str
    range: str | None
    via: str | None
    connection: int  # which TCP connection carried it (reuse shows as repeated numbers)
    status: int = 0


@dataclass
class Origin:
    """An HTTP/1.1 origin with keep-alive, cacheable answers (ETag, Last-Modified, max-age) and
    Range support, that counts every body byte it sends (per path). ``outage(seconds, after)``
    plans an outage: from then on every transfer in flight is cut, and every request is answered
    503 + Retry-After (with a small body, on a connection kept alive) until it ends."""

    payload: bytes
    rate: float | None = None  # bytes per second per transfer
    retry_after: int = 2
    hits: list[Hit] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    down_from: float = float("inf")
    down_until: float = float("-inf")
    _cut: tuple[int, float] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Origin:
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with outer._lock:
                    outer.connections += 1
                    self.number = outer.connections

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer._get(self)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that went away (a cut, a closed keep-alive) is normal here

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "/img") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def outage(self, seconds: float, after: float = 0.0, at_byte: int | None = None) -> None:
        """An outage of ``seconds``, starting ``after`` seconds from now or, with ``at_byte``,
        when the origin has sent that many body bytes in all (mid-transfer, deterministic)."""
        now = time.monotonic()
        with self._lock:
            if at_byte is not None:
                self._cut = (at_byte, seconds)
                return
            self.down_from, self.down_until = now + after, now + after + seconds

    def is_down(self, at: float | None = None) -> bool:
        at = time.monotonic() if at is None else at
        return self.down_from <= at < self.down_until

    def egress(self, prefix: str = "/") -> int:
        with self._lock:
            return sum(n for path, n in self.sent.items() if path.startswith(prefix))

    def _get(self, h) -> None:  # type: ignore[no-untyped-def]
        hit = Hit(time.monotonic(), h.path, h.headers.get("Range"), h.headers.get("Via"), h.number)
        with self._lock:
            self.hits.append(hit)
        if self.is_down(hit.at):
            hit.status = 503
            body = b"the origin is down for maintenance\n" * 4
            h.send_response(503)
            h.send_header("Retry-After", str(self.retry_after))
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Cache-Control", "no-store")
            h.end_headers()
            h.wfile.write(body)
            return
        data, start = self.payload, 0
        m = _RANGE.match(h.headers.get("Range") or "")
        if m and h.headers.get("If-Range") in (None, '"fleet-1"') and int(m[1]) < len(data):
            start = int(m[1])
        hit.status = 206 if start else 200
        h.send_response(hit.status)
        h.send_header("ETag", '"fleet-1"')
        h.send_header("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT")
        h.send_header("Cache-Control", "public, max-age=3600")
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        self._send_body(h, memoryview(data)[start:])

    def _send_body(self, h, body: memoryview) -> None:  # type: ignore[no-untyped-def]
        piece = 64 * 1024
        t0 = time.monotonic()
        for i in range(0, len(body), piece):
            chunk = body[i : i + piece]
            with self._lock:
                if self._cut and sum(self.sent.values()) + len(chunk) > self._cut[0]:
                    now = time.monotonic()
                    self.down_from, self.down_until = now, now + self._cut[1]
                    self._cut = None
                down = self.is_down()
                if not down:
                    self.sent[h.path] = self.sent.get(h.path, 0) + len(chunk)
            if down:  # the outage cuts every transfer in flight
                h.close_connection = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.wfile.write(chunk)
            if self.rate:
                ahead = (i + len(chunk)) / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)


def paced(cut_at: int | None = None, piece: int = 256 * 1024, pause: float = 0.005) -> Behaviour:
    """Serve the payload in small paced pieces (so a reader of the growing file really waits),
    cut at ``cut_at`` on the first request, whole (from the asked Range) afterwards."""

    def behaviour(server: BadServer, sock: socket.socket, req: Request, n: int) -> None:
        start = int((req.header("range") or "bytes=0-")[6:-1])
        body = server.payload[start:]
        headers: dict[str, str | int] = {"ETag": '"v1"', "Accept-Ranges": "bytes"}
        status = "200 OK"
        if start:
            status = "206 Partial Content"
            size = len(server.payload)
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        send_head(sock, status, {**headers, "Content-Length": len(body)})
        end = len(body) if n > 1 or cut_at is None else cut_at - start
        for pos in range(0, end, piece):
            sock.sendall(body[pos : min(pos + piece, end)])
            server.sleep(pause)

    return behaviour

"""The connection guard on uvicorn: idle or slow clients never take the request capacity.

A rescue system is reachable by whoever shares its network. uvicorn's own ``limit_concurrency``
counts open connections, so a few dozen idle sockets made every request answer 503, and its
keep-alive timer is cancelled by every byte received, so a client trickling its head one byte at
a time held its connection forever. This module replaces both with three rules:

- every request (head and body) must arrive within ``request_timeout`` seconds of the moment the
  agent starts waiting for it; trickling bytes do not extend it. A request whose head arrived but
  whose body did not is answered 408 (the documented answer), an incomplete head is closed;
- at most ``max_connections`` sockets are open, and when a new one arrives at the cap, the
  connection that has waited longest for a request head is closed to make room: a client that
  sends its request when it connects, as every real client does, is always served;
- a request head over ``max_head`` bytes is answered 431 (h11's own cap only applies to a head
  that arrives in several reads).

It subclasses uvicorn's ``H11Protocol`` and reads its per-connection state (``conn``, ``cycle``,
``transport``, ``connections``): the uvicorn (and h11) version range it was written against is
pinned in pyproject.toml.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent import messages as msg

log = logging.getLogger(__name__)

FD_RESERVE = 256  # descriptors kept for the install (tools, files) besides the connections


def _json_response(status: int, reason: bytes, message: str) -> tuple[h11.Response, bytes]:
    body = json.dumps({"message": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return h11.Response(status_code=status, headers=headers, reason=reason), body


_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: application/json\r\nContent-Length: 49\r\nConnection: close\r\n\r\n"
    b'{"message": "Request header fields too large."}\r\n'
)


def connection_cap(wanted: int, soft: int, hard: int) -> tuple[int, int]:
    """The descriptor limit to ask for and the connection cap it allows: ``(soft, cap)``.

    Each connection holds one descriptor; ``FD_RESERVE`` more stay free for the install, so a
    flood of connections can never starve the install of descriptors (nor make ``accept`` fail).
    """
    need = wanted + FD_RESERVE
    limit = soft if soft >= need else (need if hard < 0 or hard >= need else hard)
    return limit, max(1, min(wanted, limit - FD_RESERVE))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guard's three rules (see the module docstring)."""

    request_timeout = 15.0
    max_head = 16 * 1024
    max_connections = 1024
    _deadline: Any = None
    _waiting_since = 0.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._watch()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()
            return
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _head_too_large(self, data: bytes) -> bool:
        buffered = self.conn.trailing_data[0] + data
        end = buffered.find(b"\r\n\r\n", 0, self.max_head + 4)
        return (end if end >= 0 else len(buffered)) > self.max_head

    # --- capacity: the longest-waiting idle connection makes room for a new one ---------
    def _idle(self) -> bool:
        """Waiting for a request head (none or part of one), no request being answered."""
        busy = self.cycle is not None and not self.cycle.response_complete
        return self.conn.their_state is h11.IDLE and not busy

    def _make_room(self) -> None:
        if len(self.connections) <= self.max_connections:
            return
        idle = [c for c in self.connections if c is not self and c._idle()]
        if not idle:  # every connection has a request in progress: this one waits its turn
            log.warning("%d requests in progress: refusing a connection", len(self.connections))
            self.transport.close()
            return
        victim = min(idle, key=lambda c: c._waiting_since)
        log.debug("at %d connections: closing the longest idle one", self.max_connections)
        victim.transport.close()

    # --- the request deadline -----------------------------------------------------------
    def _watch(self) -> None:
        waiting = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        if waiting and self._deadline is None and not self.transport.is_closing():
            self._waiting_since = self.loop.time()
            self._deadline = self.loop.call_later(self.request_timeout, self._expired)
        elif not waiting:
            self._cancel()

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        state, cycle = self.conn.their_state, self.cycle
        if state is h11.SEND_BODY and cycle is not None and not cycle.response_started:
            log.warning(
                "answering 408 to %s: request body not received within %.0f s",
                self.client[0] if self.client else "?",
                self.request_timeout,
            )
            self._answer_408()
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            log.warning(
                "closing a connection from %s: request head not received within %.0f s",
                self.client[0] if self.client else "?",
                self.request_timeout,
            )
        elif state is not h11.IDLE:
            return
        self.transport.close()

    def _answer_408(self) -> None:
        """The documented answer; the handler still reading the body sees a disconnect."""
        head, body = _json_response(408, b"Request Timeout", msg.API_BODY_TIMEOUT)
        for event in (head, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.cycle.response_started = True
        self.cycle.disconnected = True
        self.cycle.message_event.set()


def guarded_protocol(request_timeout: float, max_head: int, max_connections: int) -> type:
    """The guarded protocol class with these limits (uvicorn instantiates it per connection)."""
    limits = {
        "request_timeout": request_timeout,
        "max_head": max_head,
        "max_connections": max_connections,
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)


def server_config(
    app: Any,
    settings: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> uvicorn.Config:
    """uvicorn settings with the guard and the limits that keep a misbehaving client from hurting
    the host (``settings`` is an ``api.ApiSettings``)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(
            settings.request_timeout, settings.max_header_bytes, settings.max_connections
        ),
        ws="none",
        lifespan="on",
        log_config=None,  # keep the process's logging (and its ScrubFilter)
        access_log=True,  # method, path, status and client only: never headers
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=settings.keep_alive,
        timeout_graceful_shutdown=5,  # in-flight requests are short; the install is waited apart
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=None,  # it counts idle sockets: the guard's cap replaces it
        backlog=1024,  # a burst of connections waits in the kernel instead of being dropped
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )

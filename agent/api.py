"""The HTTP API an orchestrator drives (``byoi-agent serve``).

The API is a thin view over the same objects the command line uses: requests are parsed by
``payload.parse_request``, installs run ``pipeline.run_install`` in a worker thread, and
``GET /install/status`` is ``InstallStatus.snapshot()``; the callback sender subscribes to that
same status. It runs on a rescue system with little memory, reachable by whoever shares its
network, so every request except ``/health`` and ``/openapi.json`` needs the bearer token
(status and disks reveal serial numbers), bodies are capped, and a client that sends its request
slowly is cut off (``_guarded_h11``) instead of holding a connection forever.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import signal
import stat
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent import messages as msg
from agent.callbacks import CallbackSender, CallbackSettings
from agent.messages import InstallError
from agent.payload import InstallRequest, parse_request
from agent.redact import ScrubFilter, register_secret
from agent.status import InstallStatus

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
Runner = Callable[[InstallRequest, Any, InstallStatus], bool]


@dataclass(frozen=True)
class ApiSettings:
    """Everything the API needs; ``serve`` builds it from the command line."""

    token: str
    disk: str | None = None
    hints: dict[str, str] = field(default_factory=dict)
    workdir: Path = Path("/run/byoi-agent")
    ca_bundle: str | None = None  # extra CA file for https image URLs
    callback: CallbackSettings | None = None
    max_body: int = 1024 * 1024  # an install request is a few KiB; user data is capped at 64 KiB
    body_timeout: float = 30.0  # to receive a whole request body
    request_timeout: float = 15.0  # to receive a request line + headers (slow-loris guard)
    keep_alive: int = 5
    max_header_bytes: int = 16 * 1024
    max_connections: int = 32
    shutdown_wait: float | None = None  # cap on waiting for install + final callback at exit


# --- the install slot -----------------------------------------------------------------------------


def _pipeline_runner(request: InstallRequest, options: Any, status: InstallStatus) -> bool:
    from agent import pipeline

    return pipeline.run_install(request, options, status)


def _pipeline_options(settings: ApiSettings) -> Any:
    from agent import pipeline

    return pipeline.InstallOptions(
        disk=settings.disk,
        hints=dict(settings.hints),
        workdir=settings.workdir,
        download_settings=pipeline.download_settings(settings.ca_bundle),
    )


def _pipeline_busy() -> bool:
    """An install started outside this API (same process) also holds the disk."""
    try:
        from agent import pipeline
    except ImportError:
        return False
    return pipeline.INSTALL_LOCK.locked()


class Installs:
    """The one install slot of this process: current status, worker thread, listeners."""

    def __init__(self, settings: ApiSettings, runner: Runner | None, options: Any | None) -> None:
        self._settings = settings
        self._runner = runner or _pipeline_runner
        self._options = options
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[dict[str, Any], str], None]] = []
        self.status = InstallStatus()  # before any install: every step todo

    def subscribe(self, listener: Callable[[dict[str, Any], str], None]) -> None:
        self._listeners.append(listener)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, request: InstallRequest) -> InstallStatus | None:
        """Start an install in a worker thread; None when one is already running."""
        with self._lock:
            if self.running() or _pipeline_busy():
                return None
            options = self._options
            if options is None:
                options = _pipeline_options(self._settings)
            status = InstallStatus()
            for listener in self._listeners:
                status.subscribe(listener)
            # "doing" before the 202 goes out, so a client polling at once never sees "todo".
            status.begin()
            self.status = status
            # Not a daemon: the process must not end in the middle of writing a disk.
            self._thread = threading.Thread(
                target=self._run, args=(request, options, status), name="install"
            )
            self._thread.start()
            return status

    def _run(self, request: InstallRequest, options: Any, status: InstallStatus) -> None:
        try:
            ok = self._runner(request, options, status)
        except InstallError as exc:
            ok = False
            if status.state.value not in ("done", "error"):
                status.fail(status.current_step or "validate", exc.message)
        except Exception as exc:
            ok = False
            log.exception("install runner failed")
            if status.state.value not in ("done", "error"):
                status.fail(
                    status.current_step or "validate",
                    msg.internal_error(status.current_step, type(exc).__name__),
                )
        log.info("install %s: %s", "succeeded" if ok else "failed", status.message)

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


# --- HTTP plumbing --------------------------------------------------------------------------------


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status_code, headers=headers)


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time, so the token cannot be guessed byte by byte from response timings.
    return hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    )


def _unauthorized() -> JSONResponse:
    return _error(401, msg.API_UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="byoi-agent"'})


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge()
    chunks: list[bytes] = []
    size = 0
    with anyio.fail_after(timeout):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge()
            chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    settings: ApiSettings,
    runner: Runner | None = None,
    *,
    options: Any | None = None,
    disks_report: Callable[[], dict[str, Any]] | None = None,
) -> Starlette:
    """The ASGI app. ``runner``/``options``/``disks_report`` default to the real pipeline and
    disk discovery; tests inject their own to drive a real ``InstallStatus`` without a disk."""
    if len(settings.token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the API token must have at least {MIN_TOKEN_LENGTH} characters")
    register_secret(settings.token)
    installs = Installs(settings, runner, options)
    sender = CallbackSender(settings.callback) if settings.callback else None
    if sender is not None:
        installs.subscribe(sender.listener)

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if not _authorized(request, settings.token):
                return _unauthorized()
            return await handler(request)

        return endpoint

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def install_start(request: Request) -> Response:
        try:
            raw = await _read_body(request, settings.max_body, settings.body_timeout)
        except _BodyTooLarge:
            return _error(413, msg.api_body_too_large(settings.max_body), {"Connection": "close"})
        except TimeoutError:
            return _error(408, msg.API_BODY_TIMEOUT, {"Connection": "close"})
        except ClientDisconnect:
            return Response(status_code=400)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return _error(400, msg.bad_request("the body is not a JSON document"))
        try:
            install_request = parse_request(body)
        except InstallError as exc:
            return _error(400, exc.message)
        except RecursionError:
            return _error(400, msg.bad_request("the body is nested too deeply"))
        status = await anyio.to_thread.run_sync(installs.start, install_request)
        if status is None:
            return _error(409, msg.INSTALL_RUNNING)
        log.info("install started for %s", install_request.redacted_url)
        return JSONResponse(
            status.snapshot(), status_code=202, headers={"Location": "/install/status"}
        )

    async def install_status(request: Request) -> Response:
        return JSONResponse(installs.status.snapshot())

    def report_disks() -> dict[str, Any]:
        if disks_report is not None:
            return disks_report()
        from agent.disks import disks_report as discover

        report = discover(settings.hints)
        if settings.disk:  # serve --disk: discovery's choice does not apply
            report["explicit"] = settings.disk
        return report

    async def disks(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(report_disks))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail), exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error(
            "%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
        )
        return _error(500, msg.API_INTERNAL_ERROR)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if sender is not None:
            sender.start()
        yield
        # Stopping the service must not cut a disk write short nor lose the final callback.
        if installs.running():
            log.warning("waiting for the running install to end before exiting")
        await anyio.to_thread.run_sync(installs.wait, settings.shutdown_wait)
        if sender is not None:
            delivered = await anyio.to_thread.run_sync(sender.close, settings.shutdown_wait)
            if not delivered:
                log.warning("some callbacks were not delivered: %s", sender.stats.failures[-3:])

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/install/start", guarded(install_start), methods=["POST"]),
            Route("/install/status", guarded(install_status), methods=["GET"]),
            Route("/disks", guarded(disks), methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.installs = installs
    app.state.callbacks = sender
    return app


# --- the server -----------------------------------------------------------------------------------


_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: application/json\r\nContent-Length: 49\r\nConnection: close\r\n\r\n"
    b'{"message": "Request header fields too large."}\r\n'
)


def _guarded_h11(request_timeout: float, max_head: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus a deadline for receiving each request and a strict head cap.

    uvicorn's keep-alive timer is cancelled by every byte received, so a client sending its
    headers (or a body) one byte at a time would hold a connection forever; with a few dozen
    of those the agent could not be reached. The deadline starts when the agent starts waiting
    for a request (or its body) and is not extended by the bytes that trickle in. h11's own
    size cap only applies to a head that arrives in several reads, so it is enforced here too.
    """

    class GuardedH11Protocol(H11Protocol):
        _deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and self._head_too_large(data):
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()
                return
            super().data_received(data)
            self._watch()

        def _head_too_large(self, data: bytes) -> bool:
            buffered = self.conn.trailing_data[0] + data
            end = buffered.find(b"\r\n\r\n", 0, max_head + 4)
            return (end if end >= 0 else len(buffered)) > max_head

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _watch(self) -> None:
            waiting = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
            if waiting and self._deadline is None and not self.transport.is_closing():
                self._deadline = self.loop.call_later(request_timeout, self._expired)
            elif not waiting:
                self._cancel()

        def _cancel(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                log.warning(
                    "closing a connection from %s: request not received within %.0f s",
                    self.client[0] if self.client else "?",
                    request_timeout,
                )
                self.transport.close()

    return GuardedH11Protocol


def server_config(
    app: Starlette,
    settings: ApiSettings,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> uvicorn.Config:
    """uvicorn settings with the limits that keep a misbehaving client from hurting the host."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_guarded_h11(settings.request_timeout, settings.max_header_bytes),
        ws="none",
        lifespan="on",
        log_config=None,  # keep the process's logging (and its ScrubFilter)
        access_log=True,  # method, path, status and client only: never headers
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=settings.keep_alive,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
        backlog=64,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )


def load_token(path: Path) -> str:
    """The bearer token from its file (one line). Refuse short tokens; warn on loose modes."""
    text = path.read_text(encoding="utf-8").strip()
    if len(text) < MIN_TOKEN_LENGTH or any(c.isspace() for c in text):
        raise ValueError(
            f"{path}: the token must be one word of at least {MIN_TOKEN_LENGTH} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "%s is readable by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode)
        )
    register_secret(text)
    return text


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def install_log_filters() -> None:
    """Every handler (ours, uvicorn's) scrubs registered secrets from what it writes."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in (None, "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ScrubFilter) for f in handler.filters):
                handler.addFilter(ScrubFilter())


def serve(
    listen: str,
    token_file: Path,
    callback_url: str | None,
    disk: str | None,
    hints: dict[str, str],
    workdir: Path,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    ca_bundle: str | None = None,
) -> int:
    """Run the API until SIGTERM/SIGINT. Exit code 2 on bad settings, 1 if it cannot serve.

    On a signal, uvicorn stops accepting requests, then the app's shutdown waits for a running
    install and for the final callback (bounded by the callback retry window) before returning.
    """
    install_log_filters()
    try:
        host, port = parse_listen(listen)
        token = load_token(token_file)
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for path in (tls_cert, tls_key):
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{path} is not readable")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.error("%s", exc)
        return 2
    callback = CallbackSettings(url=callback_url, token=token) if callback_url else None
    settings = ApiSettings(
        token=token,
        disk=disk,
        hints=dict(hints),
        workdir=workdir,
        ca_bundle=ca_bundle,
        callback=callback,
    )
    app = create_app(settings)
    server = uvicorn.Server(server_config(app, settings, host, port, tls_cert, tls_key))
    # uvicorn re-raises the signal that stopped it once its shutdown is done; a graceful stop
    # on SIGTERM (systemd) then ends here with exit code 0 instead of a death by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind or start
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


# --- the OpenAPI document (also committed as docs/openapi.json) -----------------------------------

_STEP = {
    "type": "object",
    "required": ["comment", "status", "error"],
    "properties": {
        "comment": {"type": "string", "example": "Downloading image"},
        "status": {"type": "string", "enum": ["todo", "doing", "done", "error"]},
        "error": {"type": "string", "description": "the step's result message when it failed"},
        "step": {"type": "string", "example": "download"},
        "seconds": {"type": "number", "description": "how long the step ran (once started)"},
        "bytes": {"type": "integer", "description": "bytes the step moved (download, write)"},
    },
}
_STATUS = {
    "type": "object",
    "description": "OVHcloud's progress shape plus byte progress and the result message.",
    "required": ["elapsedTime", "progress", "status", "message", "bytesDone", "bytesTotal"],
    "properties": {
        "elapsedTime": {"type": "number", "description": "seconds since the install began"},
        "progress": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}},
        "status": {"type": "string", "enum": ["todo", "doing", "done", "error"]},
        "step": {"type": "string", "description": "the running, failed or last step"},
        "message": {"type": "string", "description": "the final result message"},
        "disk": {"type": "string"},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "bytesDone": {"type": "integer"},
        "bytesTotal": {"type": ["integer", "null"]},
        "rate": {"type": "number", "description": "bytes per second"},
        "eta": {"type": ["number", "null"], "description": "seconds"},
    },
}
_KEY_VALUE = {
    "type": "object",
    "required": ["key"],
    "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
}
_INSTALL_BODY = {
    "type": "object",
    "description": "OVHcloud install/start shape (imageURL and imageType are required keys).",
    "required": ["userMetadata"],
    "properties": {
        "templateName": {"type": "string", "example": "byoi_64"},
        "details": {
            "type": "object",
            "properties": {"customHostname": {"type": "string"}},
        },
        "userMetadata": {"type": "array", "items": {"$ref": "#/components/schemas/KeyValue"}},
    },
}
_REINSTALL_BODY = {
    "type": "object",
    "description": "OVHcloud reinstall shape.",
    "required": ["customizations"],
    "properties": {
        "operatingSystem": {"type": "string", "example": "byoi_64"},
        "customizations": {
            "type": "object",
            "required": ["imageURL", "imageType"],
            "properties": {
                "hostname": {"type": "string"},
                "imageURL": {"type": "string", "format": "uri"},
                "imageType": {"type": "string", "enum": ["qcow2", "raw"]},
                "imageCheckSum": {"type": "string"},
                "imageCheckSumType": {
                    "type": "string",
                    "enum": ["md5", "sha1", "sha256", "sha512"],
                },
                "httpHeaders": {"type": "object", "additionalProperties": {"type": "string"}},
                "configDriveUserData": {"type": "string"},
                "configDriveMetadata": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                },
                "sshKey": {"type": "string"},
                "efiBootloaderPath": {"type": "string"},
            },
        },
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["message"],
    "properties": {"message": {"type": "string"}},
}
_DISKS = {
    "type": "object",
    "required": ["disks", "chosen"],
    "properties": {
        "disks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "path", "size", "eligible", "reason"],
                "properties": {
                    "name": {"type": "string"},
                    "path": {"type": "string"},
                    "size": {"type": "integer"},
                    "eligible": {"type": "boolean"},
                    "reason": {"type": "string"},
                },
            },
        },
        "chosen": {"type": ["string", "null"]},
    },
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _answer(description: str, ref: str = "Message") -> dict[str, Any]:
    return {"description": description, "content": _json(ref)}


_UNAUTHORIZED = _answer("missing or wrong bearer token")

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "byoi-agent",
        "version": "1",
        "description": (
            "Bring Your Own Image install agent. Every operation but /health and /openapi.json "
            "needs `Authorization: Bearer <token>` (the token of `serve --token-file`). With "
            "`--callback-url`, every status change is also POSTed there as an InstallStatus "
            'with two more fields, `event` ("step" or "progress") and `sequence` '
            "(increasing), carrying the same bearer token."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Step": _STEP,
            "InstallStatus": _STATUS,
            "KeyValue": _KEY_VALUE,
            "InstallStartBody": _INSTALL_BODY,
            "ReinstallBody": _REINSTALL_BODY,
            "Message": _MESSAGE,
            "DisksReport": _DISKS,
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/install/start": {
            "post": {
                "summary": "Start an install (one at a time)",
                "operationId": "startInstall",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/InstallStartBody"},
                                    {"$ref": "#/components/schemas/ReinstallBody"},
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "202": _answer("accepted; follow /install/status", "InstallStatus"),
                    "400": _answer("bad request: `message` is the result message"),
                    "401": _UNAUTHORIZED,
                    "408": _answer("the body was not received in time"),
                    "409": _answer("an install is already running"),
                    "413": _answer("the body is larger than 1 MiB"),
                },
            }
        },
        "/install/status": {
            "get": {
                "summary": "Progress of the current (or last) install",
                "operationId": "getStatus",
                "responses": {
                    "200": _answer("all steps `todo` before the first install", "InstallStatus"),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/disks": {
            "get": {
                "summary": "Every block device, eligible or not, and the one that would be chosen",
                "operationId": "getDisks",
                "responses": {"200": _answer("disk report", "DisksReport"), "401": _UNAUTHORIZED},
            }
        },
        "/health": {
            "get": {
                "summary": "Liveness (no token needed)",
                "operationId": "getHealth",
                "security": [],
                "responses": {
                    "200": {
                        "description": "the agent answers",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"status": {"type": "string", "enum": ["ok"]}},
                                }
                            }
                        },
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document (no token needed)",
                "operationId": "getOpenAPI",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1 document"}},
            }
        },
    },
}


if __name__ == "__main__":  # python -m agent.api > docs/openapi.json
    print(json.dumps(OPENAPI, indent=2))

"""The HTTP API an orchestrator drives (``byoi-agent serve``): the app and its handlers.

The API is a thin view over the same objects the command line uses: requests are parsed by
``payload.parse_request``, installs run ``pipeline.run_install`` in a worker thread
(agent/installs.py), and ``GET /install/status`` is ``InstallStatus.snapshot()``; the callback
sender subscribes to that same status. It runs on a rescue system reachable by whoever shares its
network, so every request except ``/health`` and ``/openapi.json`` needs the bearer token
(status and disks reveal serial numbers) and bodies are capped. The limits on connections and on
slow clients live in agent/httpguard.py, the process (token file, signals) in agent/serve.py.

The OpenAPI document is agent/openapi.json, package data shipped with the agent and served as
is at ``/openapi.json``: it is the one description of this API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import messages as msg
from agent.callbacks import CallbackSender, CallbackSettings
from agent.installs import Installs, Runner
from agent.messages import InstallError
from agent.payload import parse_request
from agent.redact import register_secret

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class ApiSettings:
    """Everything the API needs; ``serve`` builds it from the command line."""

    token: str
    disk: str | None = None  # for the disk report: the install options' disk and hints
    hints: dict[str, str] = field(default_factory=dict)
    install_options: Any = None  # pipeline.InstallOptions of the command line (None: defaults)
    callback: CallbackSettings | None = None
    max_body: int = 1024 * 1024  # an install request is a few KiB; user data is capped at 64 KiB
    request_timeout: float = 15.0  # to receive a request's head and body (then 408 or close)
    keep_alive: int = 5
    max_header_bytes: int = 16 * 1024
    max_connections: int = 1024  # open sockets; idle ones make room for new ones (httpguard)
    install_stop_wait: float = 60.0  # on stop: for the install to reach its next safe point
    callback_stop_wait: float = 30.0  # then: for the final callback to be delivered


@functools.cache
def openapi_document() -> dict[str, Any]:
    """agent/openapi.json, the API's one description (package data, shipped with the agent)."""
    return json.loads(resources.files("agent").joinpath("openapi.json").read_text("utf-8"))


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes; its deadline is the connection guard's (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _pipeline_options(settings: ApiSettings) -> Any:
    """Each install gets its own copy of the command line's install options."""
    from agent import pipeline

    template = settings.install_options
    if template is None:
        return pipeline.InstallOptions(disk=settings.disk, hints=dict(settings.hints))
    return dataclasses.replace(template, hints=dict(template.hints))


def _install_handler(settings: ApiSettings, installs: Installs) -> Callable[[Request], Any]:
    async def install_start(request: Request) -> Response:
        try:
            raw = await _read_body(request, settings.max_body)
        except _BodyTooLarge:
            return _error(413, msg.api_body_too_large(settings.max_body), {"Connection": "close"})
        except ClientDisconnect:  # gone, or cut off by the guard (which answered 408)
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

    return install_start


def _disks_handler(
    settings: ApiSettings, disks_report: Callable[[], dict[str, Any]] | None
) -> Callable[[Request], Any]:
    def report() -> dict[str, Any]:
        if disks_report is not None:
            return disks_report()
        from agent.disks import disks_report as discover

        found = discover(settings.hints)
        if settings.disk:  # serve --disk: discovery's choice does not apply
            found["explicit"] = settings.disk
        return found

    async def disks(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(report))

    return disks


def _lifespan(
    settings: ApiSettings, installs: Installs, sender: CallbackSender | None
) -> Callable[[Starlette], Any]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if sender is not None:
            sender.start()
        yield
        # Stopping: the install ends at its next safe point (serve asked it at the signal
        # already), then its final state goes out; both waits are bounded (systemd's stop
        # timeout in packaging/byoi-agent.service covers their sum).
        installs.stop(signal.SIGTERM)
        ended = await anyio.to_thread.run_sync(installs.wait, settings.install_stop_wait)
        if not ended:
            log.error("the install did not stop within %.0f s", settings.install_stop_wait)
        if sender is not None:
            delivered = await anyio.to_thread.run_sync(sender.close, settings.callback_stop_wait)
            if not delivered:
                log.warning("some callbacks were not delivered: %s", sender.stats.failures[-3:])

    return lifespan


def create_app(
    settings: ApiSettings,
    runner: Runner | None = None,
    *,
    options: Any | None = None,
    disks_report: Callable[[], dict[str, Any]] | None = None,
    request_stop: Callable[[int], bool] | None = None,
) -> Starlette:
    """The ASGI app. ``runner``/``options``/``disks_report``/``request_stop`` default to the real
    pipeline and disk discovery; tests inject their own to drive a real ``InstallStatus``."""
    if len(settings.token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the API token must have at least {MIN_TOKEN_LENGTH} characters")
    register_secret(settings.token)
    installs = Installs(
        (lambda: options) if options is not None else (lambda: _pipeline_options(settings)),
        runner,
        request_stop,
    )
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
        return JSONResponse(openapi_document())

    async def install_status(request: Request) -> Response:
        return JSONResponse(installs.status.snapshot())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail), exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error(
            "%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
        )
        return _error(500, msg.API_INTERNAL_ERROR)

    install_start = guarded(_install_handler(settings, installs))
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/install/start", install_start, methods=["POST"]),
            Route("/install/status", guarded(install_status), methods=["GET"]),
            Route("/disks", guarded(_disks_handler(settings, disks_report)), methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=_lifespan(settings, installs, sender),
    )
    app.state.installs = installs
    app.state.callbacks = sender
    return app

"""``byoi-agent serve``: the API as a process (token files, descriptors, logging, signals).

Settings are checked before anything listens, and a wrong one exits 2 (the systemd unit does not
restart on 2): a token file that no client could ever match (empty, non-ASCII, with spaces, or
short) is refused here rather than answering 401 forever. On SIGTERM/SIGINT the running install
is asked at once to end at its next safe point (``Installs.stop``), uvicorn stops taking
requests, and the app's shutdown waits, bounded, for the install and then for its final callback
(agent/api.py); packaging/byoi-agent.service's stop timeout covers the sum of those bounds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import stat
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from agent import messages as msg
from agent.api import MIN_TOKEN_LENGTH, ApiSettings, create_app, parse_listen
from agent.callbacks import CallbackSettings
from agent.httpguard import connection_cap, server_config
from agent.installs import Installs
from agent.redact import ScrubFilter, register_secret

log = logging.getLogger(__name__)


def token_problem(data: bytes) -> str | None:
    """Why the content of a token file can never authenticate a request (None: it can)."""
    token = data.strip()
    if not token:
        return "the file is empty"
    try:
        token.decode("ascii")
    except UnicodeDecodeError:
        return "it holds non-ASCII characters, which an HTTP header cannot carry"
    if any(not 0x21 <= byte <= 0x7E for byte in token):
        return "it holds spaces or control characters"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"it has only {len(token)} characters"
    return None


def load_token(path: Path) -> str:
    """The bearer token from its file (one line). Refuse unusable tokens; warn on loose modes."""
    data = path.read_bytes()
    problem = token_problem(data)
    if problem is not None:
        raise ValueError(msg.token_file_refused(str(path), problem))
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "%s is readable by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode)
        )
    text = data.strip().decode("ascii")
    register_secret(text)
    return text


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


def raise_descriptor_limit(settings: ApiSettings) -> ApiSettings:
    """Room for ``max_connections`` sockets plus the install's own descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit, cap = connection_cap(settings.max_connections, soft, hard)
    if limit != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    if cap < settings.max_connections:
        log.warning("descriptor limit %d: at most %d connections", limit, cap)
    return dataclasses.replace(settings, max_connections=cap)


class _Server(uvicorn.Server):
    """uvicorn's server that also asks the install to stop the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, installs: Installs) -> None:
        super().__init__(config)
        self._installs = installs

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:  # the first signal; a thread, as a signal handler takes no lock
            threading.Thread(target=self._installs.stop, args=(sig,), daemon=True).start()
        super().handle_exit(sig, frame)


def _settings(
    listen: str,
    token_file: Path,
    callback_url: str | None,
    callback_token_file: Path | None,
    tls: tuple[Path | None, Path | None],
) -> tuple[str, int, str, CallbackSettings | None]:
    """Check the command line's settings: ``(host, port, token, callback)``; ValueError if bad."""
    host, port = parse_listen(listen)
    token = load_token(token_file)
    if (tls[0] is None) != (tls[1] is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for path in tls:
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{path} is not readable")
    if callback_token_file is not None and not callback_url:
        raise ValueError(msg.CALLBACK_CREDENTIAL_WITHOUT_URL)
    callback_token = load_token(callback_token_file) if callback_token_file else None
    if callback_token == token:
        raise ValueError(msg.CALLBACK_CREDENTIAL_REUSED)
    callback = CallbackSettings(url=callback_url, token=callback_token) if callback_url else None
    return host, port, token, callback


def serve(
    listen: str,
    token_file: Path,
    callback_url: str | None,
    options: Any,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    callback_token_file: Path | None = None,
) -> int:
    """Run the API until SIGTERM/SIGINT. Exit code 2 on bad settings, 1 if it cannot serve.

    ``options`` (a ``pipeline.InstallOptions``) are the command line's install options: every
    install started through the API uses them, as ``byoi-agent install`` would."""
    install_log_filters()
    try:
        host, port, token, callback = _settings(
            listen, token_file, callback_url, callback_token_file, (tls_cert, tls_key)
        )
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    settings = ApiSettings(
        token=token,
        disk=options.disk,
        hints=dict(options.hints),
        install_options=options,
        callback=callback,
    )
    settings = raise_descriptor_limit(settings)
    app = create_app(settings)
    config = server_config(app, settings, host, port, tls_cert, tls_key)
    server = _Server(config, app.state.installs)
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

"""The one install slot of the ``serve`` process: the current status, its worker thread, stops.

The HTTP handlers never run an install themselves: ``Installs.start`` hands it to a worker thread
(one at a time, across this API and any other caller of ``pipeline.run_install`` in the process)
and the status it returns is the very object ``GET /install/status`` and the callbacks read.
``stop`` is what a SIGTERM does: ask the install to end at its next safe point
(``pipeline.request_stop``), then wait for it, bounded, so a stopping service never waits for a
whole download.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from agent import messages as msg
from agent.messages import InstallError
from agent.payload import InstallRequest
from agent.status import InstallStatus

log = logging.getLogger(__name__)

Runner = Callable[[InstallRequest, Any, InstallStatus], bool]
Listener = Callable[[dict[str, Any], str], None]


def _pipeline_runner(request: InstallRequest, options: Any, status: InstallStatus) -> bool:
    from agent import pipeline

    return pipeline.run_install(request, options, status)


def _pipeline_busy() -> bool:
    """An install started outside this API (same process) also holds the disk."""
    from agent import pipeline

    return pipeline.INSTALL_LOCK.locked()


def _request_stop(signum: int) -> bool:
    """``pipeline.request_stop``: the running install (any thread) ends at its next safe point."""
    from agent import pipeline

    return pipeline.request_stop(signum)


class Installs:
    """Start, observe and stop the process's install; ``options`` is built lazily per install."""

    def __init__(
        self,
        options: Callable[[], Any],
        runner: Runner | None = None,
        request_stop: Callable[[int], bool] | None = None,
    ) -> None:
        self._options = options
        self._runner = runner or _pipeline_runner
        self._request_stop = request_stop or _request_stop
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listeners: list[Listener] = []
        self._stopping = False
        self.status = InstallStatus()  # before any install: every step todo

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, request: InstallRequest) -> InstallStatus | None:
        """Start an install in a worker thread; None when one is already running."""
        with self._lock:
            if self.running() or _pipeline_busy():
                return None
            options = self._options()
            status = InstallStatus()
            for listener in self._listeners:
                status.subscribe(listener)
            # "doing" before the 202 goes out, so a client polling at once never sees "todo".
            status.begin()
            self.status = status
            self._stopping = False
            # A daemon: a stop is bounded (``stop``); past the bound the process may end, and a
            # disk cut short mid-write is left unbootable by design (first MiB written last).
            self._thread = threading.Thread(
                target=self._run, args=(request, options, status), name="install", daemon=True
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

    def stop(self, signum: int) -> bool:
        """Ask a running install to end at its next safe point; True if one was running."""
        with self._lock:
            if not self.running():
                return False
            if self._stopping:  # only the first stop counts (the signal, then the lifespan)
                return True
            self._stopping = True
        log.warning("stopping: asking the running install to end")
        self._request_stop(signum)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the install thread; True when no install is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running()

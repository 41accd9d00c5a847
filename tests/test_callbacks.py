"""Callbacks to a real (test) orchestrator over HTTP on 127.0.0.1: order, retries, coalescing,
an orchestrator that is down for a while, and the bound on waiting for the final state."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent import messages as msg
from agent.callbacks import CallbackSender, CallbackSettings
from agent.status import STEP_KEYS, InstallStatus

TOKEN = "callback-token-0123456789abcdef"


class Orchestrator:
    """A tiny real HTTP server recording the callbacks it accepts.

    ``answer`` is the status it answers with (e.g. 503 while "restarting"); ``delay`` slows each
    answer; ``listening`` False keeps the port bound but refusing connections (not started yet).
    """

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.refused = 0
        self.answer = 200
        self.delay = 0.0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                time.sleep(outer.delay)
                with outer.lock:
                    code = outer.answer
                    if code == 200:
                        outer.received.append(body)
                        outer.auth.append(self.headers.get("Authorization", ""))
                    else:
                        outer.refused += 1
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), Handler, bind_and_activate=False
        )
        self.server.server_bind()  # the port is ours; connections are refused until listen()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        self.thread: threading.Thread | None = None

    def listen(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()

    def steps(self) -> list[dict[str, Any]]:
        with self.lock:
            return [b for b in self.received if b["event"] == "step"]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self.received):
                    return True
            time.sleep(0.02)
        return False


@pytest.fixture
def orchestrator() -> Iterator[Orchestrator]:
    orch = Orchestrator()
    try:
        yield orch
    finally:
        orch.stop()


def fast_settings(url: str, **overrides: Any) -> CallbackSettings:
    values: dict[str, Any] = dict(
        url=url,
        token=TOKEN,
        progress_interval=0.0,
        retry_window=10.0,
        initial_backoff=0.02,
        max_backoff=0.2,
        timeout=2.0,
    )
    values.update(overrides)
    return CallbackSettings(**values)


def drive_install(
    status: InstallStatus, *, progress_updates: int = 0, fail_at: str = "", pause: float = 0.0
) -> float:
    """Run a real InstallStatus through its steps; return the longest listener-bound call."""
    slowest = 0.0

    def timed(fn: Any, *args: Any) -> None:
        nonlocal slowest
        t0 = time.monotonic()
        fn(*args)
        slowest = max(slowest, time.monotonic() - t0)

    timed(status.begin)
    for key in STEP_KEYS:
        timed(status.start, key)
        if key == "download":
            for i in range(1, progress_updates + 1):
                # update_progress reports at most every 0.5 s: make each one count.
                status._rate_mark = (time.monotonic() - 1.0, 0)
                timed(status.update_progress, i * 1000, progress_updates * 1000)
                time.sleep(pause)
        if key == fail_at:
            timed(status.fail, key, msg.GPT_MOVE_FAILED)
            return slowest
        timed(status.done, key)
    timed(status.finish, msg.install_done("/dev/test"))
    return slowest


def step_events(status: InstallStatus) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    status.subscribe(lambda snap, event: seen.append(snap) if event == "step" else None)
    return seen


def assert_in_order(bodies: list[dict[str, Any]]) -> None:
    sequences = [b["sequence"] for b in bodies]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


def test_every_step_event_delivered_in_order_with_token(orchestrator: Orchestrator) -> None:
    orchestrator.listen()
    sender = CallbackSender(fast_settings(orchestrator.url)).start()
    status = InstallStatus()
    emitted = step_events(status)
    status.subscribe(sender.listener)
    drive_install(status, progress_updates=3, pause=0.2)
    assert sender.close(timeout=10) is True

    steps = orchestrator.steps()
    assert len(steps) == len(emitted) == 2 + 2 * len(STEP_KEYS)
    assert [s["progress"] for s in steps] == [e["progress"] for e in emitted]
    assert_in_order(orchestrator.received)
    assert orchestrator.received[-1]["status"] == "done"
    assert orchestrator.received[-1]["message"] == msg.install_done("/dev/test")
    assert set(orchestrator.auth) == {f"Bearer {TOKEN}"}
    progress = [b for b in orchestrator.received if b["event"] == "progress"]
    # Progress events arrive in order; one the orchestrator was too slow for (a loaded
    # machine) is coalesced into the next event (each is a full snapshot), and counted.
    done = [p["bytesDone"] for p in progress]
    assert done == sorted(done) and set(done) <= {1000, 2000, 3000}
    assert len(done) + sender.stats.coalesced == 3, (done, sender.stats)


def test_failed_install_final_state_is_the_error(orchestrator: Orchestrator) -> None:
    orchestrator.listen()
    sender = CallbackSender(fast_settings(orchestrator.url)).start()
    status = InstallStatus()
    status.subscribe(sender.listener)
    drive_install(status, fail_at="gpt")
    assert sender.close(timeout=10)
    last = orchestrator.received[-1]
    assert last["status"] == "error"
    assert last["message"] == msg.GPT_MOVE_FAILED
    assert last["step"] == "gpt"


def test_orchestrator_answering_503_for_a_while(orchestrator: Orchestrator) -> None:
    orchestrator.answer = 503
    orchestrator.listen()
    sender = CallbackSender(fast_settings(orchestrator.url)).start()
    status = InstallStatus()
    emitted = step_events(status)
    status.subscribe(sender.listener)
    slowest = drive_install(status, progress_updates=5)
    assert slowest < 0.05, "a listener blocked the install"
    time.sleep(0.8)
    assert orchestrator.refused >= 3 and not orchestrator.received
    with orchestrator.lock:
        orchestrator.answer = 200
    assert sender.close(timeout=10)
    steps = orchestrator.steps()
    assert [s["progress"] for s in steps] == [e["progress"] for e in emitted]
    assert_in_order(orchestrator.received)
    assert orchestrator.received[-1]["status"] == "done"


def test_orchestrator_started_late_gets_the_final_state(orchestrator: Orchestrator) -> None:
    # Nothing listens on the port yet: connections are refused.
    sender = CallbackSender(fast_settings(orchestrator.url)).start()
    status = InstallStatus()
    status.subscribe(sender.listener)
    started = time.monotonic()
    drive_install(status, progress_updates=20)
    assert time.monotonic() - started < 1.0, "the install waited for the orchestrator"
    time.sleep(1.0)
    assert sender.pending() > 0
    orchestrator.listen()
    assert sender.close(timeout=10)
    assert orchestrator.received[-1]["status"] == "done"
    assert_in_order(orchestrator.received)
    # Queued progress events were coalesced away behind newer snapshots; steps were all kept.
    assert len(orchestrator.steps()) == 2 + 2 * len(STEP_KEYS)
    assert len([b for b in orchestrator.received if b["event"] == "progress"]) < 20
    assert sender.stats.coalesced >= 19


def test_dead_orchestrator_bounds_the_wait_and_never_fails_install(
    orchestrator: Orchestrator,
) -> None:
    sender = CallbackSender(fast_settings(orchestrator.url, retry_window=1.0)).start()
    status = InstallStatus()
    status.subscribe(sender.listener)
    slowest = drive_install(status)
    assert slowest < 0.05
    assert status.snapshot()["status"] == "done"
    t0 = time.monotonic()
    assert sender.close(timeout=30) is False
    waited = time.monotonic() - t0
    assert waited < 3.0, f"close waited {waited:.1f} s past the 1 s retry window"
    assert sender.stats.delivered == 0 and sender.stats.abandoned > 0


def test_close_timeout_gives_up_cleanly(orchestrator: Orchestrator) -> None:
    """``close(timeout)`` shorter than the retry window (serve's callback_stop_wait): it returns
    at the timeout, and the sender thread then stops retrying and closes its own client: no
    request on a closed client, no exception in the thread."""
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]
    try:
        sender = CallbackSender(fast_settings(orchestrator.url, retry_window=60.0)).start()
        status = InstallStatus()
        status.subscribe(sender.listener)
        drive_install(status)
        t0 = time.monotonic()
        assert sender.close(timeout=0.5) is False
        print(f"close returned after {time.monotonic() - t0:.2f} s (timeout 0.5 s)")
        sender._thread.join(10)
        assert not sender._thread.is_alive()
        assert sender.stats.abandoned > 0 and sender.stats.delivered == 0
    finally:
        threading.excepthook = previous
    assert not errors, errors


def test_permanent_refusal_is_not_retried(orchestrator: Orchestrator) -> None:
    orchestrator.answer = 401
    orchestrator.listen()
    sender = CallbackSender(fast_settings(orchestrator.url)).start()
    status = InstallStatus()
    status.subscribe(sender.listener)
    status.begin()
    status.start("validate")
    assert sender.close(timeout=5) is False
    assert orchestrator.refused == 2  # one attempt per event
    assert sender.stats.abandoned == 2


def test_progress_events_are_throttled(orchestrator: Orchestrator) -> None:
    orchestrator.listen()
    sender = CallbackSender(fast_settings(orchestrator.url, progress_interval=60)).start()
    status = InstallStatus()
    status.subscribe(sender.listener)
    drive_install(status, progress_updates=10, pause=0.05)
    assert sender.close(timeout=10)
    progress = [b for b in orchestrator.received if b["event"] == "progress"]
    assert len(progress) == 1
    assert orchestrator.received[-1]["status"] == "done"


def test_url_password_stays_out_of_failures(orchestrator: Orchestrator) -> None:
    url = orchestrator.url.replace("http://", "http://user:hunter2secret@")
    sender = CallbackSender(fast_settings(url, retry_window=0.3)).start()
    sender.listener(InstallStatus().snapshot(), "step")
    assert sender.close(timeout=5) is False
    assert sender.stats.failures
    assert all("hunter2secret" not in f for f in sender.stats.failures)
    assert any("user:***@" in f for f in sender.stats.failures)

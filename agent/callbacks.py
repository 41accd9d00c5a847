"""Pushing status changes to the orchestrator (``serve --callback-url``).

The install must never wait for the orchestrator: ``CallbackSender.listener`` only appends to an
in-memory queue and returns; one sender thread POSTs the events in order, retrying each with
jittered exponential backoff (tenacity). Each body is a full ``InstallStatus.snapshot()``, so a
newer event supersedes any older *progress* event: pending progress events are coalesced away
when the queue backs up, while step events (state changes) are all kept. Every event is retried
for at most ``retry_window`` seconds after it happened, which bounds how long a dead orchestrator
can hold the process at shutdown (``close``) while still giving a restarting orchestrator minutes
to come back and receive the final state.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    wait_random_exponential,
)

from agent.redact import redact_url, register_secret
from agent.retry_policy import RETRY_STATUS  # one rule for every HTTP retry in the agent

log = logging.getLogger(__name__)

FINAL_STATES = ("done", "error")


@dataclass(frozen=True)
class CallbackSettings:
    url: str
    # ``serve --callback-token-file``: the orchestrator's own credential, sent as a bearer
    # token; never the API token (whoever receives callbacks must not be able to start
    # installs). None: no Authorization header at all.
    token: str | None = None
    progress_interval: float = 5.0  # at most one progress event per interval
    retry_window: float = 600.0  # keep retrying an event (the final state too) this long
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    timeout: float = 10.0  # per HTTP attempt
    max_pending: int = 1000  # step events kept while the orchestrator is away
    verify: Any = True  # httpx ``verify`` (a CA bundle path or SSLContext for a private CA)


@dataclass
class _Event:
    sequence: int
    kind: str  # "step" | "progress"
    body: dict[str, Any]
    deadline: float
    final: bool


@dataclass
class CallbackStats:
    delivered: int = 0
    coalesced: int = 0
    abandoned: int = 0
    attempts: int = 0
    failures: list[str] = field(default_factory=list)


class _Retryable(Exception):
    pass


class _Permanent(Exception):
    pass


class _Superseded(Exception):
    pass


class CallbackSender:
    """Delivers status snapshots to ``settings.url`` from its own thread, in order."""

    def __init__(self, settings: CallbackSettings, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.stats = CallbackStats()
        self._shown_url = redact_url(settings.url)
        with contextlib.suppress(httpx.InvalidURL, TypeError):
            register_secret(httpx.URL(settings.url).password)
        self._client = client or httpx.Client(
            timeout=settings.timeout,
            verify=settings.verify,
            headers={"User-Agent": "byoi-agent"},
        )
        self._queue: collections.deque[_Event] = collections.deque()
        self._cond = threading.Condition()
        self._sequence = 0
        self._last_progress = float("-inf")
        self._closing = False
        self._given_up = False  # close() timed out: the thread drops what is left and ends
        self._thread = threading.Thread(target=self._run, name="callbacks", daemon=True)

    def start(self) -> CallbackSender:
        self._thread.start()
        return self

    # --- producer side: called from the install thread, must return at once -------------------
    def listener(self, snapshot: dict[str, Any], event: str) -> None:
        """An ``InstallStatus`` listener: queue the event (throttling progress events)."""
        now = time.monotonic()
        final = snapshot.get("status") in FINAL_STATES
        with self._cond:
            if event == "progress" and not final:
                if now - self._last_progress < self.settings.progress_interval:
                    return
                self._last_progress = now
            self._sequence += 1
            item = _Event(
                sequence=self._sequence,
                kind=event,
                body={**snapshot, "event": event, "sequence": self._sequence},
                deadline=now + self.settings.retry_window,
                final=final,
            )
            # Every snapshot is the full state: a newer one makes pending progress events moot.
            kept = [e for e in self._queue if e.kind != "progress"]
            self.stats.coalesced += len(self._queue) - len(kept)
            self._queue = collections.deque(kept)
            self._queue.append(item)
            while len(self._queue) > self.settings.max_pending:
                self._drop_oldest_non_final()
            self._cond.notify_all()

    def _drop_oldest_non_final(self) -> None:
        for index, queued in enumerate(self._queue):
            if not queued.final:
                del self._queue[index]
                self.stats.abandoned += 1
                return
        self._queue.popleft()
        self.stats.abandoned += 1

    # --- shutdown ------------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> bool:
        """Wait until every queued event is delivered or has passed its retry window.

        Returns True when nothing is left undelivered. ``timeout`` caps the wait further.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            alive = self._thread.is_alive()
            drained = not self._queue and not alive
            if alive:  # the thread stops at its next attempt or wait, and closes the client
                self._given_up = True
                self._cond.notify_all()
        if not alive:
            self._client.close()
        return drained and not self.stats.abandoned

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    # --- the sender thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._given_up:
                    self.stats.abandoned += len(self._queue)
                    self._queue.clear()
                    self._client.close()
                    return
                if not self._queue:
                    return
                item = self._queue.popleft()
            self._deliver(item)

    def _deliver(self, item: _Event) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            wait=wait_random_exponential(
                multiplier=self.settings.initial_backoff, max=self.settings.max_backoff
            ),
            stop=lambda state: self._give_up(item, state),
            sleep=lambda seconds: self._sleep(item, seconds),
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._attempt(item)
        except RetryError as exc:
            self.stats.abandoned += 1
            cause = exc.last_attempt.exception()
            self._note(f"event {item.sequence} ({item.kind}) given up: {cause}")
            if item.final:
                log.error(
                    "callback %s: the final state was not delivered within %.0f s",
                    self._shown_url,
                    self.settings.retry_window,
                )
        except _Superseded:
            self.stats.coalesced += 1
        except _Permanent as exc:
            self.stats.abandoned += 1
            self._note(f"event {item.sequence} ({item.kind}) refused: {exc}")
        else:
            self.stats.delivered += 1

    def _attempt(self, item: _Event) -> None:
        if self._superseded(item):
            raise _Superseded()
        self.stats.attempts += 1
        headers = {}
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        try:
            response = self._client.post(self.settings.url, json=item.body, headers=headers)
        except httpx.HTTPError as exc:
            # The exception text may hold the URL: show the redacted one only.
            raise _Retryable(f"{type(exc).__name__} from {self._shown_url}") from None
        if response.is_success:
            return
        reason = f"HTTP {response.status_code} from {self._shown_url}"
        if response.status_code in RETRY_STATUS:
            raise _Retryable(reason)
        raise _Permanent(reason)

    def _superseded(self, item: _Event) -> bool:
        if item.kind != "progress":
            return False
        with self._cond:
            return bool(self._queue)

    def _give_up(self, item: _Event, state: RetryCallState) -> bool:
        if state.attempt_number == 1 or state.attempt_number % 10 == 0:
            outcome = state.outcome.exception() if state.outcome else None
            log.warning(
                "callback %s failing (attempt %d): %s",
                self._shown_url,
                state.attempt_number,
                outcome,
            )
        return time.monotonic() >= item.deadline or self._given_up or self._superseded(item)

    def _sleep(self, item: _Event, seconds: float) -> None:
        """Back off, but never past the event's deadline, and wake early for a newer event."""
        until = min(time.monotonic() + seconds, item.deadline)
        with self._cond:
            while (left := until - time.monotonic()) > 0:
                if self._given_up or (item.kind == "progress" and self._queue):
                    return
                self._cond.wait(left)

    def _note(self, text: str) -> None:
        log.warning("callback %s", text)
        self.stats.failures.append(text)

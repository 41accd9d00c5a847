"""The install's status: one model, three views (CLI progress, HTTP status, callbacks).

The pipeline is the only writer. Readers either take a ``snapshot()`` (HTTP status, --json) or
subscribe to changes (CLI progress, orchestrator callbacks). Listeners are called outside the
lock, in the writer's thread, and must be quick: a slow listener would slow the install, so the
callback sender queues work to its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class StepState(StrEnum):
    TODO = "todo"
    DOING = "doing"
    DONE = "done"
    ERROR = "error"


# (key, OVHcloud-style comment). The order is the order the pipeline runs them in. The "gpt"
# step writes the disk's final tables (GPT backup at the end, then the head): the install's last
# write, which is why it comes after the config drive (agent/layout.py).
STEPS: tuple[tuple[str, str], ...] = (
    ("validate", "Validating request"),
    ("memory", "Checking available memory"),
    ("disk", "Selecting target disk"),
    ("download", "Downloading image"),
    ("checksum", "Verifying image checksum"),
    ("inspect", "Inspecting image format"),
    ("prepare", "Preparing config drive and partition table"),
    ("write", "Writing image on disk"),
    ("verify", "Verifying written image"),
    ("configdrive", "Creating config drive"),
    ("gpt", "Moving backup GPT to the end of disk"),
    ("bootloader", "Configuring EFI boot entry"),
)
STEP_KEYS = tuple(key for key, _ in STEPS)


@dataclass
class Step:
    key: str
    comment: str
    state: StepState = StepState.TODO
    error: str = ""
    started: float | None = None
    ended: float | None = None
    bytes: int = 0  # bytes the step moved (download, write), kept once it is done


@dataclass
class Progress:
    """Byte progress of the step that moves bytes (download, write)."""

    step: str = ""
    done: int = 0
    total: int | None = None
    rate: float = 0.0  # bytes/s, smoothed
    eta: float | None = None  # seconds


Listener = Callable[[dict[str, Any], str], None]
"""Called with (snapshot, event) where event is "step" for a state change or "progress"."""


@dataclass
class InstallStatus:
    """Thread-safe status of one install."""

    steps: list[Step] = field(default_factory=lambda: [Step(k, c) for k, c in STEPS])
    state: StepState = StepState.TODO  # overall
    message: str = ""  # final result message
    disk: str = ""
    warnings: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    started: float | None = None
    ended: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _listeners: list[Listener] = field(default_factory=list, repr=False)
    _rate_mark: tuple[float, int] | None = field(default=None, repr=False)

    # --- readers -------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def step(self, key: str) -> Step:
        for step in self.steps:
            if step.key == key:
                return step
        raise KeyError(key)

    @property
    def current_step(self) -> str:
        """The step running now, the one that failed, or the last one that ran."""
        with self._lock:
            return self._current_step_locked()

    def _current_step_locked(self) -> str:
        for step in self.steps:
            if step.state in (StepState.DOING, StepState.ERROR):
                return step.key
        last = ""
        for step in self.steps:
            if step.state == StepState.DONE:
                last = step.key
        return last

    def snapshot(self) -> dict[str, Any]:
        """OVHcloud's progress shape, plus bytes, rate and the final message."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = 0.0 if self.started is None else (self.ended or now) - self.started
        return {
            "elapsedTime": round(elapsed, 1),
            "progress": [self._step_view(s, now) for s in self.steps],
            "status": self.state.value,
            "step": self._current_step_locked(),
            "message": self.message,
            "disk": self.disk,
            "warnings": list(self.warnings),
            "bytesDone": self.progress.done,
            "bytesTotal": self.progress.total,
            "rate": round(self.progress.rate, 1),
            "eta": None if self.progress.eta is None else round(self.progress.eta, 1),
        }

    @staticmethod
    def _step_view(step: Step, now: float) -> dict[str, Any]:
        view: dict[str, Any] = {
            "comment": step.comment,
            "status": step.state.value,
            "error": step.error,
            "step": step.key,
        }
        if step.started is not None:
            view["seconds"] = round((step.ended or now) - step.started, 2)
        if step.bytes:
            view["bytes"] = step.bytes
        return view

    # --- the writer (the pipeline) -------------------------------------------------------------
    def begin(self) -> None:
        """Mark the install as running (idempotent: the API begins before the pipeline does)."""
        with self._lock:
            if self.started is not None and self.state == StepState.DOING:
                return

        def apply() -> None:
            self.state = StepState.DOING
            self.started = time.monotonic()

        self._change(apply)

    def start(self, key: str) -> None:
        def apply() -> None:
            step = self.step(key)
            step.state = StepState.DOING
            step.started = time.monotonic()
            self.progress = Progress(step=key)
            self._rate_mark = None

        self._change(apply)

    def done(self, key: str) -> None:
        def apply() -> None:
            step = self.step(key)
            step.state = StepState.DONE
            step.ended = time.monotonic()
            if self.progress.step == key:
                step.bytes = self.progress.done

        self._change(apply)

    def warn(self, text: str) -> None:
        self._change(lambda: self.warnings.append(text))

    def set_disk(self, device: str) -> None:
        self._change(lambda: setattr(self, "disk", device))

    def fail(self, key: str, message: str) -> None:
        def apply() -> None:
            step = self.step(key)
            step.state = StepState.ERROR
            step.error = message
            step.ended = time.monotonic()
            self.state = StepState.ERROR
            self.message = message
            self.ended = time.monotonic()

        self._change(apply)

    def finish(self, message: str) -> None:
        def apply() -> None:
            self.state = StepState.DONE
            self.message = message
            self.ended = time.monotonic()

        self._change(apply)

    def update_progress(self, done: int, total: int | None) -> None:
        """Record byte progress; listeners hear about it at most a few times a second."""
        now = time.monotonic()
        with self._lock:
            p = self.progress
            p.done, p.total = done, total
            mark = self._rate_mark
            if mark is None:
                self._rate_mark = (now, done)
                return
            dt = now - mark[0]
            if dt < 0.5 and (total is None or done < total):
                return
            inst = (done - mark[1]) / dt if dt > 0 else 0.0
            p.rate = inst if p.rate == 0 else 0.7 * p.rate + 0.3 * inst
            p.eta = (total - done) / p.rate if total and p.rate > 0 else None
            self._rate_mark = (now, done)
            snap = self._snapshot_locked()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(snap, "progress")

    def _change(self, apply: Callable[[], object]) -> None:
        with self._lock:
            apply()
            snap = self._snapshot_locked()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(snap, "step")

"""The retry rule: which answers are retried, how long to wait, when to give up (pure)."""

from __future__ import annotations

import random

import pytest

from agent.retry_policy import RETRY_STATUS, RetryPolicy, is_retryable_status


@pytest.mark.parametrize(
    ("status", "retry"),
    [(408, True), (429, True), (500, True), (502, True), (503, True), (504, True), (599, True),
     (400, False), (401, False), (403, False), (404, False), (410, False), (416, False),
     (425, False), (200, False), (206, False)],
)  # fmt: skip
def test_retryable_statuses(status: int, retry: bool) -> None:
    assert is_retryable_status(status) is retry


def test_callbacks_use_the_same_rule() -> None:
    from agent import callbacks

    assert callbacks.RETRY_STATUS is RETRY_STATUS


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(clock: Clock, **kw: float) -> RetryPolicy:
    args = {"outage_tolerance": 600.0, "total_timeout": 3600.0, "backoff_initial": 1.0,
            "backoff_max": 60.0, "retry_after_cap": 120.0}  # fmt: skip
    args.update(kw)
    return RetryPolicy(clock=clock, **args)  # type: ignore[arg-type]


def test_full_jitter_grows_to_the_cap_and_resets_on_progress() -> None:
    random.seed(1)
    p = policy(Clock(), backoff_max=8.0)
    first = [p.delay(None) for _ in range(200)]  # no failure yet: the smallest window
    assert all(0 <= d <= 1.0 for d in first)
    for _ in range(10):
        p.failed()
    grown = [p.delay(None) for _ in range(200)]
    assert all(0 <= d <= 8.0 for d in grown) and max(grown) > 6.0
    p.progress()
    assert all(p.delay(None) <= 1.0 for _ in range(50))


def test_retry_after_is_a_minimum_with_spread_on_top() -> None:
    random.seed(2)
    p = policy(Clock(), backoff_max=8.0, retry_after_cap=5.0)
    for _ in range(6):
        p.failed()
    delays = [p.delay(2.0) for _ in range(500)]
    assert min(delays) >= 2.0
    assert max(delays) - min(delays) > 5.0  # a fleet cut at one moment comes back spread
    assert all(d <= 5.0 + 8.0 for d in (p.delay(3600.0) for _ in range(50)))  # capped


def test_gives_up_on_time_without_progress_not_on_a_count() -> None:
    clock = Clock()
    p = policy(clock, outage_tolerance=300.0)
    for _ in range(1000):  # a thousand 503s in the first minutes are still an outage to sit out
        p.failed()
    clock.now = 200.0
    assert p.gives_up(10.0) is None
    assert "outage tolerance" in (p.gives_up(100.0) or "")
    p.progress()  # bytes arrived: the clock starts again
    clock.now = 450.0
    assert p.gives_up(10.0) is None


def test_gives_up_at_the_overall_limit() -> None:
    clock = Clock()
    p = policy(clock, total_timeout=1000.0)
    clock.now = 995.0
    p.progress()
    assert "longer than 1000" in (p.gives_up(10.0) or "")
    assert not p.timed_out()
    clock.now = 1001.0
    assert p.timed_out()


def test_an_optional_count_of_failures_in_a_row() -> None:
    p = policy(Clock(), max_failures=2)
    p.failed()
    assert p.gives_up(0.0) is None
    p.failed()
    assert "2 attempts in a row" in (p.gives_up(0.0) or "")
    p.progress()
    assert p.gives_up(0.0) is None

"""When to try an HTTP request again, and how long to wait first: one rule for the whole agent.

Why it looks like this:

- What is worth another attempt is the same everywhere (image downloads, status callbacks):
  5xx, 429 and 408 answers, connection errors, timeouts and bodies that end early. A server
  that is restarting, overloaded or asking us to slow down will answer differently later;
  every other 4xx will not.
- Retries are bounded by *time*, not by a count of answers: an origin that answers 503 for
  five minutes during a deployment is an outage to sit out, not eight failures. The budget is
  the ``outage_tolerance`` (time without a byte of progress), inside the overall limit.
- One delay is drawn per failed attempt (tenacity's ``wait_random_exponential``: full jitter)
  and the same number decides both whether the next attempt still fits in the limits and how
  long to sleep.
- ``Retry-After`` is honoured as a *minimum*, with the jitter added on top: a fleet cut at the
  same moment by one outage must not come back as one burst every N seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))


def is_retryable_status(status: int) -> bool:
    """An HTTP answer that a later attempt may not get (overload, restart, slow down)."""
    return status in RETRY_STATUS


@dataclass
class _Attempts:
    """The one field of tenacity's RetryCallState that its exponential waits read."""

    attempt_number: int


class RetryPolicy:
    """Delays and the stop rule for one transfer; ``progress()`` resets the outage clock.

    ``failures`` counts the failed attempts since the last byte of progress: a drop after
    megabytes restarts the backoff from its smallest window, a dead server makes it grow.
    """

    def __init__(
        self,
        *,
        outage_tolerance: float,
        total_timeout: float,
        backoff_initial: float,
        backoff_max: float,
        retry_after_cap: float,
        max_failures: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outage_tolerance = outage_tolerance
        self.total_timeout = total_timeout
        self.retry_after_cap = retry_after_cap
        self.max_failures = max_failures  # None: time alone bounds the retries
        self._jitter = tenacity.wait_random_exponential(multiplier=backoff_initial, max=backoff_max)
        self._clock = clock
        self.started = clock()
        self.last_progress = self.started
        self.failures = 0

    def progress(self) -> None:
        """Bytes arrived: the server is alive, the outage (if any) is over."""
        self.last_progress = self._clock()
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1

    def delay(self, retry_after: float | None) -> float:
        """The sleep before the next attempt: jitter, on top of the server's Retry-After."""
        spread = self._jitter(_Attempts(max(self.failures, 1)))  # type: ignore[arg-type]
        if retry_after is None:
            return spread
        return min(max(retry_after, 0.0), self.retry_after_cap) + spread

    def gives_up(self, upcoming_sleep: float) -> str | None:
        """Why no further attempt fits after sleeping ``upcoming_sleep`` (None: try again)."""
        if self.max_failures is not None and self.failures >= self.max_failures:
            return f"{self.failures} attempts in a row without progress"
        now = self._clock() + upcoming_sleep
        if now - self.started >= self.total_timeout:
            return f"the download would take longer than {self.total_timeout:.0f} s"
        if now - self.last_progress >= self.outage_tolerance:
            return f"no progress for {self.outage_tolerance:.0f} s (outage tolerance)"
        return None

    def timed_out(self) -> bool:
        return self._clock() - self.started > self.total_timeout

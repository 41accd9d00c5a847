"""The one place external tools are run: argument lists, timeouts, stderr kept for the error."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from agent.redact import scrub

log = logging.getLogger(__name__)


class ToolError(Exception):
    """A tool failed; ``detail`` carries its command line, exit status and stderr (scrubbed)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def run(
    args: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool and return its completed process (text output)."""
    log.debug("run: %s", " ".join(args))
    try:
        proc = subprocess.run(
            list(args),
            input=input_bytes.decode() if input_bytes is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]}: not installed ({exc})") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{' '.join(args)}: timed out after {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise ToolError(
            scrub(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        )
    return proc

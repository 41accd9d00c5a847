"""The one place external tools are run.

Every tool the agent uses goes through ``run`` (wait for it) or ``spawn`` (stream its output):
argument lists, never a shell; a timeout; ``LC_ALL=C`` so that the English output the code
parses is what the tool prints; stderr kept, scrubbed of secrets, for the error; and the tool
killed by the kernel when the agent dies (``setpriv --pdeathsig KILL``): a qemu-img writing on
after its agent was SIGKILLed would race the next install on the same disk.

Tools that read untrusted input (qemu-img on a downloaded image) run with resource ``Limits``
(address space, CPU seconds) through ``prlimit``, as OpenStack does for ``qemu-img info``. Both
wrappers are util-linux programs that exec the tool: no ``preexec_fn``, which is unsafe in the
threaded ``serve`` process.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from agent.redact import scrub

log = logging.getLogger(__name__)


class ToolError(Exception):
    """A tool failed; ``detail`` carries its command line, exit status and stderr (scrubbed)."""

    def __init__(self, detail: str, returncode: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.returncode = returncode


@dataclass(frozen=True)
class Limits:
    """Resource limits for a tool that parses untrusted data."""

    address_space: int = 1 << 30  # bytes
    cpu_seconds: int = 30


# qemu-img reading an untrusted image: 1 GiB of address space, as OpenStack allows qemu-img info.
UNTRUSTED = Limits()


def environment() -> dict[str, str]:
    """The environment of every tool: ours, with messages in the C locale."""
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    return env


def command(args: Sequence[str], limits: Limits | None = None) -> list[str]:
    """The full command line: the tool behind its death-signal and resource-limit wrappers
    (each wrapper only when it is installed, so a minimal system still runs the tool). Pure
    apart from looking the wrappers up."""
    argv = [str(a) for a in args]
    if limits is not None and shutil.which("prlimit"):
        argv = [
            "prlimit",
            f"--as={limits.address_space}",
            f"--cpu={limits.cpu_seconds}",
            "--",
            *argv,
        ]
    if shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    return argv


def _describe(args: Sequence[str]) -> str:
    return scrub(" ".join(str(a) for a in args))


def run(
    args: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    input_bytes: bytes | None = None,
    limits: Limits | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool to its end and return its completed process (text output).

    With ``check`` a non-zero exit raises ``ToolError`` with the command and its stderr.
    """
    log.debug("run: %s", _describe(args))
    try:
        proc = subprocess.run(
            command(args, limits),
            input=input_bytes.decode() if input_bytes is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=environment(),
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]}: not installed ({exc})") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{_describe(args)}: timed out after {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise ToolError(
            scrub(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"),
            proc.returncode,
        )
    return proc


def spawn(args: Sequence[str], *, limits: Limits | None = None) -> subprocess.Popen[bytes]:
    """Start a tool whose stdout is read while it runs (binary pipes for stdout and stderr).

    The caller waits for it and must kill it when it gives up (``stop``).
    """
    log.debug("spawn: %s", _describe(args))
    try:
        return subprocess.Popen(
            command(args, limits),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment(),
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]}: not installed ({exc})") from None


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a spawned tool if it still runs, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def opt_value(value: object) -> str:
    """A value inside qemu's ``key=value,...`` option syntax (``--image-opts``): commas are
    doubled, so a path holding one stays one value."""
    return str(value).replace(",", ",,")

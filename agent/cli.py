"""``byoi-agent``: the command line (install, disks, configdrive, serve).

Exit codes: 0 success, 1 failed install (validation refusals included: their message is the
install's result), 2 command-line misuse (unknown option, unreadable payload, not JSON).
On ``install`` the last line on stderr is always the result message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

from agent.messages import InstallError
from agent.redact import ScrubFilter
from agent.status import InstallStatus, StepState

log = logging.getLogger("agent")


class UsageError(Exception):
    """Command-line misuse: exit status 2."""


def _target_options(p: argparse.ArgumentParser) -> None:
    """The options of an install, shared by ``install`` and ``serve``."""
    p.add_argument("--disk", help="target device; overrides discovery (safety checks stay)")
    p.add_argument(
        "--hint",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="root device hint (name, serial, wwn, model, vendor, size, "
        "rotational, by_path); repeatable, all must match",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the tmpfs download area is made (default /run/byoi-agent)",
    )
    p.add_argument(
        "--ca-bundle", metavar="FILE", help="extra CA certificates (PEM) for https image URLs"
    )
    p.add_argument(
        "--verify",
        choices=("full", "sample", "none"),
        default="sample",
        help="read-back of the written image: all of it, its data and samples of its "
        "zeroes (default), or none",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="write the image while it downloads (the checksum still gates the partition "
        "table; a failed install has overwritten the disk)",
    )
    p.add_argument(
        "--firmware",
        choices=("auto", "uefi", "bios"),
        default="auto",
        help="the firmware that will boot the disk (default: the one the rescue system booted "
        "with); legacy BIOS cannot boot 4Kn disks, so such an install is refused",
    )
    p.add_argument(
        "--max-rate",
        type=_rate,
        metavar="RATE",
        help="cap the image download at RATE bytes/s (suffixes k, M, G; default: no cap)",
    )
    p.add_argument(
        "--outage-tolerance",
        type=float,
        metavar="SECONDS",
        help="keep retrying an image server that answers 5xx/429, refuses connections or "
        "stalls for this long without progress (default 600)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byoi-agent", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install", help="run one install")
    p.add_argument("--payload", required=True, help="request JSON file, or - for stdin")
    _target_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON result line on stdout")

    p = sub.add_parser("disks", help="list block devices, eligibility and the chosen one")
    p.add_argument("--json", action="store_true")
    p.add_argument("--hint", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("configdrive", help="build the config-drive image alone")
    p.add_argument("--payload", required=True)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument(
        "--sector-size",
        type=int,
        choices=(512, 4096),
        default=512,
        help="512: ISO 9660 (config-2); 4096: FAT (CONFIG-2)",
    )

    p = sub.add_parser("serve", help="serve the HTTP API for an orchestrator")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--token-file", required=True, type=Path)
    p.add_argument("--callback-url", help="POST every status change to this URL")
    p.add_argument(
        "--callback-token-file",
        type=Path,
        metavar="FILE",
        help="bearer token the callbacks carry (never the API token; none without this)",
    )
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    _target_options(p)
    return parser


def _rate(text: str) -> float:
    """``--max-rate`` values: bytes per second, with an optional k/M/G (powers of 1000)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        rate = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r}") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("the rate must be positive")
    return rate


def _read_payload(source: str) -> Any:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read payload {source}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"payload {source} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"payload {source} is not JSON: {exc}") from None


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING - 10 * min(verbose, 2))
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))


def _log_invocation(args: argparse.Namespace) -> None:
    """At -vv, the settings in effect, first: a verbose log then always shows what ran, even
    when no tool runs (the tool runner's lines were the only DEBUG ones, and the download area's
    mount is skipped where the work directory already is a tmpfs). Paths only, no secrets.
    Nothing is done below DEBUG, and the version comes from the package itself (looking it
    up with importlib.metadata cost 20 ms of every start)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    from agent import __version__ as version

    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("command", "verbose")}
    log.debug(
        "byoi-agent %s on Python %s: %s %s",
        version,
        platform.python_version(),
        args.command,
        " ".join(f"{k}={v}" for k, v in options.items()),
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressPrinter:
    """The CLI's view of the status: a live bar on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO, live: bool, interval: float = 5.0) -> None:
        self.stream, self.live, self.interval = stream, live, interval
        self._states: dict[str, str] = {}
        self._last_line = 0.0
        self._bar_shown = False

    def __call__(self, snap: dict[str, Any], event: str) -> None:
        if event == "progress":
            self._progress(snap)
            return
        for item in snap["progress"]:
            key, state = item["step"], item["status"]
            if self._states.get(key) == state:
                continue
            self._states[key] = state
            if state == StepState.TODO:
                continue
            self._clear_bar()
            mark = {"doing": "...", "done": "ok", "error": "FAILED"}[state]
            print(f"[{mark:>6}] {item['comment']}", file=self.stream, flush=True)

    def _progress(self, snap: dict[str, Any]) -> None:
        done, total, rate = snap["bytesDone"], snap["bytesTotal"], snap["rate"]
        text = f"{_human(done)}"
        if total:
            text += f" / {_human(total)} ({100 * done / total:.0f}%)"
        if rate:
            text += f" at {_human(rate)}/s"
        if snap.get("eta") is not None:
            text += f", {snap['eta']:.0f} s left"
        if self.live:
            width = 30
            filled = int(width * done / total) if total else 0
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r  [{bar}] {text}\x1b[K")
            self.stream.flush()
            self._bar_shown = True
        elif time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            print(f"         {snap['step']}: {text}", file=self.stream, flush=True)

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self._bar_shown = False


def _hints(pairs: list[str]) -> dict[str, str]:
    from agent.disks import parse_hints

    try:
        return parse_hints(pairs)
    except InstallError as exc:
        raise UsageError(exc.message) from None


def _install_options(args: argparse.Namespace, hints: dict[str, str]) -> Any:
    """The install options of the command line: ``install`` and ``serve`` share them."""
    from agent.pipeline import DEFAULT_WORKDIR, InstallOptions, download_settings

    return InstallOptions(
        disk=args.disk,
        hints=hints,
        workdir=args.workdir or DEFAULT_WORKDIR,
        download_settings=download_settings(
            args.ca_bundle, max_rate=args.max_rate, outage_tolerance=args.outage_tolerance
        ),
        verify=args.verify,
        stream=args.stream,
        firmware=args.firmware,
    )


def cmd_install(args: argparse.Namespace) -> int:
    from agent.payload import parse_request
    from agent.pipeline import run_install

    body = _read_payload(args.payload)
    hints = _hints(args.hint)
    status = InstallStatus()
    status.subscribe(ProgressPrinter(sys.stderr, live=sys.stderr.isatty()))
    ok = False
    try:
        request = parse_request(body)
        options = _install_options(args, hints)
        ok = run_install(request, options, status)
    except InstallError as exc:  # refused before the pipeline ran: validation
        status.begin()
        status.fail("validate", exc.message)
    snap = status.snapshot()
    for warning in snap["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(snap["message"], file=sys.stderr, flush=True)
    if args.json:
        result = {
            "status": "done" if ok else "error",
            "message": snap["message"],
            "step": snap["step"],
            "disk": snap["disk"],
            "warnings": snap["warnings"],
            "elapsedTime": snap["elapsedTime"],
            "progress": snap["progress"],
        }
        print(json.dumps(result), flush=True)
    return 0 if ok else 1


def cmd_disks(args: argparse.Namespace) -> int:
    from agent.disks import disks_report

    report = disks_report(hints=_hints(args.hint)) if args.hint else disks_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for disk in report["disks"]:
        verdict = "eligible" if disk["eligible"] else "not eligible"
        kind = disk.get("transport") or "-"
        print(
            f"{disk['path']:<16} {_human(disk['size']):>10} {kind:<7} {verdict}: {disk['reason']}"
        )
    for group in report.get("diskGroups", []):
        disks = ", ".join(group["disks"])
        print(
            f"disk group {group['id']}: {group['count']} x {group['technology']} "
            f"{_human(group['size'])} {group['model'] or ''}".rstrip()
            + f" ({disks})"
        )
    chosen = report.get("chosen")
    why = report.get("reason", "")
    print(
        f"chosen: {chosen}" + (f" ({why})" if chosen and why else "")
        if chosen
        else f"chosen: none{f' ({why})' if why else ''}"
    )
    return 0


def cmd_configdrive(args: argparse.Namespace) -> int:
    from agent.configdrive import build_drive
    from agent.payload import parse_request

    body = _read_payload(args.payload)
    try:
        request = parse_request(body)
        build_drive(request, args.output, sector_size=args.sector_size)
    except InstallError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(f"config drive written to {args.output}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from agent.serve import serve

    return serve(
        listen=args.listen,
        token_file=args.token_file,
        callback_url=args.callback_url,
        callback_token_file=args.callback_token_file,
        options=_install_options(args, _hints(args.hint)),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


COMMANDS = {
    "install": cmd_install,
    "disks": cmd_disks,
    "configdrive": cmd_configdrive,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 on misuse
    # A service's log is its only trace: serve logs at INFO; the CLI keeps stderr for progress.
    _setup_logging(args.verbose + (1 if args.command == "serve" else 0))
    _log_invocation(args)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"byoi-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The process's entry point (``byoi-agent``, ``python -m agent``): ``main()``, then an exit
    that skips the interpreter's teardown of its 450 modules (70 ms here, after the result is
    already out), once nothing is left to wait for: output flushed, logging shut down, no
    thread alive but the main one and daemons (which a normal exit kills too). The agent
    registers no atexit handler; where anything else still runs, the exit is the normal one."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if all(t.daemon or t is threading.main_thread() for t in threading.enumerate()):
        os._exit(code)
    sys.exit(code)

"""Tell the orchestrator that this rescue system is up: its address, API port and disks.

Run by the rescue's /init next to ``byoi-agent serve --callback-url``. It waits until the local
API answers /health (so an orchestrator that reacts at once finds the agent listening), then
POSTs ``{"event": "announce", "address", "port", "bootMode", "disks": disks_report()}`` to the
callback URL with the callbacks' own bearer token (``--token-file``: the same credential as the
agent's status callbacks, never the API token; none without it), retrying with backoff while
the orchestrator is away.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from agent.api import parse_listen
from agent.disks import disks_report, parse_hints
from agent.firmware import booted_with_uefi
from agent.redact import redact_url

log = logging.getLogger("announce")


def wait_healthy(port: int, timeout: float) -> bool:
    """True once http://127.0.0.1:PORT/health answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def announcement(address: str, port: int, hints: dict[str, str]) -> dict[str, Any]:
    return {
        "event": "announce",
        "address": address,
        "port": port,
        "bootMode": "uefi" if booted_with_uefi() else "bios",
        "disks": disks_report(hints) if hints else disks_report(),
    }


def post(url: str, token: str | None, body: dict[str, Any], window: float) -> None:
    """POST until a 2xx answer, for at most ``window`` seconds."""
    headers = {"User-Agent": "byoi-agent"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    for attempt in Retrying(
        retry=retry_if_exception_type(httpx.HTTPError),
        wait=wait_random_exponential(multiplier=0.5, max=15),
        stop=stop_after_delay(window),
        reraise=True,
    ):
        with attempt:
            resp = httpx.post(url, json=body, headers=headers, timeout=10)
            resp.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callback", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--token-file", type=Path, help="the callbacks' bearer token")
    parser.add_argument("--address-file", type=Path)
    parser.add_argument("--hint", action="append", default=[])
    parser.add_argument("--window", type=float, default=600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s announce: %(message)s")
    _, port = parse_listen(args.listen)
    address = ""
    if args.address_file and args.address_file.exists():
        address = args.address_file.read_text().strip()
    token = args.token_file.read_text().strip() if args.token_file else None
    if not wait_healthy(port, 180):
        log.error("the agent did not answer /health on port %d", port)
        return 1
    body = announcement(address, port, parse_hints(args.hint))
    try:
        post(args.callback, token, body, args.window)
    except httpx.HTTPError as exc:
        log.error("announce to %s failed: %s", redact_url(args.callback), type(exc).__name__)
        return 1
    log.info("announced %s:%d to %s", address, port, redact_url(args.callback))
    print(f"BYOI-RESCUE-ANNOUNCED {address}:{port}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

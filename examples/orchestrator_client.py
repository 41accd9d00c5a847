#!/usr/bin/env python3
"""Minimal orchestrator: start a BYOI install on an agent and follow it to the end.

    orchestrator_client.py --agent https://10.0.0.5:8443 --token-file token \\
        --payload install.json [--cacert ca.pem] [--interval 2]

Exit 0 when the install is done, 1 when it failed or was refused (the agent's message is
printed last), 2 when the agent cannot be reached or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", required=True, help="base URL of the agent's API")
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--payload", required=True, type=Path, help="OVHcloud BYOI body (JSON)")
    parser.add_argument("--cacert", help="CA bundle for an agent serving a private certificate")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    args = parser.parse_args()

    token = args.token_file.read_text().strip()
    payload = json.loads(args.payload.read_text())
    client = httpx.Client(
        base_url=args.agent,
        headers={"Authorization": f"Bearer {token}"},
        verify=args.cacert or True,
        timeout=30,
    )
    try:
        response = client.post("/install/start", json=payload)
        if response.status_code != 202:
            print(f"refused ({response.status_code}): {response.json().get('message')}")
            return 1
        shown = ""
        while True:
            status = client.get("/install/status").raise_for_status().json()
            line = _progress_line(status)
            if line != shown:
                print(line, flush=True)
                shown = line
            if status["status"] in ("done", "error"):
                print(status["message"])
                return 0 if status["status"] == "done" else 1
            time.sleep(args.interval)
    except httpx.HTTPError as exc:
        print(f"agent unreachable: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _progress_line(status: dict) -> str:
    current = next(
        (s for s in status["progress"] if s["status"] in ("doing", "error")),
        {"comment": status["status"]},
    )
    line = f"[{status['elapsedTime']:>6.1f}s] {current['comment']}"
    if status.get("bytesTotal"):
        line += f" {100 * status['bytesDone'] // status['bytesTotal']}%"
    return line


if __name__ == "__main__":
    sys.exit(main())

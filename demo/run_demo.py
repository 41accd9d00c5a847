"""`make demo`: a real install onto a virtual disk, from an image served on 127.0.0.1.

Builds a small sample cloud image (GPT: EFI system partition + Linux partition, as qcow2),
serves it over HTTP on loopback, attaches a sparse file as a loop device, runs
``byoi-agent install`` with a sha256 checksum, an SSH key and user data, then prints the
resulting partition table and the config drive's contents. Everything is cleaned up after.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from demo.sample_image import build_image

DISK_SIZE = 256 * 1024 * 1024


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def read_config_drive(disk: str) -> None:
    """Print the files of the config drive (the last partition), read at its offset."""
    import io

    import pycdlib

    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", disk], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    sector = table.get("sectorsize", 512)
    last = table["partitions"][-1]
    with open(disk, "rb") as f:
        f.seek(last["start"] * sector)
        data = f.read(last["size"] * sector)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    print(f"volume label: {iso.pvd.volume_identifier.decode().strip()}")
    for root, _dirs, files in iso.walk(rr_path="/"):
        for name in files:
            path = f"{root.rstrip('/')}/{name}"
            if not path.startswith("/openstack/latest/"):
                print(f"--- {path} (same as in latest)")
                continue
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=path)
            print(f"--- {path}")
            print(out.getvalue().decode(errors="replace").rstrip())
    iso.close()


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it attaches a loop device)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="byoi-demo-") as tmp:
        tmpdir = Path(tmp)
        www = tmpdir / "www"
        www.mkdir()
        banner("Building a sample cloud image (GPT: ESP + Linux, qcow2)")
        image = build_image(www / "sample.qcow2", fmt="qcow2", table="gpt")
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        print(f"{image.name}: {image.stat().st_size} bytes, sha256 {digest}")

        handler = functools.partial(_Quiet, directory=str(www))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{image.name}"
        print(f"served at {url}")

        backing = tmpdir / "disk.img"
        with open(backing, "wb") as f:
            f.truncate(DISK_SIZE)
        disk = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
        ).stdout.strip()
        print(f"virtual disk: {disk} ({DISK_SIZE} bytes, sparse file)")
        try:
            payload = {
                "templateName": "byoi_64",
                "details": {"customHostname": "demo-server"},
                "userMetadata": [
                    {"key": "imageURL", "value": url},
                    {"key": "imageType", "value": "qcow2"},
                    {"key": "imageCheckSum", "value": digest},
                    {"key": "imageCheckSumType", "value": "sha256"},
                    {"key": "sshKey", "value": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKey demo"},
                    {
                        "key": "configDriveUserData",
                        "value": "#cloud-config\\nruncmd:\\n  - echo hello from byoi > /root/hi\\n",
                    },
                    {"key": "configDriveMetadata", "value": json.dumps({"role": "demo"})},
                ],
            }
            payload_file = tmpdir / "payload.json"
            payload_file.write_text(json.dumps(payload, indent=2))
            banner(f"byoi-agent install --payload payload.json --disk {disk} --json")
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "install",
                    "--payload",
                    str(payload_file),
                    "--disk",
                    disk,
                    "--workdir",
                    str(tmpdir / "work"),
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            sys.stdout.write(proc.stderr)
            print(f"stdout: {proc.stdout.strip()}")
            print(f"exit status: {proc.returncode}")
            if proc.returncode != 0:
                return proc.returncode
            banner("Partition table (sgdisk -p)")
            print(subprocess.run(["sgdisk", "-p", disk], capture_output=True, text=True).stdout)
            banner("GPT check (sgdisk -v)")
            print(subprocess.run(["sgdisk", "-v", disk], capture_output=True, text=True).stdout)
            banner("Config drive contents")
            read_config_drive(disk)
        finally:
            subprocess.run(["losetup", "-d", disk], capture_output=True)
            server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

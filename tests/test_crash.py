"""kill -9 of the agent at any point of the write phase leaves a disk that boots nothing.

The disk's first MiB is zeroed before the image's body is written and rewritten only as the
install's last write (agent/layout.py), so a SIGKILL (systemd's stop timeout, the OOM killer, a
power cut) that no handler can catch still leaves no partition table, no boot code and no
signature that blkid or firmware accepts, and the next install takes the disk cleanly.

The points: during the body's copy (at 5 % and 80 %: qemu-img is stopped there, then the agent
killed; qemu-img dies with it, mid-write), before the tables are written (``tables``: body,
read-back and config drive done) and just before the head (``head``: the GPT backup already at
the disk's end).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_install import fill_pattern, payload, run_cli

from demo.sample_image import build_raw

pytestmark = pytest.mark.root
MiB = 1024 * 1024
ROOT = Path(__file__).parent.parent
DISK = 512 * MiB


def pttype(dev: str) -> str:
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", dev], capture_output=True, text=True, timeout=60
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line).get("PTTYPE", "")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A 320 MiB raw GPT image with 280 MiB of random data (the copy takes a while); once."""
    image = build_raw(tmp_path_factory.mktemp("crash") / "big.raw", size_mib=320)
    with open(image, "r+b") as f:
        f.seek(20 * MiB)
        for _ in range(28):
            f.write(os.urandom(10 * MiB))
    return image


@pytest.fixture(autouse=True)
def no_mount_left(tmp_path):
    """A killed agent cannot unmount its tmpfs: whatever the test leaves mounted goes."""
    yield
    for line in Path("/proc/mounts").read_text().splitlines():
        where = line.split()[1]
        if where.startswith(str(tmp_path)):
            subprocess.run(["umount", "-l", where], capture_output=True)


@pytest.fixture
def big_image(built, http_dir) -> str:
    www, base = http_dir
    os.link(built, www / "big.raw")
    return f"{base}/big.raw"


def start(tmp_path: Path, url: str, dev: str, freeze: str | None) -> subprocess.Popen[str]:
    f = tmp_path / "payload.json"
    f.write_text(json.dumps(payload(url, "raw", sshKey="ssh-ed25519 AAAA k")))
    env = dict(os.environ)
    if freeze:
        env["BYOI_TEST_FREEZE_AT"] = freeze
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "install", "--payload", str(f), "--disk", dev]
        + ["--workdir", str(tmp_path / "work"), "--verify", "full"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def wait_line(proc: subprocess.Popen[str], text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    for line in proc.stderr:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} in time"
    raise AssertionError(f"the agent ended before {text!r}: exit {proc.wait()}")


def writers_of(dev: str) -> list[str]:
    names = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "qemu-img" and any(dev in a for a in p.info["cmdline"] or []):
            names.append(str(p.pid))
    return names


@pytest.mark.parametrize(
    "point",
    ["convert:5", "convert:80", "tables", "head"],
    ids=["early-write", "late-write", "before-tables", "before-head"],
)
def test_kill_9_leaves_no_partition_table(tmp_path, big_image, make_loop, point) -> None:
    url = big_image
    dev = make_loop(DISK)
    fill_pattern(dev)
    subprocess.run(["sgdisk", "-o", "-n", "1:0:+64M", dev], check=True, capture_output=True)
    assert pttype(dev) == "gpt"  # an old installed system: the kill must not leave it "valid"

    # convert:N: qemu-img is stopped half-way through the body (SIGSTOP) and the agent frozen;
    # the SIGKILL of the agent then kills qemu-img too (its parent-death signal)
    proc = start(tmp_path, url, dev, point)
    wait_line(proc, f"frozen at {point}")
    assert proc.poll() is None, "the install ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while writers_of(dev) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert writers_of(dev) == [], "qemu-img went on writing after its agent was killed"

    assert pttype(dev) == "", "a killed install left a partition table"
    with open(dev, "rb") as f:
        assert f.read(MiB) == bytes(MiB), "the first MiB holds data"

    body = tmp_path / "again.json"
    body.write_text(json.dumps(payload(url, "raw")))
    # the same work area: the next install also frees the killed agent's tmpfs
    work = tmp_path / "work"
    again = run_cli("install", "--payload", str(body), "--disk", dev, "--workdir", str(work))
    assert again.returncode == 0, again.stderr
    assert pttype(dev) == "gpt"
    verify = subprocess.run(["sgdisk", "-v", dev], capture_output=True, text=True)
    assert "No problems found" in verify.stdout
    assert str(work) not in Path("/proc/mounts").read_text(), "the dead agent's tmpfs stayed"

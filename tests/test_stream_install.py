"""``install --stream`` through the real CLI onto loop devices, the image served slowly by a
real HTTP server on 127.0.0.1 (so the copy really runs beside the download).

Success for qcow2 and raw (the disk then holds the same as a normal install: sgdisk -v clean,
the body byte-identical, the config drive found), a checksum failure (the documented message and
a disk with no partition table: in this mode the old contents are overwritten), and a download
dropped half-way and resumed while the copy waits on it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from badserver import BadServer, paced
from test_crash import pttype
from test_install import fill_pattern, payload

from agent import messages as msg
from agent.streamcopy import StreamCopy
from demo.sample_image import build_image

pytestmark = pytest.mark.root
MiB = 1024 * 1024
ROOT = Path(__file__).parent.parent
DISK = 256 * MiB


def install(tmp_path: Path, url: str, fmt: str, dev: str, checksum: str):
    f = tmp_path / "payload.json"
    body = payload(url, fmt, imageCheckSum=checksum, imageCheckSumType="sha256")
    f.write_text(json.dumps(body))
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "-v", "install", "--payload", str(f), "--disk", dev]
        + ["--workdir", str(tmp_path / "work"), "--json", "--stream"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def same_body(image: Path, fmt: str, dev: str, tmp_path: Path) -> bool:
    raw = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(raw)])
    size = raw.stat().st_size
    with open(raw, "rb") as a, open(dev, "rb") as b:
        a.seek(MiB)
        b.seek(MiB)
        # the image's own backup GPT (its last 33 sectors) is cleared on the disk
        return a.read(size - MiB - 33 * 512) == b.read(size - MiB - 33 * 512)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_stream_install(tmp_path, make_loop, fmt) -> None:
    image = build_image(tmp_path / f"img.{fmt}", fmt=fmt, size_mib=48)
    server = BadServer(image.read_bytes())
    server.routes["/img"] = paced(piece=512 * 1024, pause=0.01)
    server.start()
    dev = make_loop(DISK)
    fill_pattern(dev)
    try:
        proc, result = install(tmp_path, server.url("/img"), fmt, dev, server.sha256)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert "streamed" in proc.stderr, "the body was not copied during the download"
    assert "streaming write stopped" not in proc.stderr
    verify = subprocess.run(["sgdisk", "-v", dev], capture_output=True, text=True)
    assert "No problems found" in verify.stdout
    assert same_body(image, fmt, dev, tmp_path)
    with open(dev, "rb") as disk:  # the image's own backup GPT, written by the stream, cleared
        disk.seek(48 * MiB - 512)
        assert disk.read(512) == bytes(512)
    steps = {s["step"]: s["status"] for s in result["progress"]}
    assert all(v == "done" for v in steps.values()), steps


def test_stream_checksum_failure_leaves_no_table(tmp_path, make_loop) -> None:
    image = build_image(tmp_path / "img.qcow2", size_mib=48)
    server = BadServer(image.read_bytes())
    server.routes["/img"] = paced(piece=512 * 1024, pause=0.01)
    server.start()
    dev = make_loop(DISK)
    fill_pattern(dev)
    subprocess.run(["sgdisk", "-o", "-n", "1:0:+16M", dev], check=True, capture_output=True)
    wrong = hashlib.sha256(b"another image").hexdigest()
    try:
        proc, result = install(tmp_path, server.url("/img"), "qcow2", dev, wrong)
    finally:
        server.stop()
    assert proc.returncode == 1
    assert result["message"] == msg.bad_checksum("sha256", server.sha256, wrong)
    assert result["step"] == "checksum"
    assert pttype(dev) == "", f"a failed streamed install left a partition table:\n{proc.stderr}"
    with open(dev, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_a_stream_stopped_as_the_download_ends_still_takes_the_disk(tmp_path, make_loop) -> None:
    """A checksum fails the moment the last byte lands, before the copy thread has run: the
    stop must not win that race, or the failed install leaves the old table on some runs (the
    pipeline clears only a disk the stream touched). Once the image's first bytes are there,
    the stream always takes the disk; 20 rounds, each stopped at once (all 20 kept the old
    head before)."""
    image = build_image(tmp_path / "img.qcow2", size_mib=48)
    size = image.stat().st_size
    dev = make_loop(DISK)
    kept = 0
    for _ in range(20):
        with open(dev, "r+b") as f:  # an old disk's head (sgdisk would sleep 1 s per write)
            f.write(b"\xa5" * MiB)
        copy = StreamCopy(image, "qcow2", dev, DISK, tmp_path)
        copy.progress(size, size)
        copy.downloaded()
        copy.stop()
        assert not copy.succeeded
        kept += not copy.touched
        with open(dev, "rb") as f:
            assert (f.read(MiB) == bytes(MiB)) == copy.touched
    assert kept == 0, f"{kept} of 20 stopped streams left the old head in place"


def test_stream_survives_a_drop_and_resume(tmp_path, make_loop) -> None:
    image = build_image(tmp_path / "img.qcow2", size_mib=48)
    data = image.read_bytes()
    server = BadServer(data)
    server.routes["/img"] = paced(len(data) // 2, 512 * 1024, 0.01)
    server.start()
    dev = make_loop(DISK)
    try:
        proc, _ = install(tmp_path, server.url("/img"), "qcow2", dev, server.sha256)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert "streamed" in proc.stderr, proc.stderr
    assert server.count("/img") == 2
    assert server.requests[1].header("range") == f"bytes={len(data) // 2}-"
    assert same_body(image, "qcow2", dev, tmp_path)

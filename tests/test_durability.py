"""The body's one flush: beside the read-back, and always ended before the first table is written.

qemu-img does not flush the disk when its copy ends (``cache.no-flush``); the agent flushes the
body itself while the read-back runs (agent/writer.py ``BodyFlush``). Were the tables written
before that flush had ended, a power cut could leave a disk with its new tables and part of its
body still in a volatile cache: a disk that looks installed and is not. These installs run in
this process, on real loop devices and real HTTP, with the flush slowed (or failing) at the
device call, to see what the pipeline does around it.
"""

from __future__ import annotations

import errno
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_crash import pttype
from test_install import payload

from agent import messages as msg
from agent import pipeline, writer
from agent.payload import parse_request
from agent.status import InstallStatus
from demo.sample_image import build_image

pytestmark = pytest.mark.root
MiB = 1024 * 1024
FLUSH_DELAY = 0.4


class Timeline:
    """What happened when, from the pipeline's calls into the writer."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def mark(self, what: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), what))

    def at(self, what: str) -> float:
        found = [t for t, w in self.events if w == what]
        assert len(found) == 1, f"{what}: {len(found)} times in {self.events}"
        return found[0]


def _watch(monkeypatch, timeline: Timeline, flush_fault: OSError | None = None) -> None:
    """Record the body flush (the ``flush`` thread's device call, slowed), the read-back and
    the first table write; ``flush_fault`` makes that flush fail after the delay."""
    real_flush, real_verify, real_drive = writer.flush, writer.verify_body, writer.write_drive

    def flush(path: str) -> None:
        if threading.current_thread().name != "flush":
            return real_flush(path)
        timeline.mark("flush start")
        time.sleep(FLUSH_DELAY)
        if flush_fault is not None:
            timeline.mark("flush failed")
            raise flush_fault
        real_flush(path)
        timeline.mark("flush end")

    def verify_body(*args, **kwargs):
        timeline.mark("verify start")
        try:
            return real_verify(*args, **kwargs)
        finally:
            timeline.mark("verify end")

    def write_drive(*args, **kwargs):
        timeline.mark("drive")
        return real_drive(*args, **kwargs)

    monkeypatch.setattr(writer, "flush", flush)
    monkeypatch.setattr(writer, "verify_body", verify_body)
    monkeypatch.setattr(writer, "write_drive", write_drive)


def _install(tmp_path: Path, url: str, fmt: str, dev: str, stream: bool) -> InstallStatus:
    status = InstallStatus()
    options = pipeline.InstallOptions(disk=dev, workdir=tmp_path / "work", stream=stream)
    pipeline.run_install(parse_request(payload(url, fmt)), options, status)
    return status


@pytest.mark.parametrize("stream", [False, True], ids=["copy", "stream"])
def test_the_tables_wait_for_the_body_flush_that_runs_beside_the_read_back(
    tmp_path, http_dir, make_loop, monkeypatch, stream
) -> None:
    www, base = http_dir
    build_image(www / "img.qcow2", size_mib=48)
    dev = make_loop(128 * MiB)
    timeline = Timeline()
    _watch(monkeypatch, timeline)
    status = _install(tmp_path, f"{base}/img.qcow2", "qcow2", dev, stream)
    assert status.message == msg.install_done(dev)
    assert pttype(dev) == "gpt"
    # the flush ran while the read-back did (it started before the read-back ended) ...
    assert timeline.at("flush start") < timeline.at("verify end")
    # ... and the config drive, the first table write, waited for it to end
    assert timeline.at("flush end") <= timeline.at("drive"), timeline.events
    assert timeline.at("drive") - timeline.at("verify start") >= FLUSH_DELAY * 0.9


def test_a_failed_body_flush_is_a_failed_write_and_leaves_no_table(
    tmp_path, http_dir, make_loop, monkeypatch
) -> None:
    www, base = http_dir
    build_image(www / "img.qcow2", size_mib=48)
    dev = make_loop(128 * MiB)
    subprocess.run(["sgdisk", "-o", dev], capture_output=True, check=True, timeout=60)
    assert pttype(dev) == "gpt"  # an old table the failed install must not leave
    timeline = Timeline()
    _watch(monkeypatch, timeline, OSError(errno.EIO, "Input/output error"))
    status = _install(tmp_path, f"{base}/img.qcow2", "qcow2", dev, stream=False)
    assert status.message == msg.cant_write("qcow2")
    assert all(w != "drive" for _, w in timeline.events), timeline.events
    assert pttype(dev) == ""
    with open(dev, "rb") as f:
        assert f.read(MiB) == bytes(MiB)

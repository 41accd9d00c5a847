"""The status model and its CLI view."""

from __future__ import annotations

import io

from agent.cli import ProgressPrinter
from agent.status import STEP_KEYS, InstallStatus


def test_snapshot_shape_and_transitions() -> None:
    status = InstallStatus()
    events: list[tuple[str, str]] = []
    status.subscribe(lambda snap, event: events.append((event, snap["step"])))
    snap = status.snapshot()
    assert [p["status"] for p in snap["progress"]] == ["todo"] * len(STEP_KEYS)
    assert snap["progress"][3]["comment"] == "Downloading image"
    status.begin()
    status.start("validate")
    status.done("validate")
    status.start("download")
    status.update_progress(0, 100)
    status.fail("download", "Could not download image located: http://x/y .")
    snap = status.snapshot()
    assert snap["status"] == "error" and snap["step"] == "download"
    assert snap["progress"][0]["status"] == "done"
    assert "seconds" not in snap["progress"][1]  # never started
    failed = dict(snap["progress"][3])
    assert failed.pop("seconds") >= 0
    assert failed == {
        "comment": "Downloading image",
        "status": "error",
        "error": "Could not download image located: http://x/y .",
        "step": "download",
    }
    assert snap["message"].startswith("Could not download")
    assert ("step", "download") in events and events[-1][0] == "step"


def test_progress_rate_limited_and_rate_computed(monkeypatch) -> None:
    import agent.status as st

    clock = [100.0]
    monkeypatch.setattr(st.time, "monotonic", lambda: clock[0])
    status = InstallStatus()
    heard: list[int] = []
    status.subscribe(lambda snap, event: event == "progress" and heard.append(snap["bytesDone"]))
    status.start("download")
    for i in range(1, 11):
        clock[0] += 0.1
        status.update_progress(i * 1000, 10_000)
    assert heard and len(heard) < 10  # at most a few per second
    assert heard[-1] == 10_000  # completion is always reported
    assert status.snapshot()["rate"] > 0


def test_plain_printer_lines() -> None:
    out = io.StringIO()
    status = InstallStatus()
    status.subscribe(ProgressPrinter(out, live=False, interval=0))
    status.begin()
    status.start("validate")
    status.done("validate")
    status.start("download")
    status.update_progress(0, 2048)
    status.update_progress(2048, 2048)
    status.done("download")
    assert status.snapshot()["progress"][3]["bytes"] == 2048
    text = out.getvalue()
    assert "[   ...] Validating request" in text and "[    ok] Validating request" in text
    assert "download: 2.0 KiB / 2.0 KiB (100%)" in text

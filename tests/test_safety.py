"""The install path's safety nets, each proven on real parts (loop devices, real HTTP, tools).

A disk swapped under its device node while the image downloads, a write that did not land, an
image that leaves no room for the config drive, a SIGTERM mid-install, a crashed agent's tmpfs,
secrets in verbose logs: each case here failed before the corresponding fix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from badserver import BadServer, send_head
from conftest import release_loop
from test_install import DISK, disk_digest, fill_pattern, payload, run_cli

from agent import blockdev, claim, workspace, writer
from agent import messages as msg
from agent.messages import InstallError
from demo.sample_image import build_image, build_odd_gpt, build_raw

pytestmark = pytest.mark.root
MiB = 1024 * 1024
ROOT = Path(__file__).parent.parent


def losetup(*args: str) -> str:
    return subprocess.run(
        ["losetup", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def gated_server(payload_bytes: bytes, gate: threading.Event, first: int = 64 * 1024) -> BadServer:
    """Serves ``/img``: the headers and ``first`` body bytes, then waits for ``gate``."""

    def slow(server: BadServer, sock, req, n: int) -> None:
        send_head(sock, "200 OK", {"Content-Length": len(payload_bytes), "ETag": '"g"'})
        sock.sendall(payload_bytes[:first])
        while not gate.wait(0.05):
            if server._stop.is_set():
                return
        sock.sendall(payload_bytes[first:])

    server = BadServer(payload_bytes).start()
    server.routes["/img"] = slow
    return server


def start_install(tmp_path: Path, body: dict, disk: str, *extra: str) -> subprocess.Popen[str]:
    f = tmp_path / "payload.json"
    f.write_text(json.dumps(body))
    return subprocess.Popen(
        [sys.executable, "-m", "agent", *extra, "install", "--payload", str(f)]
        + ["--disk", disk, "--workdir", str(tmp_path / "work"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def downloading(work: Path) -> bool:
    return any(p.name == "image" for p in work.glob("byoi-*/image"))


def assert_workdir_clean(work: Path) -> None:
    assert not work.exists() or not any(work.iterdir()), list(work.iterdir())
    assert str(work) not in Path("/proc/mounts").read_text()


# --- 1. the disk is pinned between its choice and the write ----------------------------------


def test_disk_cannot_be_swapped_during_download(tmp_path, make_loop) -> None:
    """An attempt to replace the loop device's backing file (same node, same size: a hot-swap)
    while the image downloads fails: the agent holds the disk open (and flock-ed) from its
    choice to the end, so the node keeps naming the chosen disk, which gets the image; the
    other file is untouched. (A node that names another device anyway is refused by the
    identity check: test_hold_refuses_a_resized_disk and claim's tests.)"""
    image = build_image(tmp_path / "img.qcow2", size_mib=24).read_bytes()
    gate = threading.Event()
    server = gated_server(image, gate)
    dev = make_loop(DISK, name="first.img")
    other = tmp_path / "second.img"
    with open(other, "wb") as f:
        f.write(os.urandom(DISK))
    before = disk_digest(str(other))
    try:
        proc = start_install(tmp_path, payload(server.url("/img"), "qcow2"), dev)
        wait_for(lambda: downloading(tmp_path / "work"))
        subprocess.run(["losetup", "-d", dev], capture_output=True)  # deferred: the disk is open
        swap = subprocess.run(["losetup", dev, str(other)], capture_output=True, text=True)
        gate.set()
        out, err = proc.communicate(timeout=120)
    finally:
        server.stop()
    result = json.loads(out.strip().splitlines()[-1])
    assert swap.returncode != 0, "the node could be given another backing file"
    assert proc.returncode == 0, err
    assert result["disk"] == dev
    assert disk_digest(str(other)) == before, "the other disk was written"
    assert_workdir_clean(tmp_path / "work")


def test_claim_blocks_exclusive_openers_not_our_tools(make_loop, tmp_path) -> None:
    """While held: another O_EXCL open (what mount, mdadm, mkfs do) gets EBUSY; qemu-img,
    sgdisk, sfdisk and blkid still work; the partition re-read goes through our descriptor."""
    (tmp_path / "p.img").write_bytes(b"")
    os.truncate(tmp_path / "p.img", 64 * MiB)
    # partition scanning on, so that BLKRRPART really runs
    dev = losetup("-f", "--show", "-P", str(tmp_path / "p.img"))
    raw = build_raw(tmp_path / "img.raw", size_mib=24)
    try:
        pinned = claim.pin(dev)
        with claim.hold(pinned) as fd:
            probe = subprocess.run(
                [sys.executable, "-c", f"import os; os.open({dev!r}, os.O_RDONLY | os.O_EXCL)"],
                capture_output=True,
                text=True,
            )
            assert probe.returncode != 0 and "Device or resource busy" in probe.stderr
            for args in (
                [
                    "qemu-img",
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    "-n",
                    "-t",
                    "none",
                    str(raw),
                    dev,
                ],
                ["sgdisk", "-e", dev],
                ["sfdisk", "--json", dev],
                ["blkid", "-p", dev],
            ):
                done = subprocess.run(args, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (args, done.stderr)
            other = os.open(dev, os.O_RDONLY)
            try:
                with pytest.raises(OSError) as err:
                    fcntl.ioctl(other, blockdev.BLKRRPART)
                assert err.value.errno == errno.EBUSY
            finally:
                os.close(other)
            assert blockdev.claimed_fd(dev) == fd
            blockdev._blkrrpart(dev)  # through the claim: no EBUSY
        assert blockdev.claimed_fd(dev) is None
        os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))  # released
    finally:
        release_loop(dev)


def test_hold_refuses_a_resized_disk(make_loop, tmp_path) -> None:
    dev = make_loop(32 * MiB)
    pinned = claim.pin(dev)
    os.truncate(tmp_path / "disk.img", 48 * MiB)
    losetup("-c", dev)  # the kernel now sees 48 MiB on the same node
    with pytest.raises(InstallError) as err, claim.hold(pinned):
        pass
    assert "size was 33554432, now 50331648" in err.value.message


# --- 2. the written data is read back --------------------------------------------------------


def test_verify_regions() -> None:
    window = (MiB, 4096 * MiB)
    assert writer.verify_regions("none", None, window) == []
    assert writer.verify_regions("full", [(0, MiB)], window) == [window]
    data = [(2 * MiB, 3 * MiB), (6 * MiB, MiB), (900 * MiB, 10 * MiB), (5000 * MiB, MiB)]
    regions = writer.verify_regions("sample", data, window)
    # close data ranges joined, every data byte covered
    assert any(o <= 2 * MiB and o + n >= 7 * MiB for o, n in regions)
    assert any(o <= 900 * MiB and o + n >= 910 * MiB for o, n in regions)
    assert all(o >= MiB and o + n <= 4097 * MiB for o, n in regions)  # inside the window
    zero_samples = [r for r in regions if r[1] == MiB and r[0] > 910 * MiB]
    assert len(zero_samples) >= 10  # the zero ranges are sampled, spread over the window
    assert sum(n for _, n in regions) < 64 * MiB


@pytest.mark.parametrize("count", [1, 2, 3])
def test_verify_lanes_share_the_ranges_evenly(count: int) -> None:
    regions = [(MiB, 700 * MiB + 4096), (900 * MiB, 3 * MiB), (1000 * MiB, 40 * MiB + 512)]
    out = writer.lanes(regions, count)
    assert len(out) == count
    flat = [r for lane in out for r in lane]
    assert writer.merge(flat, 4096 * MiB, 512) == writer.merge(regions, 4096 * MiB, 512)
    assert sum(n for _, n in flat) == sum(n for _, n in regions)  # no byte twice
    assert flat == sorted(flat)
    sizes = [sum(n for _, n in lane) for lane in out]
    assert max(sizes) - min(sizes) <= count * MiB  # about equal (cuts are MiB-aligned)
    cuts = {o + n for o, n in flat} - {o + n for o, n in regions}
    assert all(c % MiB == 0 for c in cuts)  # a range is cut at a MiB boundary only
    assert writer.lanes([], 2) == []
    assert writer.lanes([(0, 512)], 2) == [[(0, 512)]]


def test_verify_lanes_count_what_each_compare_costs_to_start() -> None:
    """A long data range, then many small ones (an image's scattered metadata, the zero
    samples): the lane holding the small ones takes fewer bytes, so the lanes end together."""
    small = [(1024 * MiB + i * 64 * MiB, 2 * MiB) for i in range(20)]
    regions = [(MiB, 700 * MiB), *small]
    overhead = 12 * MiB
    plain = writer.lanes(regions, 2)
    weighed = writer.lanes(regions, 2, overhead=overhead)
    assert [r for lane in weighed for r in lane] != [r for lane in plain for r in lane]
    assert writer.merge([r for lane in weighed for r in lane], 8192 * MiB, MiB) == writer.merge(
        regions, 8192 * MiB, MiB
    )

    def cost(lane: list[tuple[int, int]]) -> int:
        return sum(n + overhead for _, n in lane)

    first, second = weighed
    assert len(second) == 21  # the rest of the long range, then every small one
    assert sum(n for _, n in second) < sum(n for _, n in first)
    assert abs(cost(first) - cost(second)) <= overhead + MiB
    assert abs(cost(plain[0]) - cost(plain[1])) > 200 * MiB  # what the bytes alone gave


def _plan_and_copy(image: Path, fmt: str, dev: str, tmp_path: Path):
    from test_layout import disk_of, virtual_size

    from agent import blockdev, configdrive, layout

    drive = configdrive.build_drive(_request(), tmp_path / "drive.iso")
    plan = layout.plan(image, fmt, virtual_size(image, fmt), disk_of(dev), drive, [], tmp_path)
    blockdev.zero(dev, plan.zero_first)
    writer.copy_body(image, fmt, dev, plan, fmt)
    return plan


@pytest.mark.parametrize("mode", ["full", "sample"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_verify_catches_a_lost_write_and_ignores_the_rest_of_the_disk(
    tmp_path, make_loop, fmt, mode
) -> None:
    image = build_image(tmp_path / f"img.{fmt}", fmt=fmt, size_mib=24)
    dev = make_loop(64 * MiB)
    fill_pattern(dev)
    plan = _plan_and_copy(image, fmt, dev, tmp_path)
    from agent import inspect

    extents = inspect.data_extents(image, fmt)
    writer.verify_body(image, fmt, dev, plan, fmt, mode, extents=extents)  # the rest is fine
    fd = os.open(dev, os.O_WRONLY)
    try:  # a write the disk "lost": one sector of the root partition reverts
        os.pwrite(fd, os.urandom(512), 20 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    with pytest.raises(InstallError) as err:
        writer.verify_body(image, fmt, dev, plan, fmt, mode, extents=extents)
    assert err.value.message == msg.cant_write(fmt)
    assert "differs from the image" in err.value.detail
    writer.verify_body(image, fmt, dev, plan, fmt, "none")  # nothing read: no error


def test_interrupted_convert_kills_qemu_img(tmp_path, make_loop) -> None:
    """An exception in the progress loop (what a SIGTERM becomes) must not leave qemu-img
    writing on in the background."""
    raw = build_raw(tmp_path / "img.raw", size_mib=256)
    with open(raw, "r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(200 * MiB))
    dev = make_loop(300 * MiB)

    def interrupt(done: int, total: int | None) -> None:
        raise KeyboardInterrupt

    from test_layout import disk_of, virtual_size

    from agent import configdrive, layout

    drive = configdrive.build_drive(_request(), tmp_path / "drive.iso")
    plan = layout.plan(raw, "raw", virtual_size(raw), disk_of(dev), drive, [], tmp_path)
    with pytest.raises(KeyboardInterrupt):
        writer.copy_body(raw, "raw", dev, plan, "raw", on_progress=interrupt)
    children = [p.name() for p in psutil.Process().children(recursive=True)]
    assert "qemu-img" not in children


# --- 2b. the config drive's room is checked before the disk is wiped -------------------------


def test_image_almost_as_big_as_the_disk_is_refused_before_writing(
    tmp_path, http_dir, make_loop
) -> None:
    """A GPT image filling itself up to its backup GPT, on a disk 512 KiB larger: the image
    fits, the config drive does not. The disk must not be wiped for a certain failure."""
    www, base_url = http_dir
    raw = build_raw(tmp_path / "img.raw", size_mib=48)
    start = (
        subprocess.run(["sgdisk", "-i", "2", str(raw)], capture_output=True, text=True, check=True)
        .stdout.split("First sector: ")[1]
        .split()[0]
    )
    # partition 2 now reaches the image's last usable sector, just before its backup GPT
    subprocess.run(["sgdisk", "-d", "2", "-n", f"2:{start}:0", str(raw)], check=True)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(www / "img.qcow2")],
        check=True,
    )
    dev = make_loop(48 * MiB + 512 * 1024)
    before = fill_pattern(dev)
    proc = install_cli(tmp_path, payload(f"{base_url}/img.qcow2", "qcow2"), dev)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1
    assert result["message"] == msg.CONFIGDRIVE_FAILED, proc.stderr
    assert result["step"] == "prepare"
    assert disk_digest(dev) == before, "the disk was wiped for an install that could not end"


def install_cli(tmp_path: Path, body: dict, disk: str, *extra: str, options: tuple = ()):
    f = tmp_path / "payload.json"
    f.write_text(json.dumps(body))
    work = tmp_path / "work"
    proc = run_cli(
        *extra, "install", "--payload", str(f), "--disk", disk, "--workdir", str(work), "--json",
        *options,
    )  # fmt: skip
    assert_workdir_clean(work)
    return proc


# --- 4. signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_download_ends_with_one_message(tmp_path, make_loop, sig) -> None:
    image = build_image(tmp_path / "img.qcow2", size_mib=24).read_bytes()
    gate = threading.Event()
    server = gated_server(image, gate)
    dev = make_loop(DISK)
    before = fill_pattern(dev)
    try:
        proc = start_install(tmp_path, payload(server.url("/img"), "qcow2"), dev)
        wait_for(lambda: downloading(tmp_path / "work"))
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        server.stop()
    assert proc.returncode == 1, err
    message = msg.interrupted("download")
    assert err.strip().splitlines()[-1] == message
    assert err.count(message) == 1
    assert json.loads(out.strip().splitlines()[-1])["message"] == message
    assert_workdir_clean(tmp_path / "work")
    assert disk_digest(dev) == before


def test_two_installs_on_one_disk_the_second_is_refused(tmp_path, make_loop) -> None:
    """Two agents (two processes) on one disk: the second finds the first one's flock and is
    refused as busy before it downloads anything; the first one's install is untouched."""
    image = build_image(tmp_path / "img.qcow2", size_mib=24).read_bytes()
    gate = threading.Event()
    server = gated_server(image, gate)
    dev = make_loop(DISK)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    try:
        first = start_install(tmp_path, payload(server.url("/img"), "qcow2"), dev)
        wait_for(lambda: downloading(tmp_path / "work") and server.count("/img") == 1)
        requests_before = server.count("/img")
        second = install_cli(second_dir, payload(server.url("/img"), "qcow2"), dev)
        gate.set()
        out, err = first.communicate(timeout=120)
    finally:
        server.stop()
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert second.returncode == 1
    assert result["message"] == msg.disk_busy(
        dev, "another install (or a partitioning tool) holds its lock"
    )
    assert result["step"] == "disk"
    assert server.count("/img") == requests_before, "the refused install downloaded"
    assert first.returncode == 0, err


def test_workdir_with_a_comma(tmp_path, http_dir, make_loop) -> None:
    """qemu's option syntax splits on commas: a work area path holding one still works (the
    values are escaped), for qcow2 (head, labels, body and read-back through --image-opts)."""
    www, base_url = http_dir
    build_image(www / "img.qcow2", size_mib=24)
    dev = make_loop(DISK)
    odd = tmp_path / "work,dir"
    f = tmp_path / "payload.json"
    f.write_text(json.dumps(payload(f"{base_url}/img.qcow2", "qcow2")))
    proc = run_cli("install", "--payload", str(f), "--disk", dev, "--workdir", str(odd))
    assert proc.returncode == 0, proc.stderr
    verify = subprocess.run(["sgdisk", "-v", dev], capture_output=True, text=True)
    assert "No problems found" in verify.stdout


# --- 5. secrets ----------------------------------------------------------------------------------


def test_no_secret_in_verbose_output(tmp_path, make_loop) -> None:
    """-vv, an Authorization header, a URL password, a redirect, then server errors: neither
    secret may appear anywhere on stdout or stderr."""
    header_secret, url_secret = "Basic SEKRETheaderVALUE", "p4ssw0rdINurl"

    def redirect(server, sock, req, n):
        send_head(sock, "302 Found", {"Location": "/err", "Content-Length": 0})

    def error(server, sock, req, n):
        send_head(sock, "500 Oops", {"Content-Length": 0, "Retry-After": 0})

    server = BadServer(b"x").start()
    server.routes.update({"/start": redirect, "/err": error})
    body = payload(server.url("/start", userinfo=f"user:{url_secret}"), "raw")
    body["userMetadata"] += [
        {"key": "httpHeaders0Key", "value": "Authorization"},
        {"key": "httpHeaders0Value", "value": header_secret},
    ]
    try:
        # the server keeps failing: give up after a few seconds of outage, not the default 600
        proc = install_cli(
            tmp_path, body, make_loop(DISK), "-vv", options=("--outage-tolerance", "3")
        )
    finally:
        server.stop()
    assert proc.returncode == 1
    assert "Could not download image located" in proc.stderr
    assert "DEBUG" in proc.stderr  # the verbose log really ran
    assert server.count("/err") > 1  # retried, so the retry logs ran too
    for secret in (header_secret, "SEKRETheaderVALUE", url_secret):
        assert secret not in proc.stdout and secret not in proc.stderr


# --- 6. the workspace ----------------------------------------------------------------------------


def test_stale_areas_pure() -> None:
    names = ["byoi-1-a", "byoi-2-b", "byoi-3-c", "other", "byoi-x"]
    assert workspace.stale_areas(names, alive={1, 3}, me=3) == ["byoi-2-b", "byoi-3-c"]


def test_crashed_agent_tmpfs_is_cleaned_on_the_next_run(tmp_path) -> None:
    """A dead agent's mounted area (tmpfs with an image in it) and a live one's."""
    work = tmp_path / "work"
    dead = work / "byoi-999999999-x"  # no such pid
    live = work / f"byoi-{os.getppid()}-y"
    for area in (dead, live):
        area.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "byoi-tmpfs", str(area)], check=True)
        (area / "image").write_bytes(b"old image")
    try:
        with workspace.download_area(work, 64 * MiB) as area:
            assert area.name.startswith(f"byoi-{os.getpid()}-")
            assert not dead.exists()
            assert str(dead) not in Path("/proc/mounts").read_text()
            assert (live / "image").exists(), "a running agent's area was removed"
    finally:
        for area in (dead, live):
            subprocess.run(["umount", "-l", str(area)], capture_output=True)


def _mount_options(path: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[3].split(",")
    return []


def test_download_area_is_its_own_tmpfs_on_a_small_tmpfs(tmp_path) -> None:
    """A work directory on a tmpfs smaller than the memory budget (a rescue's /run is capped
    at half the RAM): the area is a tmpfs of its own, capped at the budget, so an image
    larger than the outer tmpfs still fits."""
    work = tmp_path / "run"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "outer", str(work)], check=True)
    try:
        with workspace.download_area(work, 96 * MiB) as area:
            options = _mount_options(area)
            assert options, f"{area} is not a mount point of its own"
            assert "size=98304k" in options, options
            with open(area / "image", "wb") as f:
                for _ in range(48):  # 48 MiB: three times the outer tmpfs
                    f.write(b"\1" * MiB)
        assert str(work) + "/" not in Path("/proc/mounts").read_text()
    finally:
        subprocess.run(["umount", "-l", str(work)], capture_output=True)


def test_download_area_where_no_mount_is_allowed(tmp_path, monkeypatch) -> None:
    """A container that refuses mount(2): a work directory on tmpfs is used as it is; one on
    another filesystem is an error (the image must live in RAM)."""
    from agent.tools import ToolError

    real_run = workspace.run

    def no_mount(args, **kw):  # type: ignore[no-untyped-def]
        if args[0] == "mount":
            raise ToolError("mount: permission denied (are you root?)")
        return real_run(args, **kw)

    work = tmp_path / "run"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "outer", str(work)], check=True)
    monkeypatch.setattr(workspace, "run", no_mount)
    try:
        with workspace.download_area(work, 96 * MiB) as area:
            assert not _mount_options(area) and workspace.filesystem_type(area) == "tmpfs"
        assert not any(work.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(work)], capture_output=True)
    disk_dir = tmp_path / "on-disk"
    disk_dir.mkdir()
    if workspace.filesystem_type(disk_dir) != "tmpfs":
        with pytest.raises(ToolError), workspace.download_area(disk_dir, 96 * MiB):
            pass


def test_relative_and_non_empty_workdir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("rel").mkdir()
    Path("rel/keep.txt").write_text("mine")
    with workspace.download_area(Path("rel"), 64 * MiB) as area:
        assert area.is_absolute()
        assert workspace.filesystem_type(area) == "tmpfs"
        (area / "image").write_bytes(b"x")
    assert [p.name for p in Path("rel").iterdir()] == ["keep.txt"]
    assert str(tmp_path / "rel") not in Path("/proc/mounts").read_text()


# --- 3. odd images: the pre-check and the post-write steps agree ------------------------------


def _mbr(tmp_path: Path, size: int, parts: list[str], name: str = "mbr.raw") -> Path:
    image = tmp_path / name
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["sfdisk", "--no-reread", str(image)],
        input="label: dos\n" + "\n".join(parts) + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    return image


def _request():
    from test_layout import request

    return request()


def _drive(tmp_path: Path) -> Path:
    from agent import configdrive

    return configdrive.build_drive(_request(), tmp_path / "drive.iso")


def _disk(size: int, path: str = "/dev/null"):
    from types import SimpleNamespace

    return SimpleNamespace(path=path, size=size, logical_sector_size=512)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_room_for_the_drive_with_four_primaries(tmp_path, fmt) -> None:
    """Four primaries and no config drive: refused before writing; the same image whose fourth
    partition is a CONFIG-2 FAT drive (reused later) is not."""
    from agent import layout

    four = [
        "start=2048, size=8192, type=83",
        "start=10240, size=2048, type=83",
        "start=12288, size=2048, type=83",
        "start=14336, size=4096, type=c",
    ]
    drive = _drive(tmp_path)
    plain = _mbr(tmp_path, 16 * MiB, four, "plain.raw")
    own = _mbr(tmp_path, 16 * MiB, four, "own.raw")
    fat = tmp_path / "old.fat"
    subprocess.run(["mkfs.fat", "-C", "-n", "CONFIG-2", str(fat), "2048"], check=True)
    with open(own, "r+b") as f:
        f.seek(14336 * 512)
        f.write(fat.read_bytes())
    if fmt == "qcow2":
        for image in (plain, own):
            converted = image.with_suffix(".qcow2")
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(converted)],
                check=True,
            )
            image.unlink()
            converted.rename(image)
    with pytest.raises(layout.PlanError) as err:
        layout.plan(plain, fmt, 16 * MiB, _disk(64 * MiB), drive, [], tmp_path)
    assert err.value.kind == "configdrive" and "four primary" in str(err.value)
    plan = layout.plan(own, fmt, 16 * MiB, _disk(64 * MiB), drive, [], tmp_path)
    assert plan.reused and plan.partition_number == 4


def test_mbr_image_with_an_extended_partition(tmp_path, make_loop) -> None:
    """Logical partitions inside an extended one: the config drive goes after the extended
    partition as a primary (slot 3), nothing inside the extended partition moves."""
    from test_layout import install

    image = _mbr(
        tmp_path,
        24 * MiB,
        [
            "start=2048, size=8192, type=83",
            "start=10240, size=30720, type=5",
            "start=12288, size=8192, type=83",
            "start=22528, size=8192, type=83",
        ],
    )
    before = json.loads(
        subprocess.run(["sfdisk", "--json", str(image)], capture_output=True).stdout
    )
    dev = make_loop(64 * MiB)
    plan = install(image, dev, _drive(tmp_path))
    after = json.loads(subprocess.run(["sfdisk", "--json", dev], capture_output=True).stdout)
    old = [(p["start"], p["size"], p["type"]) for p in before["partitiontable"]["partitions"]]
    new = after["partitiontable"]["partitions"]
    assert all(p in [(q["start"], q["size"], q["type"]) for q in new] for p in old)
    assert plan.partition_number == 3 and len(new) == len(old) + 1
    added = [p for p in new if p["node"].endswith("p3")][0]
    assert added["start"] * 512 + added["size"] * 512 == 64 * MiB
    out = subprocess.run(
        ["blkid", "-p", "-O", str(added["start"] * 512), "-o", "export", dev],
        capture_output=True,
        text=True,
    ).stdout
    assert "LABEL=config-2" in out


def test_gpt_entries_not_at_lba2_and_hybrid_mbr(tmp_path, make_loop) -> None:
    """A GPT whose entry array starts at LBA 2048 (sgdisk -j) and carries a hybrid MBR: the
    head grows to cover the entries, the backup moves, the config drive is added, sgdisk -v
    stays clean, the hybrid MBR's entries are kept, and blkid finds config-2."""
    from test_layout import install, sgdisk_clean

    image = build_odd_gpt(tmp_path / "odd.raw")
    with open(image, "rb") as f:
        head = f.read(1024)
    assert int.from_bytes(head[512 + 72 : 512 + 80], "little") == 2048  # entries LBA
    assert 0xEF in head[446 + 4 : 510 : 16]  # a hybrid MBR: the ESP is in the MBR too
    dev = make_loop(64 * MiB)
    plan = install(image, dev, _drive(tmp_path))
    assert plan.head_length == 2 * MiB
    assert sgdisk_clean(dev)
    table = json.loads(subprocess.run(["sfdisk", "--json", dev], capture_output=True).stdout)
    added = [p for p in table["partitiontable"]["partitions"] if p.get("name") == "config-2"]
    assert len(added) == 1 and plan.partition_number == 3
    out = subprocess.run(
        ["blkid", "-p", "-O", str(added[0]["start"] * 512), "-o", "export", dev],
        capture_output=True,
        text=True,
    ).stdout
    assert "LABEL=config-2" in out
    with open(dev, "rb") as f:
        assert 0xEF in f.read(512)[446 + 4 : 510 : 16]  # the hybrid MBR survived


def test_stale_tmpfs_is_freed_before_the_memory_check(tmp_path, monkeypatch) -> None:
    """A dead agent's tmpfs still holds its image, and tmpfs pages are not reclaimable: the
    cleanup must happen before the memory step measures what is available."""
    from agent import memory, pipeline
    from agent.payload import parse_request
    from agent.status import InstallStatus

    work = tmp_path / "work"
    dead = work / "byoi-999999999-x"
    dead.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "byoi-tmpfs", str(dead)], check=True)
    seen: list[tuple[bool, str]] = []

    def budget() -> int:
        seen.append((dead.exists(), Path("/proc/mounts").read_text()))
        return -1  # end the install right after the memory step

    monkeypatch.setattr(memory, "image_budget", budget)
    try:
        (dead / "image").write_bytes(os.urandom(MiB))
        ok = pipeline.run_install(
            parse_request(payload("http://127.0.0.1:9/x.raw", "raw")),
            pipeline.InstallOptions(workdir=work),
            InstallStatus(),
        )
        assert not ok
        assert len(seen) == 1
        existed, mounts = seen[0]
        assert not existed and str(dead) not in mounts, "measured with the stale tmpfs mounted"
    finally:
        subprocess.run(["umount", "-l", str(dead)], capture_output=True)

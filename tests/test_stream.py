"""The streaming NBD export (agent/stream.py), read by the real qemu-img while the file grows."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import stream
from agent.download import DownloadSettings, download
from agent.messages import InstallError
from tests.badserver import BadServer, paced, send_head
from tests.conftest import needs_root

pytestmark = pytest.mark.timeout(180)  # a read that never wakes fails the test, not the run
MiB = 1024 * 1024
SMALL_CLUSTER = 8192


def _qemu_img(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)


def _digest(path: Path | str, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left is None or left > 0:
            block = f.read(MiB if left is None else min(MiB, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def _sparse_random_raw(path: Path, virtual: int, runs: int, run_size: int) -> None:
    """A raw disk with ``runs`` random extents spread over it and holes between them."""
    with open(path, "wb") as f:
        f.truncate(virtual)
        stride = virtual // runs
        for i in range(runs):
            f.seek(i * stride)
            f.write(os.urandom(run_size))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A raw image (random data) and a qcow2 made from a sparse random raw by qemu-img."""
    d = tmp_path_factory.mktemp("images")
    raw = d / "image.raw"
    raw.write_bytes(os.urandom(24 * MiB))
    sparse = d / "sparse.raw"
    _sparse_random_raw(sparse, 96 * MiB, runs=12, run_size=2 * MiB + 4096)
    qcow2 = d / "image.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", sparse, qcow2], check=True)
    # 8 KiB clusters: one L2 table maps 8 MiB, so 96 MiB make 12 streaming windows
    small = d / "small-clusters.qcow2"
    opts = f"cluster_size={SMALL_CLUSTER}"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-o", opts, sparse, small], check=True)
    compressed = d / "compressed.qcow2"  # as many cloud images are shipped
    args = ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, sparse, compressed]
    subprocess.run(args, check=True)
    return {"raw": raw, "qcow2": qcow2, "small": small, "compressed": compressed}


def _grow(
    source: Path,
    dest: Path,
    growing: stream.Growing,
    chunk: int = 1 * MiB,
    pause: float = 0.01,
    fail_at: int | None = None,
) -> threading.Thread:
    """A download stand-in: append ``source`` to ``dest`` in chunks with pauses, reporting
    each chunk after it is written; with ``fail_at`` it gives up there."""

    def run() -> None:
        with open(source, "rb") as src, open(dest, "r+b") as out:
            done = 0
            while block := src.read(chunk):
                if fail_at is not None and done >= fail_at:
                    growing.fail("connection reset by peer")
                    return
                out.write(block)
                out.flush()
                done += len(block)
                growing.advance(done)
                time.sleep(pause)
        growing.finish()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def growing_file(tmp_path: Path) -> Callable[[Path], tuple[Path, stream.Growing]]:
    def make(source: Path) -> tuple[Path, stream.Growing]:
        dest = tmp_path / f"dl-{source.name}"
        dest.touch()
        return dest, stream.Growing(source.stat().st_size)

    return make


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_while_the_file_grows_matches_a_plain_convert(
    fmt: str, images: dict[str, Path], growing_file, tmp_path: Path
) -> None:
    image = images[fmt]
    expected = tmp_path / "expected.raw"
    assert _qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(expected)).returncode == 0
    dest, growing = growing_file(image)
    out = tmp_path / "out.raw"
    with stream.export(dest, growing.size, growing, tmp_path) as nbd:
        feeder = _grow(image, dest, growing)
        proc = _qemu_img("convert", *stream.source_args(nbd, fmt), "-O", "raw", str(out))
        feeder.join()
    assert proc.returncode == 0, proc.stderr
    assert _digest(out) == _digest(expected)
    assert growing.blocked > 0  # qemu-img really asked for bytes not yet downloaded
    print(f"{fmt}: {growing.blocked} reads waited for the download")


@pytest.mark.parametrize("kind", ["small", "compressed"])
def test_qcow2_in_windows_onto_a_file_matches_a_plain_convert(
    kind: str, images: dict[str, Path], growing_file, tmp_path: Path
) -> None:
    """The windowed convert the writer uses when streaming a qcow2 (see stream.windows)."""
    image = images[kind]
    expected = tmp_path / "expected.raw"
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(expected))
    virtual = expected.stat().st_size
    out = tmp_path / "out.raw"
    with open(out, "wb") as f:
        f.truncate(virtual)
    dest, growing = growing_file(image)
    with stream.export(dest, growing.size, growing, tmp_path) as nbd:
        feeder = _grow(image, dest, growing, chunk=512 * 1024)
        for offset, size in stream.windows((0, virtual), stream.l2_coverage(SMALL_CLUSTER)):
            target = f"driver=raw,offset={offset},size={size},file.driver=file,file.filename={out}"
            proc = _qemu_img(
                "convert",
                *stream.source_args(nbd, "qcow2", offset, size),
                "-n",
                "-W",
                "-m",
                "16",
                "--target-image-opts",
                target,
            )
            assert proc.returncode == 0, proc.stderr
        feeder.join()
    assert _digest(out) == _digest(expected)


@pytest.mark.parametrize("kind", ["small", "compressed"])
def test_a_window_converts_from_the_start_of_the_file_a_whole_convert_waits(
    kind: str, images: dict[str, Path], growing_file, tmp_path: Path
) -> None:
    """Why qcow2 streams in windows: with only the first part of the file downloaded, the
    first window converts completely, while a convert of the whole image is still waiting
    (its first pass reads every L2 table, the last ones near the end of the file)."""
    image = images[kind]
    dest, growing = growing_file(image)
    dest.write_bytes(image.read_bytes()[: growing.size * 3 // 10])
    growing.advance(growing.size * 3 // 10)
    out = tmp_path / "out.raw"
    with open(out, "wb") as f:
        f.truncate(96 * MiB)
    offset, size = stream.windows((0, 96 * MiB), stream.l2_coverage(SMALL_CLUSTER))[0]
    target = f"driver=raw,offset={offset},size={size},file.driver=file,file.filename={out}"
    with stream.export(dest, growing.size, growing, tmp_path) as nbd:
        whole = subprocess.Popen(
            ["qemu-img", "convert", *stream.source_args(nbd, "qcow2"), "-O", "raw", "-n", str(out)],
            stderr=subprocess.PIPE,
            text=True,
        )
        first = _qemu_img(
            "convert",
            *stream.source_args(nbd, "qcow2", offset, size),
            "-n",
            "--target-image-opts",
            target,
            timeout=60,
        )
        assert first.returncode == 0, first.stderr
        assert whole.poll() is None  # still blocked: it needs bytes past the first 30 %
        with open(dest, "r+b") as f:  # the rest of the download
            f.seek(growing.have)
            f.write(image.read_bytes()[growing.have :])
        growing.finish()
        _, err = whole.communicate(timeout=60)
    assert whole.returncode == 0, err


@needs_root
@pytest.mark.root
def test_streamed_qcow2_onto_a_loop_device(
    images: dict[str, Path], growing_file, make_loop, tmp_path: Path
) -> None:
    image = images["qcow2"]
    expected = tmp_path / "expected.raw"
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(expected))
    virtual = expected.stat().st_size
    dev = make_loop(virtual + 4 * MiB)
    dest, growing = growing_file(image)
    with stream.export(dest, growing.size, growing, tmp_path) as nbd:
        feeder = _grow(image, dest, growing)
        args = [*stream.source_args(nbd, "qcow2"), "-O", "raw", "-n", "-t", "none", "-W"]
        proc = _qemu_img("convert", *args, "-m", "16", dev)
        feeder.join()
    assert proc.returncode == 0, proc.stderr
    assert _digest(dev, virtual) == _digest(expected)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download_failure_fails_qemu_img_instead_of_hanging(
    fmt: str, images: dict[str, Path], growing_file, tmp_path: Path
) -> None:
    image = images[fmt]
    dest, growing = growing_file(image)
    out = tmp_path / "out.raw"
    failed_at: list[float] = []
    fail = growing.fail
    growing.fail = lambda reason: (failed_at.append(time.monotonic()), fail(reason))
    with stream.export(dest, growing.size, growing, tmp_path) as nbd:
        feeder = _grow(image, dest, growing, fail_at=growing.size // 2)
        # the timeout only turns a hang into a test failure; a prompt I/O error is expected
        proc = _qemu_img(
            "convert", *stream.source_args(nbd, fmt), "-O", "raw", str(out), timeout=60
        )
        exited = time.monotonic()
        feeder.join()
    print(f"{fmt}: qemu-img exited {exited - failed_at[0]:.3f} s after the download failed")
    assert proc.returncode != 0
    assert "Input/output error" in proc.stderr, proc.stderr


FAST = DownloadSettings(
    backoff_initial=0.01, backoff_max=0.05, max_attempts=2, stall_timeout=5, progress_interval=0
)


def _streamed_download(url: str, dest: Path, growing: stream.Growing) -> threading.Thread:
    """The agent's real download feeding the export, as the pipeline wires it."""

    def run() -> None:
        try:
            download(
                url,
                dest,
                headers={},
                image_type="qcow2",
                checksum_type="sha256",
                memory_budget=None,
                on_progress=lambda done, _total: growing.advance(done),
                settings=FAST,
            )
        except InstallError as exc:
            growing.fail(exc.message)
            return
        growing.finish()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_agent_download_dropped_and_resumed_while_streaming(
    fmt: str, images: dict[str, Path], tmp_path: Path
) -> None:
    image = images[fmt]
    payload = image.read_bytes()
    expected = tmp_path / "expected.raw"
    _qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(expected))
    server = BadServer(payload).start()
    server.routes["/img"] = paced(len(payload) // 2)
    dest = tmp_path / "dl.img"
    growing = stream.Growing(len(payload))
    out = tmp_path / "out.raw"
    try:
        with stream.export(dest, growing.size, growing, tmp_path) as nbd:
            fetch = _streamed_download(server.url("/img"), dest, growing)
            proc = _qemu_img("convert", *stream.source_args(nbd, fmt), "-O", "raw", str(out))
            fetch.join()
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert server.count("/img") == 2  # it was dropped and resumed
    assert server.requests[1].header("range") == f"bytes={len(payload) // 2}-"
    assert growing.blocked > 0
    assert _digest(out) == _digest(expected)


def test_agent_download_failing_for_good_fails_the_convert(
    images: dict[str, Path], tmp_path: Path
) -> None:
    payload = images["qcow2"].read_bytes()
    server = BadServer(payload).start()
    cut = paced(len(payload) // 3)
    server.routes["/img"] = lambda s, sock, req, n: (
        cut(s, sock, req, n) if n == 1 else send_head(sock, "404 Not Found", {"Content-Length": 0})
    )
    dest = tmp_path / "dl.img"
    growing = stream.Growing(len(payload))
    try:
        with stream.export(dest, growing.size, growing, tmp_path) as nbd:
            fetch = _streamed_download(server.url("/img"), dest, growing)
            args = [*stream.source_args(nbd, "qcow2"), "-O", "raw", str(tmp_path / "out.raw")]
            proc = _qemu_img("convert", *args, timeout=60)
            fetch.join()
    finally:
        server.stop()
    assert proc.returncode != 0
    assert "Input/output error" in proc.stderr, proc.stderr


def _nbd_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbd")]


def test_exit_ends_blocked_clients_and_removes_the_server(
    images: dict[str, Path], growing_file, tmp_path: Path
) -> None:
    """Leaving the context while qemu-img waits for bytes that never come: qemu-img fails,
    the threads and the socket are gone, nothing listens any more."""
    dest, growing = growing_file(images["raw"])
    with stream.export(dest, growing.size, growing, tmp_path) as nbd:
        proc = _blocked_convert(nbd, "raw", tmp_path / "out.raw", growing)
        assert nbd.socket.exists()
        assert _nbd_threads()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert not nbd.socket.exists()
    assert not _nbd_threads()
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(FileNotFoundError):
        s.connect(str(nbd.socket))


def _blocked_convert(
    nbd: stream.Export, fmt: str, out: Path, growing: stream.Growing
) -> subprocess.Popen[str]:
    """A qemu-img convert from the export, once it waits for bytes that have not arrived."""
    args = ["qemu-img", "convert", *stream.source_args(nbd, fmt), "-O", "raw", str(out)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: growing.blocked > 0)
    return proc


def _wait_until(condition: Callable[[], bool], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_export_burns_no_cpu(images: dict[str, Path], growing_file, tmp_path: Path) -> None:
    """A read blocked for a second costs (almost) no CPU in our process or in qemu-img: the
    wait is a condition variable, not a poll loop."""
    dest, growing = growing_file(images["qcow2"])
    with stream.export(dest, growing.size, growing, tmp_path) as nbd:
        proc = _blocked_convert(nbd, "qcow2", tmp_path / "out.raw", growing)
        ours, theirs = time.process_time(), _cpu_seconds(proc.pid)
        time.sleep(1.0)
        ours, theirs = time.process_time() - ours, _cpu_seconds(proc.pid) - theirs
        growing.fail("test over")
        proc.communicate(timeout=60)
    print(f"idle second: agent {ours * 1000:.1f} ms CPU, qemu-img {theirs * 1000:.1f} ms CPU")
    assert ours < 0.1
    assert theirs < 0.1


def test_qemu_img_info_through_the_uri(images: dict[str, Path], tmp_path: Path) -> None:
    image = images["qcow2"]
    growing = stream.Growing(image.stat().st_size)
    growing.finish()
    with stream.export(image, growing.size, growing, tmp_path) as nbd:
        proc = _qemu_img("info", "-f", "qcow2", "--output=json", nbd.uri)
    assert proc.returncode == 0, proc.stderr
    assert '"virtual-size": 100663296' in proc.stderr + proc.stdout


# --- the protocol paths qemu's client does not take, with a hand-made client --------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[stream.Export, bytes]]:
    data = os.urandom(64 * 1024)
    path = tmp_path / "small.raw"
    path.write_bytes(data)
    growing = stream.Growing(len(data))
    growing.finish()
    with stream.export(path, len(data), growing, tmp_path) as nbd:
        yield nbd, data


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        assert part, "server closed the connection"
        buf += part
    return buf


def _handshake(s: socket.socket) -> None:
    magic, opt, flags = struct.unpack(">QQH", _recv(s, 18))
    assert (magic, opt) == (stream.NBDMAGIC, stream.IHAVEOPT)
    assert flags & stream.FLAG_FIXED_NEWSTYLE
    s.sendall(struct.pack(">I", stream.FLAG_FIXED_NEWSTYLE | stream.FLAG_NO_ZEROES))


def _option(s: socket.socket, opt: int, data: bytes = b"") -> None:
    s.sendall(struct.pack(">QII", stream.IHAVEOPT, opt, len(data)) + data)


def _option_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rep, length = struct.unpack(">QIII", _recv(s, 20))
    assert magic == stream.REPLY_MAGIC
    return opt, rep, _recv(s, length)


def _request(s: socket.socket, cmd: int, offset: int, length: int, handle: int) -> None:
    s.sendall(struct.pack(">IHHQQI", stream.REQUEST_MAGIC, 0, cmd, handle, offset, length))


def _simple_reply(s: socket.socket) -> tuple[int, int]:
    magic, error, handle = struct.unpack(">IIQ", _recv(s, 16))
    assert magic == stream.SIMPLE_REPLY_MAGIC
    return error, handle


def test_protocol_list_unsupported_options_and_old_style_export_name(served) -> None:
    nbd, data = served
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(nbd.socket))
        _handshake(s)
        _option(s, 8)  # NBD_OPT_STRUCTURED_REPLY: refused, so the client uses simple replies
        assert _option_reply(s)[1] == stream.REP_ERR_UNSUP
        _option(s, stream.OPT_LIST)
        opt, rep, payload = _option_reply(s)
        assert rep == stream.REP_SERVER and payload[4:] == stream.EXPORT_NAME.encode()
        assert _option_reply(s)[1] == stream.REP_ACK
        _option(s, stream.OPT_GO, struct.pack(">I", 5) + b"other" + struct.pack(">H", 0))
        assert _option_reply(s)[1] == stream.REP_ERR_UNKNOWN
        _option(s, stream.OPT_EXPORT_NAME, stream.EXPORT_NAME.encode())
        size, flags = struct.unpack(">QH", _recv(s, 10))
        assert size == len(data)
        assert flags & 2  # NBD_FLAG_READ_ONLY
        _request(s, stream.CMD_READ, 100, 200, handle=7)
        assert _simple_reply(s) == (0, 7)
        assert _recv(s, 200) == data[100:300]
        _request(s, stream.CMD_READ, len(data) - 10, 20, handle=8)  # past the end
        assert _simple_reply(s) == (22, 8)  # EINVAL
        s.sendall(struct.pack(">IHHQQI", stream.REQUEST_MAGIC, 0, stream.CMD_WRITE, 9, 0, 4))
        s.sendall(b"abcd")
        assert _simple_reply(s) == (1, 9)  # EPERM: read-only
        _request(s, stream.CMD_DISC, 0, 0, handle=10)
        assert s.recv(1) == b""


def test_protocol_go_reports_size_flags_and_block_sizes(served) -> None:
    nbd, data = served
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(nbd.socket))
        _handshake(s)
        name = stream.EXPORT_NAME.encode()
        payload = (
            struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, stream.INFO_BLOCK_SIZE)
        )
        _option(s, stream.OPT_GO, payload)
        infos = {}
        while True:
            opt, rep, body = _option_reply(s)
            if rep == stream.REP_ACK:
                break
            assert rep == stream.REP_INFO
            infos[struct.unpack_from(">H", body)[0]] = body[2:]
        assert struct.unpack(">QH", infos[stream.INFO_EXPORT]) == (
            len(data),
            stream.TRANSMISSION_FLAGS,
        )
        assert struct.unpack(">III", infos[stream.INFO_BLOCK_SIZE]) == stream.BLOCK_SIZES
        _request(s, stream.CMD_READ, 0, len(data), handle=1)
        assert _simple_reply(s) == (0, 1)
        assert _recv(s, len(data)) == data


# --- pure parts ---------------------------------------------------------------------------------


def test_parse_go_rejects_malformed_payloads() -> None:
    good = struct.pack(">I", 2) + b"ab" + struct.pack(">HH", 1, 3)
    assert stream.parse_go(good) == ("ab", (3,))
    assert stream.parse_go(good[:-1]) is None
    assert stream.parse_go(struct.pack(">I", 100) + b"ab") is None


def test_image_opts_for_raw_qcow2_and_windows() -> None:
    nbd = stream.Export(Path("/run/x,y/nbd.sock"))
    proto = "driver=nbd,{p}server.type=unix,{p}server.path=/run/x,,y/nbd.sock,{p}export=image"
    assert stream.image_opts(nbd, "qcow2") == "driver=qcow2,file." + proto.format(p="file.")
    assert stream.image_opts(nbd, "raw", 0, 4096) == (
        "driver=raw,offset=0,size=4096,file." + proto.format(p="file.")
    )
    assert stream.image_opts(nbd, "qcow2", 512, 1024) == (
        "driver=raw,offset=512,size=1024,file.driver=qcow2,file.file."
        + proto.format(p="file.file.")
    )
    assert nbd.uri == "nbd+unix:///image?socket=/run/x,y/nbd.sock"


def test_windows_cover_the_disk_once() -> None:
    assert stream.l2_coverage() == 512 * MiB
    half = 512 * MiB
    assert stream.windows((0, 3 * half)) == [(0, half), (half, half), (2 * half, half)]
    assert stream.windows((0, 10), 4) == [(0, 4), (4, 4), (8, 2)]
    assert stream.windows((0, 8), 4) == [(0, 4), (4, 4)]
    # the writer's body window (the head left out): cut at the same absolute multiples
    assert stream.windows((1, 9), 4) == [(1, 3), (4, 4), (8, 2)]
    assert stream.windows((5, 2), 4) == [(5, 2)]
    assert stream.windows((4, 0), 4) == []


def test_growing_is_monotonic_and_capped_and_failure_wins() -> None:
    g = stream.Growing(100)
    stopped = threading.Event()
    g.advance(50)
    g.advance(20)
    assert g.have == 50
    g.wait_for(50, stopped)  # covered: returns at once
    g.advance(1000)
    assert g.have == 100
    g.fail("gone")
    with pytest.raises(stream.StreamFailed, match="gone"):
        g.wait_for(10, stopped)
    g.wait_for(10, stopped, data_wins=True)  # the bytes are there: served despite the failure
    short = stream.Growing(100)
    short.advance(5)
    short.fail("gone")
    with pytest.raises(stream.StreamFailed, match="gone"):
        short.wait_for(10, stopped, data_wins=True)  # not there: the failure still ends the wait


def test_a_blocked_wait_with_data_wins_returns_when_the_bytes_and_a_stop_come_together() -> None:
    g = stream.Growing(100)
    stopped = threading.Event()
    outcome: list[str] = []

    def waiter() -> None:
        try:
            g.wait_for(80, stopped, data_wins=True)
            outcome.append("served")
        except stream.StreamFailed as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + 5
    while not g.blocked and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    stopped.set()  # an Event does not wake the waiter: the last bytes do, and it sees both
    g.advance(100)
    thread.join(5)
    assert outcome == ["served"]

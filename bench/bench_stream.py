"""Benchmark: qemu-img convert through the streaming NBD export against the plain file.

Not a test: it prints figures. Needs root (a loop device backed by a file on disk, not tmpfs).

1. Throughput of a fully downloaded image: ``qemu-img convert -n -t none -W -m 16`` from the
   tmpfs file, and from the NBD export of the same file (agent/stream.py), onto the loop disk,
   alternated, min/median/max over the rounds; then qemu's client options (-m, no -W).
2. Streaming: the agent's real download (agent/download.py, from nginx on 127.0.0.1) into tmpfs
   with the convert running meanwhile, one convert of the whole image and one convert per
   window (stream.windows), against download-then-convert.

    .venv/bin/python -m bench.bench_stream [--rounds 3] [--data-mib 704] [--virtual-gib 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent import stream
from agent.download import DownloadSettings, download
from bench.nginx_server import nginx

MiB = 1024 * 1024
GiB = 1024 * MiB
CONVERT = ["-n", "-t", "none"]


def make_qcow2(workdir: Path, data_mib: int, virtual_gib: int) -> Path:
    """A qcow2 of ``virtual_gib`` GiB holding ``data_mib`` MiB of random data in 4 MiB runs
    spread over the disk (built by qemu-img convert from a sparse raw file, so in disk order)."""
    raw = workdir / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(virtual_gib * GiB)
        runs = data_mib // 4
        stride = (virtual_gib * GiB // runs) // MiB * MiB
        for i in range(runs):
            f.seek(i * stride)
            f.write(os.urandom(4 * MiB))
    out = workdir / "image.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out], check=True)
    raw.unlink()
    return out


def convert(source: list[str], target: list[str], options: list[str]) -> float:
    started = time.monotonic()
    proc = subprocess.run(
        ["qemu-img", "convert", *source, *CONVERT, *options, *target],  # target says -O raw
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return time.monotonic() - started


def device_window(dev: str, offset: int, size: int) -> list[str]:
    """A window of the disk as convert's target (``--target-image-opts`` takes no ``-O``)."""
    opts = f"driver=raw,offset={offset},size={size},file.driver=host_device,file.filename={dev}"
    return ["--target-image-opts", opts]


def device(dev: str) -> list[str]:
    return ["-O", "raw", dev]


def show(label: str, times: list[float], base: float | None = None) -> float:
    med = statistics.median(times)
    ratio = f"  {med / base:.2f}x plain" if base else ""
    print(f"  {label:<34} min {min(times):.3f}  median {med:.3f}  max {max(times):.3f} s{ratio}")
    return med


def throughput(image: Path, dev: str, rounds: int, workdir: Path) -> None:
    size = image.stat().st_size
    growing = stream.Growing(size)
    growing.finish()
    plain = ["-f", "qcow2", str(image)]
    variants: dict[str, Callable[[], float]] = {}
    with stream.export(image, size, growing, workdir) as nbd:
        nbd_src = stream.source_args(nbd, "qcow2")
        variants = {
            "plain -W -m 16": lambda: convert(plain, device(dev), ["-W", "-m", "16"]),
            "nbd   -W -m 16": lambda: convert(nbd_src, device(dev), ["-W", "-m", "16"]),
            "plain -W -m 8": lambda: convert(plain, device(dev), ["-W", "-m", "8"]),
            "nbd   -W -m 8": lambda: convert(nbd_src, device(dev), ["-W", "-m", "8"]),
            "nbd   -W -m 4": lambda: convert(nbd_src, device(dev), ["-W", "-m", "4"]),
            "plain (no -W, -m 8 default)": lambda: convert(plain, device(dev), []),
            "nbd   (no -W, -m 8 default)": lambda: convert(nbd_src, device(dev), []),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for label, fn in variants.items():
                times[label].append(fn())
    print(f"convert of a downloaded {size / 1e6:.0f} MB qcow2 onto {dev} ({rounds} rounds):")
    base = statistics.median(times["plain -W -m 16"])
    for label, ts in times.items():
        show(label, ts, base)


def _download(url: str, dest: Path, growing: stream.Growing | None, ended: list[float]) -> None:
    def progress(done: int, _total: int | None) -> None:
        if growing is not None:
            growing.advance(done)

    try:
        download(
            url,
            dest,
            headers={},
            image_type="bench",
            checksum_type="sha256",
            memory_budget=None,
            on_progress=progress,
            settings=DownloadSettings(progress_interval=0.0),
        )
    except BaseException as exc:
        if growing is not None:
            growing.fail(str(exc))
        raise
    ended.append(time.monotonic())
    if growing is not None:
        growing.finish()


def streamed(
    url: str,
    dest: Path,
    size: int,
    virtual: int,
    fmt: str,
    dev: str,
    window: int | None,
    workdir: Path,
) -> tuple[float, float, int]:
    """Download and convert at the same time: the wall time of both, the convert's tail after
    the download's end, the reads that waited."""
    started = time.monotonic()
    growing = stream.Growing(size)
    ended: list[float] = []
    with stream.export(dest, size, growing, workdir) as nbd:
        fetch = threading.Thread(target=_download, args=(url, dest, growing, ended))
        fetch.start()
        opts = ["-W", "-m", "16"]
        if window:
            for off, length in stream.windows((0, virtual), window):
                convert(
                    stream.source_args(nbd, fmt, off, length),
                    device_window(dev, off, length),
                    opts,
                )
        else:
            convert(stream.source_args(nbd, fmt), device(dev), opts)
        fetch.join()
    done = time.monotonic()
    return done - started, done - ended[0], ended[0] - started


def sequential(url: str, dest: Path, fmt: str, dev: str) -> tuple[float, float]:
    started = time.monotonic()
    ended: list[float] = []
    _download(url, dest, None, ended)
    convert(["-f", fmt, str(dest)], device(dev), ["-W", "-m", "16"])
    return ended[0] - started, time.monotonic() - started


def streaming(image: Path, fmt: str, dev: str, rounds: int, workdir: Path) -> None:
    """Alternated rounds: download-then-convert, then each streamed variant."""
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    for path in (workdir, www):  # nginx's worker runs unprivileged
        path.chmod(0o755)
    served = www / image.name
    shutil.copyfile(image, served)
    served.chmod(0o644)
    size = served.stat().st_size
    virtual = int(
        json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", "-f", fmt, str(served)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["virtual-size"]
    )
    dest = workdir / f"dl.{fmt}"
    windows = [None, 256 * MiB, stream.l2_coverage(), 1024 * MiB] if fmt != "raw" else [None]
    rows: dict[str, list[float]] = {"download": [], "download, then convert": []}
    tails: dict[str, list[float]] = {}
    fetches: dict[str, list[float]] = {}
    with nginx(www) as base:
        url = f"{base}/{served.name}"
        for _ in range(rounds):
            fetched, total = sequential(url, dest, fmt, dev)
            rows["download"].append(fetched)
            rows["download, then convert"].append(total)
            dest.unlink()
            for window in windows:
                label = (
                    f"streamed, {window // MiB} MiB windows" if window else "streamed, one convert"
                )
                wall, tail, fetched = streamed(url, dest, size, virtual, fmt, dev, window, workdir)
                rows.setdefault(label, []).append(wall)
                tails.setdefault(label, []).append(tail)
                fetches.setdefault(label, []).append(fetched)
                dest.unlink()
    served.unlink()
    print(
        f"agent download (nginx, 127.0.0.1) + convert of a {size / 1e6:.0f} MB {fmt}, "
        f"{rounds} rounds:"
    )
    base_med = statistics.median(rows["download, then convert"])
    for label, ts in rows.items():
        med = statistics.median(ts)
        tail = ""
        if label in tails:
            tail = (
                f"  (its download {statistics.median(fetches[label]):.3f} s,"
                f" then the convert's tail {statistics.median(tails[label]):.3f} s)"
            )
        print(
            f"  {label:<30} min {min(ts):.3f}  median {med:.3f}  max {max(ts):.3f} s"
            f"  {med / base_med:.2f}x sequential{tail}"
        )


def make_raw(workdir: Path, data_mib: int) -> Path:
    """A raw disk: ``data_mib`` MiB of random data in 4 MiB runs, with as many zeros between."""
    out = workdir / "image.raw"
    with open(out, "wb") as f:
        for _ in range(data_mib // 4):
            f.write(os.urandom(4 * MiB))
            f.write(bytes(4 * MiB))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-mib", type=int, default=704)
    parser.add_argument("--virtual-gib", type=int, default=4)
    parser.add_argument("--raw-mib", type=int, default=352, help="random MiB of the raw image")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--disk-dir", default="/var/tmp", help="backing file of the loop disk")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm", prefix="bench-stream-") as tmp,
        tempfile.TemporaryDirectory(dir=args.disk_dir, prefix="bench-stream-") as disk_dir,
    ):
        workdir = Path(tmp)
        backing = Path(disk_dir) / "disk.img"
        with open(backing, "wb") as f:
            f.truncate((args.virtual_gib + 1) * GiB)
        dev = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            image = make_qcow2(workdir, args.data_mib, args.virtual_gib)
            if not args.skip_throughput:
                throughput(image, dev, args.rounds, workdir)
            streaming(image, "qcow2", dev, args.rounds, workdir)
            image.unlink()
            if args.raw_mib:
                raw = make_raw(workdir, args.raw_mib)
                streaming(raw, "raw", dev, args.rounds, workdir)
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)


if __name__ == "__main__":
    main()

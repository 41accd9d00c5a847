"""Benchmark: the agent's download+verify against curl, from a real nginx on 127.0.0.1.

Not a test: it prints figures. For each size (default ~700 MB and ~2 GB, the two sizes of issue
11), one run alternates, round after round, ``curl -o`` into tmpfs and the agent's download
(+ checksum verify) for sha256, md5 and sha512 into tmpfs, and prints min/median/max MB/s, the
agent/curl ratio of the medians, and each side's CPU per MB (user+sys of the client process:
unlike MB/s, this barely moves when other work shares the machine). Each agent run is a child
process so that its peak RSS (VmHWM) and its CPU are its own.

    .venv/bin/python -m bench.bench_download [--size-mib 704,1904] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.nginx_server import nginx

HASHES = ("sha256", "md5", "sha512")
MiB = 1024 * 1024


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def child(url: str, dest: str, ctype: str, expected: str, read_kib: int, block_mib: int) -> None:
    """One agent download in this (child) process; prints a JSON line."""
    from agent import checksum, memory
    from agent.download import DownloadSettings, download

    settings = DownloadSettings(read_size=read_kib * 1024, hash_block=block_mib * MiB)
    import resource

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = download(
        url,
        Path(dest),
        headers={},
        image_type="raw",
        checksum_type=ctype,
        memory_budget=memory.image_budget(),
        settings=settings,
    )
    assert result.digest is not None
    checksum.verify(ctype, result.digest, expected)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"seconds": seconds, "size": result.size, "hwm": _vm_hwm(), "cpu": cpu}))


def hash_speed(name: str, total: int = 1024 * MiB, block: int = 64 * MiB) -> float:
    """Single-core hashlib speed on in-memory buffers, MB/s."""
    buf = os.urandom(block)
    h = hashlib.new(name)
    t0 = time.perf_counter()
    for _ in range(total // block):
        h.update(buf)
    return total / (time.perf_counter() - t0) / 1e6


def make_file(path: Path, size: int) -> dict[str, str]:
    """``size`` bytes (a multiple of 16 MiB) of incompressible data; their digests."""
    hashers = {name: hashlib.new(name) for name in HASHES}
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            # vary every block so that no layer can get away with dedup/compression
            chunk = i.to_bytes(8, "little") + block[8:]
            f.write(chunk)
            for h in hashers.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _busy_seconds() -> float:
    """CPU seconds spent not idle, summed over all CPUs, since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_curl(url: str, dest: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the whole machine, CPU seconds of curl) for one transfer."""
    import resource

    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = _busy_seconds(), time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(dest), url], check=True, timeout=600)
    wall, busy = time.perf_counter() - t0, _busy_seconds() - b0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, busy, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def run_agent(url: str, dest: Path, ctype: str, expected: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_download", "--child", url, str(dest), ctype, expected]
    cmd += ["--read-kib", str(args.read_kib), "--block-mib", str(args.block_mib)]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, cwd=repo)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(values: list[float]) -> str:
    return (
        f"min {min(values):7.0f}  median {statistics.median(values):7.0f}  max {max(values):7.0f}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", default="704,1904", help="comma-separated sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--read-kib", type=int, default=256)
    p.add_argument("--block-mib", type=int, default=4)
    p.add_argument("--child", nargs=4, metavar=("URL", "DEST", "TYPE", "EXPECTED"))
    args = p.parse_args()
    if args.child:
        child(*args.child, args.read_kib, args.block_mib)
        return
    speeds = {name: hash_speed(name) for name in HASHES}
    for size_mib in (int(s) for s in args.size_mib.split(",")):
        bench_size(size_mib // 16 * 16 * MiB, args, speeds)


def bench_size(size: int, args: argparse.Namespace, speeds: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-dl-", dir="/dev/shm") as tmp:
        root, out = Path(tmp) / "www", Path(tmp) / "out"
        root.mkdir()
        out.mkdir()
        for d in (Path(tmp), root):  # nginx workers run as an unprivileged user
            d.chmod(0o755)
        print(f"generating {size // MiB} MiB ...", flush=True)
        digests = make_file(root / "image.raw", size)
        mbps: dict[str, list[float]] = {k: [] for k in ("curl", *HASHES)}
        cpu: dict[str, list[float]] = {k: [] for k in ("curl", *HASHES)}  # client ms per MB
        hwm: list[int] = []
        transfer_cpu: list[float] = []  # machine CPU seconds per MB moved by nginx -> curl
        with nginx(root) as base:
            url = f"{base}/image.raw"
            for r in range(args.rounds):
                order = ["curl", *HASHES]
                order = order[r % len(order) :] + order[: r % len(order)]  # who goes first
                for what in order:
                    dest = out / f"{what}.raw"
                    if what == "curl":
                        seconds, busy, own = run_curl(url, dest)
                        got = dest.stat().st_size
                        transfer_cpu.append(busy / (got / 1e6))
                    else:
                        res = run_agent(url, dest, what, digests[what], args)
                        seconds, got, own = res["seconds"], res["size"], res["cpu"]
                        hwm.append(res["hwm"])
                    assert got == size, (what, got)
                    dest.unlink()
                    mbps[what].append(size / seconds / 1e6)
                    cpu[what].append(own * 1000 / (size / 1e6))
                    print(f"round {r + 1} {what:7s} {mbps[what][-1]:7.0f} MB/s", flush=True)
    report(size, args, speeds, mbps, cpu, transfer_cpu, hwm)


def report(size, args, speeds, mbps, cpu, transfer_cpu, hwm) -> None:  # type: ignore[no-untyped-def]
    print()
    load = os.getloadavg()[0]
    print(f"file {size // MiB} MiB ({size / 1e9:.2f} GB), {args.rounds} rounds, nginx 127.0.0.1"
          f" -> /dev/shm, MB/s; {os.cpu_count()} CPUs, load average {load:.1f}")  # fmt: skip
    print(f"read size {args.read_kib} KiB, hash block {args.block_mib} MiB")
    med_curl = statistics.median(mbps["curl"])
    cpu_per_mb = statistics.median(transfer_cpu)
    cores = os.cpu_count() or 1
    curl_cpu = statistics.median(cpu["curl"])
    print(f"curl -o           {fmt(mbps['curl'])}   client CPU {curl_cpu:.2f} ms/MB"
          f"   (machine CPU {cpu_per_mb * 1000:.2f} ms/MB)")  # fmt: skip
    for name in HASHES:
        med = statistics.median(mbps[name])
        # What this machine can do at best: the transfer's CPU cost plus the hash's, spread over
        # all cores, and never faster than the transfer alone or the hash alone.
        ceiling = min(med_curl, speeds[name], cores / (cpu_per_mb + 1 / speeds[name]))
        print(
            f"agent {name:7s}     {fmt(mbps[name])}   agent/curl {med / med_curl:4.2f}"
            f"   client CPU {statistics.median(cpu[name]):.2f} ms/MB"
            f"   {name} alone {speeds[name]:6.0f} MB/s"
            f"   CPU ceiling {ceiling:5.0f} MB/s (agent/ceiling {med / ceiling:4.2f})"
        )
    print(f"agent peak RSS (VmHWM): max {max(hwm) / MiB:.1f} MiB")
    print(flush=True)


if __name__ == "__main__":
    main()

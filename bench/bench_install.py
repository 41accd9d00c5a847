"""Benchmark: the whole install against the best tools run back to back (issue 11).

Not a test: it prints figures. Images (a ~725 MB qcow2 of a 4 GiB GPT disk full of random data,
and a 1 GiB raw GPT image) are built once into bench/out/images/ and served by nginx on
127.0.0.1. Each round runs every variant once, in an order shuffled from round to round, each
after the previous run's writes are synced and on a FRESH loop disk (a sparse 8 GiB file under
bench/out/disks/, on the machine's disk, not tmpfs), detached afterwards even on failure:

- ``agent``: the real CLI, ``python -m agent install --payload F --disk /dev/loopN --json``
  (sha256 checksum, an ssh key, user data), without a flag and with ``--verify full|sample|none``
  and ``--stream`` where the agent has them (``install --help``; "n/a" otherwise);
- ``floor``: ``curl -o`` into tmpfs then ``qemu-img convert -n -t none -W -m 16`` onto the disk;
- ``naive``: bench/naive_install.sh (curl; sha256sum; qemu-img convert with its defaults;
  sgdisk -e; genisoimage; sgdisk -n; dd).

``--convert-params`` instead measures ``qemu-img convert`` alone onto fresh file-backed loop
disks: -m 1/4/8/16, with and without -W, -t none and writeback.

    .venv/bin/python -m bench.bench_install [--rounds 3] [--size 734m|1.9g] [--only qcow2|raw]
    .venv/bin/python -m bench.bench_install --convert-params [--rounds 3] [--only qcow2|raw]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.install_images import SIZES, Image, ensure_images
from bench.nginx_server import nginx

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
NAIVE = REPO / "bench" / "naive_install.sh"
DISK_SIZE = 8 * 1024**3
MiB = 1024 * 1024
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchKeyBenchKeyBenchKeyBenchKey bench"
USER_DATA = "#cloud-config\nruncmd:\n  - echo hello from byoi > /root/hi\n"
FLOOR_OPTS = ["-n", "-t", "none", "-W", "-m", "16"]
AGENT_FLAGS = {  # variant name -> (flag the agent must list in install --help, its arguments)
    "agent (default)": ("", []),
    "agent --verify full": ("--verify", ["--verify", "full"]),
    "agent --verify sample": ("--verify", ["--verify", "sample"]),
    "agent --verify none": ("--verify", ["--verify", "none"]),
    "agent --stream": ("--stream", ["--stream"]),
}


def _run(*args: str, timeout: float = 600) -> str:
    return subprocess.run(
        args, check=True, capture_output=True, text=True, timeout=timeout
    ).stdout.strip()


def fs_type(path: Path) -> str:
    path = path.resolve()
    best = max(
        (p for p in psutil.disk_partitions(all=True) if str(path).startswith(p.mountpoint)),
        key=lambda p: len(p.mountpoint),
    )
    return best.fstype


@contextlib.contextmanager
def loop_disk(folder: Path, size: int = DISK_SIZE) -> Iterator[str]:
    """A fresh sparse file attached as a loop device; detached and removed even on failure."""
    folder.mkdir(parents=True, exist_ok=True)
    backing = Path(tempfile.mkstemp(prefix="disk-", suffix=".img", dir=folder)[1])
    dev = ""
    try:
        os.truncate(backing, size)
        dev = _run("losetup", "-f", "--show", str(backing))
        yield dev
    finally:
        if dev:
            # the agent's partx may have added partitions this kernel keeps after losetup -d
            for args in (["partx", "-d", dev], ["blockdev", "--flushbufs", dev]):
                subprocess.run(args, capture_output=True, timeout=60)
            for _ in range(20):
                if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                print(f"warning: could not detach {dev}", file=sys.stderr)
        backing.unlink(missing_ok=True)


class MemorySampler(threading.Thread):
    """Samples, every 50 ms, the agent's own VmHWM and the RSS summed over its process tree."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.hwm, self.tree = pid, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.pid)
            while not self.stopped.wait(0.05):
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.hwm = max(self.hwm, int(line.split()[1]) * 1024)
                total = 0
                with contextlib.suppress(psutil.Error):
                    for p in [proc, *proc.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            total += p.memory_info().rss
                self.tree = max(self.tree, total)


@dataclass
class Result:
    seconds: float
    ok: bool = True
    message: str = ""
    parts: dict[str, float] = field(default_factory=dict)  # step or phase -> seconds
    cpu: float = 0.0  # user + system seconds, the process and the children it waited for
    maxrss: int = 0  # wait4 ru_maxrss, bytes
    hwm: int = 0
    tree: int = 0


def payload(image: Image, url: str) -> dict:
    return {
        "templateName": "byoi_64",
        "details": {"customHostname": "bench"},
        "userMetadata": [
            {"key": "imageURL", "value": url},
            {"key": "imageType", "value": image.fmt},
            {"key": "imageCheckSum", "value": image.sha256},
            {"key": "imageCheckSumType", "value": "sha256"},
            {"key": "sshKey", "value": SSH_KEY},
            {"key": "configDriveUserData", "value": USER_DATA},
            {"key": "configDriveMetadata", "value": json.dumps({"role": "bench"})},
        ],
    }


def supported_flags() -> set[str]:
    """The install options the agent in this tree has (from its --help)."""
    text = _run(sys.executable, "-m", "agent", "install", "--help")
    return {flag for flag in ("--verify", "--stream") if flag in text}


@dataclass
class Run:
    code: int
    seconds: float
    cpu: float  # user + system seconds of the process and the children it waited for
    maxrss: int  # bytes
    stdout: str
    stderr: str
    sampler: MemorySampler | None


def timed(cmd: list[str], *, sample: bool = False, timeout: float = 900) -> Run:
    """Run ``cmd``; its wall time, and its rusage from os.wait4 (CPU, peak RSS)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        sampler = MemorySampler(proc.pid) if sample else None
        if sampler:
            sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if sampler:
            sampler.stopped.set()
            sampler.join()
        out.seek(0)
        err.seek(0)
        return Run(
            proc.returncode,
            seconds,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss * 1024,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            sampler,
        )


def run_agent(payload_file: Path, dev: str, flags: list[str], work: Path) -> Result:
    """One ``agent install`` as a child: wall time, its --json steps, its peak memory."""
    cmd = [sys.executable, "-m", "agent", "install", "--payload", str(payload_file)]
    run = timed([*cmd, "--disk", dev, "--json", "--workdir", str(work), *flags], sample=True)
    assert run.sampler is not None
    res = Result(run.seconds, cpu=run.cpu, maxrss=run.maxrss)
    res.hwm, res.tree = run.sampler.hwm, run.sampler.tree
    try:
        report = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        res.ok, res.message = False, f"no JSON (exit {run.code}): {run.stderr[-500:]}"
        return res
    res.ok = run.code == 0 and report.get("status") == "done"
    res.message = report.get("message", "")
    res.parts = {s["step"]: s["seconds"] for s in report.get("progress", []) if "seconds" in s}
    return res


def run_floor(image: Image, url: str, dev: str, shm: Path) -> Result:
    """curl -o into tmpfs, then qemu-img convert onto the disk, back to back."""
    dest = shm / "floor-image"
    convert = ["qemu-img", "convert", "-f", image.fmt, "-O", "raw", *FLOOR_OPTS, str(dest), dev]
    try:
        curl = timed(["curl", "-sS", "--fail", "-o", str(dest), url])
        conv = timed(convert) if curl.code == 0 else None
    finally:
        dest.unlink(missing_ok=True)
    runs = [r for r in (curl, conv) if r]
    res = Result(sum(r.seconds for r in runs), cpu=sum(r.cpu for r in runs))
    res.ok = all(r.code == 0 for r in runs) and conv is not None
    res.message = " ".join(r.stderr.strip()[-300:] for r in runs)
    res.parts = {"curl": curl.seconds, **({"convert": conv.seconds} if conv else {})}
    return res


def run_naive(image: Image, url: str, dev: str, shm: Path) -> Result:
    work = Path(tempfile.mkdtemp(prefix="naive-", dir=shm))
    try:
        (work / "user_data").write_text(USER_DATA)
        args = [url, image.sha256, image.fmt, dev, str(work), SSH_KEY, str(work / "user_data")]
        run = timed(["bash", str(NAIVE), *args])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Result(run.seconds, run.code == 0, run.stderr.strip()[-300:], cpu=run.cpu)


def fmt3(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"min {min(values):6.2f}  median {statistics.median(values):6.2f}  max {max(values):6.2f}"
    )


def med(results: list[Result], key: str | None = None) -> float | None:
    ok = [r for r in results if r.ok and (key is None or key in r.parts)]
    vals = [r.parts[key] if key else r.seconds for r in ok]
    return statistics.median(vals) if vals else None


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    busy = (
        "; BUSY machine: wall times are noisy, compare mins and CPU"
        if one > (os.cpu_count() or 1)
        else ""
    )
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs{busy})"


@dataclass
class Setup:
    image: Image
    url: str
    shm: Path  # tmpfs: the floor's and the naive script's download area
    work: Path  # the agent's --workdir (on disk: the agent mounts its own tmpfs there)
    payload_file: Path


def run_variant(name: str, s: Setup) -> Result:
    with loop_disk(OUT / "disks") as dev:
        if name == "floor":
            return run_floor(s.image, s.url, dev, s.shm)
        if name == "naive":
            return run_naive(s.image, s.url, dev, s.shm)
        return run_agent(s.payload_file, dev, AGENT_FLAGS[name][1], s.work)


def settle() -> None:
    """Let the previous run's writes reach the disk before the next run is timed: the naive
    script's buffered writes (and the freed extents of every deleted loop file) were flushed
    during whichever variant came next, and a rotated order always put the same one there
    ("agent (default)" ran 0.9-1.0 s slower than the identical "--verify sample")."""
    os.sync()
    time.sleep(0.5)


def run_rounds(s: Setup, names: list[str], rounds: int) -> dict[str, list[Result]]:
    """Every variant once per round, in an order shuffled from round to round (seeded, so a
    rerun has the same orders), each after the previous run's writes are on the disk."""
    results: dict[str, list[Result]] = {n: [] for n in names}
    for r in range(rounds):
        order = list(names)
        random.Random(r).shuffle(order)
        for name in order:
            settle()
            res = run_variant(name, s)
            results[name].append(res)
            state = "ok" if res.ok else f"FAILED: {res.message}"
            print(f"  round {r + 1} {name:24s} {res.seconds:6.2f} s  {state}", flush=True)
    return results


def print_table(s: Setup, results: dict[str, list[Result]], missing: dict[str, str]) -> None:
    floor = med(results["floor"])
    agents = [n for n in AGENT_FLAGS if n in results]
    print("\nwhole install, wall seconds (min / median / max); ratio = median / floor median;")
    print("CPU = median user+system seconds of the run and all its children (less load-sensitive)")
    for name in ["floor", "naive", *AGENT_FLAGS]:
        if name in missing:
            print(f"  {name:24s} n/a ({missing[name]})")
            continue
        rs = results[name]
        ok = [r.seconds for r in rs if r.ok]
        m = med(rs)
        ratio = f"{m / floor:5.2f}x" if m and floor else "  n/a"
        failed = f"  ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else ""
        label = "floor (curl + convert)" if name == "floor" else name
        cpu = statistics.median(r.cpu for r in rs if r.ok) if ok else 0.0
        print(f"  {label:24s} {fmt3(ok)}   {ratio}   CPU {cpu:6.2f} s{failed}")
        if name == "floor":
            for part in ("curl", "convert"):
                vals = [r.parts[part] for r in rs if r.ok]
                print(f"    {part:22s} {fmt3(vals)}")
    if not agents:
        return
    steps: list[str] = []
    for name in agents:
        for r in results[name]:
            steps += [k for k in r.parts if k not in steps]
    shown = [n for n in agents if any(r.ok for r in results[n])]
    short = [n.removeprefix("agent ").removeprefix("--verify ").strip("()") for n in shown]
    print("\nagent step breakdown, median seconds (its --json 'progress[].seconds'), per variant")
    print(f"  {'step':12s}" + "".join(f"{h:>10s}" for h in short))
    for key in [*steps, "sum", "wall"]:
        cells = []
        for name in shown:
            rs = [r for r in results[name] if r.ok]
            if key == "sum":
                cells.append(statistics.median(sum(r.parts.values()) for r in rs))
            else:
                cells.append(med(rs, None if key == "wall" else key))
        row = "".join(f"{c:10.2f}" if c is not None else f"{'-':>10s}" for c in cells)
        print(f"  {key:12s}{row}")
    curl = med(results["floor"], "curl")
    mb = s.image.size / 1e6
    print("\ndownload: the agent's download step against curl -o (same URL, same tmpfs kind)")
    for name in agents:
        dl = med(results[name], "download")
        if dl and curl:
            print(
                f"  {name:24s} {dl:6.2f} s ({mb / dl:6.0f} MB/s)  curl {curl:6.2f} s "
                f"({mb / curl:6.0f} MB/s)  agent/curl speed {curl / dl:4.2f}"
            )
    print("\nagent peak memory, max over rounds, MiB")
    print("  ru_maxrss: os.wait4 of the agent process: the largest peak RSS of the agent or of any")
    print("    one tool it ran and waited for (qemu-img, sgdisk, ...): a max, not a sum; tmpfs and")
    print("    page cache not counted.  VmHWM: the agent's Python process alone.  tree: RSS summed")
    print("    over the agent and its live children. VmHWM and tree are sampled every 50 ms.")
    for name in agents:
        rs = [r for r in results[name] if r.ok] or results[name]
        peak = [max(getattr(r, k) for r in rs) / MiB for k in ("maxrss", "hwm", "tree")]
        print(f"  {name:24s} ru_maxrss {peak[0]:6.1f}   VmHWM {peak[1]:6.1f}   tree {peak[2]:6.1f}")


def print_goals(results: dict[str, list[Result]]) -> None:
    """Issue 11's goals next to the figures (printed, never asserted)."""
    floor, curl = med(results["floor"]), med(results["floor"], "curl")

    def ratio(name: str) -> float | None:
        m = med(results.get(name, []))
        return m / floor if m and floor else None

    dl = med(results.get("agent (default)", []), "download")
    rss = [r.maxrss for n in AGENT_FLAGS for r in results.get(n, []) if r.ok]
    goals = [
        ("default install <= 1.5x floor", ratio("agent (default)"), lambda v: v <= 1.5),
        ("--verify none   <= 1.2x floor", ratio("agent --verify none"), lambda v: v <= 1.2),
        ("--stream        <= 1.0x floor", ratio("agent --stream"), lambda v: v <= 1.0),
        ("download speed  >= 0.9x curl", curl / dl if dl and curl else None, lambda v: v >= 0.9),
        ("peak RSS (ru_maxrss) <= 100 MiB", max(rss) / MiB if rss else None, lambda v: v <= 100),
    ]
    print("\ngoals of issue 11 (default agent's download; RSS max over all agent runs)")
    for label, value, met in goals:
        shown = "n/a" if value is None else f"{value:6.2f}  {'met' if met(value) else 'NOT met'}"
        print(f"  {label:34s} {shown}")


def bench_install(images: dict[str, Image], base: str, args: argparse.Namespace) -> None:
    flags = supported_flags()
    have_iso = shutil.which("genisoimage") or shutil.which("xorriso")
    missing = {
        n: f"install has no {f}" for n, (f, _) in AGENT_FLAGS.items() if f and f not in flags
    }
    if not have_iso:
        missing["naive"] = "needs genisoimage or xorriso"
    names = ["floor", *(n for n in ["naive", *AGENT_FLAGS] if n not in missing)]
    with (
        tempfile.TemporaryDirectory(prefix="bench-install-", dir="/dev/shm") as shm,
        tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as work,
    ):
        for fmt, image in images.items():
            url = f"{base}/{image.path.name}"
            _run("curl", "-sS", "--fail", "-o", "/dev/null", url)  # warm nginx and the page cache
            pf = Path(shm) / f"payload-{fmt}.json"
            pf.write_text(json.dumps(payload(image, url)))
            s = Setup(image, url, Path(shm), Path(work), pf)
            print(
                f"\n== {fmt}: {image.path.name} {image.size / 1e6:.0f} MB, "
                f"{image.virtual_size / 1024**3:.1f} GiB virtual; {args.rounds} rounds; "
                f"fresh 8 GiB sparse loop disk per run on {fs_type(OUT)} ==  ({load_line()})",
                flush=True,
            )
            results = run_rounds(s, names, args.rounds)
            print_table(s, results, missing)
            print_goals(results)
            print(f"  (after: {load_line()})", flush=True)


def convert_combos() -> list[tuple[str, bool, int]]:
    return [(t, w, m) for t in ("none", "writeback") for w in (False, True) for m in (1, 4, 8, 16)]


def timed_convert(
    src: Path, fmt: str, dev: str, cache: str, w: bool, m: int
) -> tuple[float, float]:
    """qemu-img convert then fsync of the device (what the write costs until it is durable):
    (wall seconds, qemu-img's CPU seconds)."""
    args = ["qemu-img", "convert", "-f", fmt, "-O", "raw", "-n", "-t", cache, "-m", str(m)]
    t0 = time.perf_counter()
    run = timed([*args, *(["-W"] if w else []), str(src), dev])
    if run.code != 0:
        raise RuntimeError(f"{' '.join(args)}: {run.stderr}")
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0, run.cpu


def bench_convert(images: dict[str, Image], rounds: int) -> None:
    """qemu-img convert's -m / -W / -t onto fresh file-backed loop disks, source in tmpfs."""
    combos = convert_combos()
    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir="/dev/shm") as shm:
        for fmt, image in images.items():
            src = Path(shm) / image.path.name
            shutil.copyfile(image.path, src)
            times: dict[tuple[str, bool, int], list[float]] = {c: [] for c in combos}
            cpu: dict[tuple[str, bool, int], list[float]] = {c: [] for c in combos}
            print(
                f"\n== qemu-img convert -f {fmt} -O raw -n, {image.path.name} "
                f"({image.size / 1e6:.0f} MB, {image.virtual_size / 1024**3:.1f} GiB virtual) "
                f"from tmpfs onto a fresh 8 GiB sparse loop disk on {fs_type(OUT)}, {rounds} "
                f"rounds ==  ({load_line()})",
                flush=True,
            )
            for r in range(rounds):
                k = (r * 5) % len(combos)
                for combo in combos[k:] + combos[:k]:
                    with loop_disk(OUT / "disks") as dev:
                        seconds, used = timed_convert(src, fmt, dev, *combo)
                    times[combo].append(seconds)
                    cpu[combo].append(used)
                print(f"  round {r + 1} done", flush=True)
            src.unlink()
            print(
                "  wall seconds, convert + fsync of the device (min / median / max); qemu-img CPU"
            )
            best = min(statistics.median(v) for v in times.values())
            for (cache, w, m), vals in times.items():
                label = f"-t {cache:9s} {'-W' if w else '  '} -m {m:<2d}"
                ratio = statistics.median(vals) / best
                used = statistics.median(cpu[(cache, w, m)])
                print(f"  {label}   {fmt3(vals)}   {ratio:5.2f}x best   CPU {used:5.2f} s")
            print(f"  (after: {load_line()})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", choices=sorted(SIZES), default="734m")
    p.add_argument("--only", choices=("qcow2", "raw"))
    p.add_argument(
        "--convert-params",
        action="store_true",
        help="measure qemu-img convert's -m/-W/-t alone instead of the whole install",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        print("the install bench needs root (loop devices)", file=sys.stderr)
        return 1
    for d in (OUT, OUT / "disks"):
        d.mkdir(parents=True, exist_ok=True)
    if fs_type(OUT) == "tmpfs":
        print(f"warning: {OUT} is on tmpfs: the loop disks are not on a real disk", flush=True)
    images = ensure_images(OUT, args.size)
    if args.only:
        images = {args.only: images[args.only]}
    print(f"uptime: {_run('uptime')}")
    if args.convert_params:
        bench_convert(images, args.rounds)
        return 0
    # An installed package is byte-compiled (pip, dh_python3); this editable tree is not, and
    # with PYTHONDONTWRITEBYTECODE set every run would compile the agent's modules anew.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "agent")], check=True)
    print("the agent's modules are byte-compiled first, as an installed package's are")
    with nginx(images[next(iter(images))].path.parent) as base:
        bench_install(images, base, args)
    print(f"\nuptime: {_run('uptime')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fleet scale: many agents behind Debian's squid, an origin that counts its bytes and goes down.

Everything runs on 127.0.0.1: the origin (tests/badserver.Origin), a squid started by the test
with the configuration the README recommends for fleets (written here, no system service), and
the agents. The figures the issue asks for are printed (pytest -s shows them):

- egress: the bytes the origin sent, as a multiple of the image, through squid;
- the outage: 30 s of 503 + Retry-After in the middle of the transfers, every transfer in
  flight cut when it starts; all agents must sit it out and finish;
- the spread: after the origin recovers, no more than a quarter of the fleet may come back
  within any 100 ms (a fleet cut at one moment must not return as one burst).

FLEET_OUTAGE_SECONDS changes the outage's length (default 30).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.download import DownloadSettings, download
from tests.badserver import Origin

MiB = 1024 * 1024
FLEET = 8
OUTAGE = float(os.environ.get("FLEET_OUTAGE_SECONDS", "30"))

pytestmark = pytest.mark.skipif(shutil.which("squid") is None, reason="needs squid")

# The README's fleet settings (section "Fleets behind a caching proxy"), plus what a throwaway
# instance needs: its own files, memory cache only, no pinger or netdb.
SQUID_CONF = """\
http_port 127.0.0.1:{port}
pid_filename {tmp}/squid.pid
cache_log {tmp}/cache.log
access_log stdio:{tmp}/access.log
cache_store_log none
coredump_dir {tmp}
netdb_filename none
pinger_enable off
cache_effective_user proxy
workers 1
http_access allow all
cache_mem 256 MB
maximum_object_size_in_memory 64 MB
maximum_object_size 64 MB
shutdown_lifetime 0 seconds
# --- the recommended fleet settings ---
collapsed_forwarding on
range_offset_limit none
quick_abort_min -1 KB
negative_ttl 0 seconds
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def squid(conf_text: str = SQUID_CONF) -> Iterator[str]:
    """A squid on 127.0.0.1 with ``conf_text``; yields its proxy URL."""
    # squid drops to the proxy user, who cannot enter pytest's private tmp_path
    with tempfile.TemporaryDirectory(prefix="fleet-squid-") as name:
        Path(name).chmod(0o777)
        yield from _squid(Path(name), conf_text)


def _squid(tmp: Path, conf_text: str) -> Iterator[str]:
    port = _free_port()
    conf = tmp / "squid.conf"
    conf.write_text(conf_text.format(port=port, tmp=tmp))
    proc = subprocess.Popen(
        ["squid", "-N", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (tmp / "cache.log").read_text() if (tmp / "cache.log").exists() else ""
                raise RuntimeError(f"squid did not start: {log[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], dict[str, str]]:
    """Point this process (and children given the returned env) at a proxy."""

    def use(proxy: str) -> dict[str, str]:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("http_proxy", proxy)
        return dict(os.environ)

    return use


def max_in_window(times: list[float], window: float = 0.1) -> int:
    """The most of ``times`` that fall within any ``window`` seconds."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while t - times[j] > window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_max_in_window() -> None:
    assert max_in_window([0.0, 0.05, 0.1, 0.3]) == 3
    assert max_in_window([0.0, 0.2, 0.4]) == 1
    assert max_in_window([]) == 0


# --- N real CLI installs on loop disks, through squid ---------------------------------------------


@pytest.mark.root
def test_fleet_installs_through_squid_fetch_the_image_once(
    tmp_path: Path, make_loop, proxy_env
) -> None:
    from demo.sample_image import build_image

    image = build_image(tmp_path / "img.raw", fmt="raw", table="gpt", size_mib=24).read_bytes()
    digest = hashlib.sha256(image).hexdigest()
    disks = [make_loop(64 * MiB, name=f"d{i}.img") for i in range(FLEET)]
    origin = Origin(image, rate=16 * MiB).start()
    try:
        with squid() as proxy:
            env = proxy_env(proxy)
            procs = [_start_install(tmp_path, i, disk, origin.url("/img.raw"), digest, env)
                     for i, disk in enumerate(disks)]  # fmt: skip
            outcomes = [p.communicate(timeout=240) for p in procs]
    finally:
        origin.stop()
    for proc, (out, err) in zip(procs, outcomes, strict=True):
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["status"] == "done"
    ratio = origin.egress() / len(image)
    via = [h for h in origin.hits if h.via]
    print(
        f"\nfleet of {FLEET} CLI installs through squid: origin egress {ratio:.2f}x the image, "
        f"{len(origin.hits)} origin requests ({len(via)} via squid)"
    )
    assert len(via) == len(origin.hits)  # the proxy variables were honoured
    assert ratio <= 1.2


def _start_install(
    tmp_path: Path, i: int, disk: str, url: str, digest: str, env: dict[str, str]
) -> subprocess.Popen[str]:
    meta = {"imageURL": url, "imageType": "raw", "imageCheckSum": digest,
            "imageCheckSumType": "sha256"}  # fmt: skip
    body = {
        "templateName": "byoi_64",
        "details": {"customHostname": f"node-{i}"},
        "userMetadata": [{"key": k, "value": v} for k, v in meta.items()],
    }
    payload = tmp_path / f"payload{i}.json"
    payload.write_text(json.dumps(body))
    cmd = [sys.executable, "-m", "agent", "install", "--payload", str(payload), "--json"]
    cmd += ["--disk", disk, "--workdir", str(tmp_path / f"work{i}")]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip


# --- an outage in the middle: N agents through squid, 2N direct ---------------------------------


def _fleet(urls: list[str], dest: Path, settings: DownloadSettings, digest: str):  # type: ignore[no-untyped-def]
    """Start one download per URL at once (threads, one client each, as separate agents)."""
    results: list = [None] * len(urls)
    dest.mkdir(exist_ok=True)

    def one(i: int) -> None:
        try:
            res = download(
                urls[i], dest / f"image{i}", headers={}, image_type="raw",
                checksum_type="sha256", memory_budget=None, settings=settings,
            )  # fmt: skip
            results[i] = res.digest == digest or f"bad digest {res.digest}"
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    return threads, results


def test_fleet_sits_out_an_outage_and_comes_back_spread(tmp_path: Path, proxy_env) -> None:
    image = os.urandom(8 * MiB)
    digest = hashlib.sha256(image).hexdigest()
    # The outage starts once the origin has sent a tenth of the image to squid (squid keeps no
    # partial object: what the origin sent before the cut is sent again after it); the direct
    # agents start then, all at one moment, as a fleet cut at once would come back.
    origin = Origin(image, rate=2 * MiB, retry_after=2).start()
    via_squid = DownloadSettings(backoff_max=8.0, stall_timeout=10.0)
    direct = DownloadSettings(backoff_max=8.0, stall_timeout=10.0, trust_env=False)
    direct_urls = [origin.url(f"/direct/{i}") for i in range(2 * FLEET)]
    try:
        with squid() as proxy:
            proxy_env(proxy)
            t0 = time.monotonic()
            origin.outage(OUTAGE, at_byte=len(image) // 10)
            fleet = [origin.url("/fleet.raw")] * FLEET
            threads, proxied = _fleet(fleet, tmp_path / "p", via_squid, digest)
            while not origin.is_down() and time.monotonic() - t0 < 30:
                time.sleep(0.01)
            more, directs = _fleet(direct_urls, tmp_path / "d", direct, digest)
            for t in threads + more:
                t.join(timeout=OUTAGE + 80)
            elapsed = time.monotonic() - t0
    finally:
        origin.stop()
    assert proxied == [True] * FLEET, proxied
    assert directs == [True] * (2 * FLEET), directs
    ratio = origin.egress("/fleet.raw") / len(image)
    back: dict[str, float] = {}  # each direct agent's first request after the recovery
    for hit in origin.hits:
        if hit.path.startswith("/direct/") and hit.at >= origin.down_until:
            back.setdefault(hit.path, hit.at)
    times = sorted(back.values())
    burst = max_in_window(times)
    during = sum(1 for h in origin.hits if origin.is_down(h.at))
    print(
        f"\noutage of {OUTAGE:.0f} s: {FLEET} agents via squid + {2 * FLEET} direct, all done "
        f"in {elapsed:.1f} s; origin egress via squid {ratio:.2f}x the image; {during} requests "
        f"answered 503 during the outage; after it the direct fleet came back over "
        f"{times[-1] - times[0]:.1f} s, at most {burst} of {2 * FLEET} within any 100 ms"
    )
    assert len(times) == 2 * FLEET
    assert ratio <= 1.2
    assert burst <= (2 * FLEET) // 4


def test_a_cut_behind_squid_that_forwards_ranges_still_costs_one_copy(
    tmp_path: Path, proxy_env
) -> None:
    """squid's default ``range_offset_limit 0`` forwards Range requests uncached, once per
    agent (the issue measured 18.6x the image for 20 agents). The agent does not send them: the
    answer it was cut from came from the origin (X-Cache: MISS), so it asks for the whole file
    again, a request squid collapses and caches."""
    image = os.urandom(8 * MiB)
    digest = hashlib.sha256(image).hexdigest()
    origin = Origin(image, rate=8 * MiB, retry_after=1).start()
    conf = SQUID_CONF.replace("range_offset_limit none", "range_offset_limit 0")
    try:
        with squid(conf) as proxy:
            proxy_env(proxy)
            t0 = time.monotonic()
            origin.outage(1.0, at_byte=len(image) * 4 // 10)  # a cut at 40 %
            settings = DownloadSettings(backoff_max=2.0, stall_timeout=10.0)
            threads, results = _fleet(
                [origin.url("/cut.raw")] * FLEET, tmp_path / "c", settings, digest
            )
            for t in threads:
                t.join(timeout=60)
            elapsed = time.monotonic() - t0
    finally:
        origin.stop()
    assert results == [True] * FLEET, results
    ratio = origin.egress("/cut.raw") / len(image)
    ranges = [h for h in origin.hits if h.range]
    print(
        f"\ncut at 40 % behind squid with range_offset_limit 0: {FLEET} agents, origin egress "
        f"{ratio:.2f}x the image, {len(ranges)} Range requests reached it, {elapsed:.1f} s"
    )
    assert not ranges
    assert ratio <= 1.6  # the part sent before the cut, then one whole copy

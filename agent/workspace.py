"""The download area: a tmpfs, so the image lives in RAM as OVHcloud's agent does.

If the work directory already is a tmpfs (a PXE ramdisk's / usually is) it is used as is;
otherwise a tmpfs capped at the memory budget is mounted under it for the install and always
unmounted afterwards, even when the install fails.

An agent that was killed (SIGKILL, OOM, power loss of a ramdisk is moot) leaves its area behind:
a tmpfs holding a whole image eats the RAM the next install's budget needs. Areas are named
``byoi-<pid>-*``, and at the start of an install those whose process is gone (or is this one:
only one install runs per process, so an area with our pid is a reused pid's) are unmounted and
removed. Areas of a live agent are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

from agent.tools import ToolError, run

log = logging.getLogger(__name__)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest matching mount point)."""
    path = path.resolve()
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(
            mount
        ) > len(best):
            best, fstype = mount, part.fstype
    return fstype


_AREA = re.compile(r"^byoi-(\d+)-")


def stale_areas(names: list[str], alive: set[int], me: int) -> list[str]:
    """Which area names belong to no running agent (pure)."""
    stale = []
    for name in names:
        m = _AREA.match(name)
        if m and (int(m.group(1)) == me or int(m.group(1)) not in alive):
            stale.append(name)
    return stale


def _unmount(path: Path) -> None:
    try:
        run(["umount", str(path)])
    except ToolError as exc:
        log.warning("unmount failed, detaching lazily: %s", exc.detail)
        run(["umount", "-l", str(path)], check=False)


def clean_stale(workdir: Path) -> list[Path]:
    """Unmount and remove the areas that crashed agents left under ``workdir``."""
    try:
        names = [p.name for p in workdir.iterdir() if p.is_dir()]
    except OSError:
        return []
    removed = []
    mounts = {p.mountpoint for p in psutil.disk_partitions(all=True)}
    for name in stale_areas(names, set(psutil.pids()), os.getpid()):
        area = workdir / name
        log.warning("removing the download area %s left by an earlier run", area)
        for _ in range(4):  # stacked mounts: unmount each, but never loop forever
            if str(area) not in mounts:
                break
            _unmount(area)
            mounts = {p.mountpoint for p in psutil.disk_partitions(all=True)}
        if str(area) in mounts:
            log.error("%s is still mounted; left in place", area)
            continue
        shutil.rmtree(area, ignore_errors=True)
        removed.append(area)
    return removed


@contextlib.contextmanager
def download_area(workdir: Path, size_cap: int) -> Iterator[Path]:
    """A fresh directory on a tmpfs under ``workdir``, removed (and unmounted) on exit."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    clean_stale(workdir)
    area = Path(tempfile.mkdtemp(prefix=f"byoi-{os.getpid()}-", dir=workdir))
    mounted = False
    try:
        if filesystem_type(area) != "tmpfs":
            cap = max(size_cap, 64 << 20)
            run(["mount", "-t", "tmpfs", "-o", f"size={cap},mode=0700", "byoi-tmpfs", str(area)])
            mounted = True
        yield area
    finally:
        if mounted:
            _unmount(area)
        shutil.rmtree(area, ignore_errors=True)

"""The download area: a tmpfs, so the image lives in RAM as OVHcloud's agent does.

A tmpfs capped at the memory budget, with huge pages, is mounted under the work directory for
the install and always unmounted afterwards, even when the install fails (where no mount is
allowed, a work directory already on tmpfs is used as it is).

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
import threading
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


def _mount_tmpfs(area: Path, cap: int) -> bool:
    """Mount the area's own tmpfs, capped at ``cap`` (the memory budget), even when the work
    directory already is on a tmpfs: a rescue system's /run is a tmpfs capped at half the RAM
    by default, smaller than the budget, so an image between the two would not fit. Where
    nothing can be mounted (a container), an area already on tmpfs is used as it is: False.

    Not with ``huge=always``: transparent huge pages wrote a 725 MB image in 0.68-0.8 s
    instead of 0.85-1.05 s, but one download in two took 1.1-2.3 s (measured here, 8 runs)."""
    try:
        run(["mount", "-t", "tmpfs", "-o", f"size={cap},mode=0700", "byoi-tmpfs", str(area)])
        return True
    except ToolError:
        if filesystem_type(area) != "tmpfs":
            raise
        log.warning("cannot mount a tmpfs on %s; using its tmpfs as it is", area)
        return False


@contextlib.contextmanager
def download_area(workdir: Path, size_cap: int) -> Iterator[Path]:
    """A fresh directory on a tmpfs under ``workdir``, removed (and unmounted) on exit."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    clean_stale(workdir)
    area = Path(tempfile.mkdtemp(prefix=f"byoi-{os.getpid()}-", dir=workdir))
    mounted = False
    try:
        mounted = _mount_tmpfs(area, max(size_cap, 64 << 20))
        yield area
    finally:
        if mounted:
            _unmount(area)
        shutil.rmtree(area, ignore_errors=True)


def release(image: Path) -> threading.Thread:
    """Delete the downloaded image on another thread and return it (join it before the area
    goes): tmpfs hands a 725 MB file's pages back in 0.1 s of kernel time, which so overlaps the
    table writes instead of delaying them (``os.unlink`` lets the interpreter run meanwhile)."""

    def unlink() -> None:
        try:
            image.unlink(missing_ok=True)
        except OSError as exc:  # the area's removal at the end tries again
            log.warning("could not delete %s: %s", image, exc)

    thread = threading.Thread(target=unlink, name="release-image", daemon=True)
    thread.start()
    return thread

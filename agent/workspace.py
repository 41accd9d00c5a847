"""The download area: a tmpfs, so the image lives in RAM as OVHcloud's agent does.

If the work directory already is a tmpfs (a PXE ramdisk's / usually is) it is used as is;
otherwise a tmpfs capped at the memory budget is mounted under it for the install and always
unmounted afterwards, even when the install fails.
"""

from __future__ import annotations

import contextlib
import logging
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


@contextlib.contextmanager
def download_area(workdir: Path, size_cap: int) -> Iterator[Path]:
    """A fresh directory on a tmpfs under ``workdir``, removed (and unmounted) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    area = Path(tempfile.mkdtemp(prefix="byoi-", dir=workdir))
    mounted = False
    try:
        if filesystem_type(area) != "tmpfs":
            cap = max(size_cap, 64 << 20)
            run(["mount", "-t", "tmpfs", "-o", f"size={cap},mode=0700", "byoi-tmpfs", str(area)])
            mounted = True
        yield area
    finally:
        if mounted:
            try:
                run(["umount", str(area)])
            except ToolError as exc:
                log.warning("unmount failed, detaching lazily: %s", exc.detail)
                run(["umount", "-l", str(area)], check=False)
        shutil.rmtree(area, ignore_errors=True)

"""Reading sysfs: the one home of the small helpers every disk module needs.

sysfs attributes are text files that may vanish at any moment (a device unplugged, a partition
table re-read), so every reader here answers "unknown" (None, a default, an empty tuple)
instead of raising: a missing attribute is an answer, never an error.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_attr(path: Path) -> str | None:
    """The stripped text of one attribute file, or None when absent, unreadable or empty."""
    try:
        value = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return value or None


def read_int(path: Path, default: int = 0) -> int:
    """An integer attribute (``size``, ``queue/logical_block_size``), ``default`` if unknown."""
    value = read_attr(path)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def read_bytes(path: Path) -> bytes | None:
    """A binary attribute (``vpd_pg80``), or None."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def listdir(path: Path) -> tuple[str, ...]:
    """Sorted entry names of a sysfs directory (``holders``, ``slaves``), () if absent."""
    try:
        return tuple(sorted(p.name for p in path.iterdir()))
    except OSError:
        return ()


def subsystem(device: Path) -> str | None:
    """The bus or class a device directory belongs to (its ``subsystem`` link's target name)."""
    try:
        return os.path.basename(os.readlink(device / "subsystem"))
    except OSError:
        return None


def uevent(device: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a device's ``uevent`` file (DEVTYPE, DRIVER, ...)."""
    text = read_attr(device / "uevent") or ""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def devtype(device: Path) -> str | None:
    """The device type within its subsystem (``disk``, ``scsi_device``, ``usb_interface``)."""
    return uevent(device).get("DEVTYPE")


def ancestors(device: Path, sysfs: Path) -> list[Path]:
    """``device`` (a resolved path under ``<sysfs>/devices``) and its parents up to the root.

    Sysfs nests a device inside its parent's directory, so the parents are the path's own
    ancestors; the walk stops at ``<sysfs>/devices``.
    """
    top = sysfs / "devices"
    chain: list[Path] = []
    node = device
    while node != top and top in node.parents:
        chain.append(node)
        node = node.parent
    return chain

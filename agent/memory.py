"""The RAM check: the image is downloaded into a tmpfs, so it must fit in memory.

OVHcloud's rule is that the image must be smaller than the server's RAM minus 3 GiB; we apply it
to the memory available now (what the rescue system itself uses is not free for the image).
"""

from __future__ import annotations

import psutil

RESERVE = 3 * 1024**3


def available_memory() -> int:
    return int(psutil.virtual_memory().available)


def image_budget(available: int | None = None) -> int:
    """How many bytes of image may be downloaded into memory (may be negative)."""
    return (available_memory() if available is None else available) - RESERVE

"""The RAM check: the image is downloaded into a tmpfs, so it must fit in memory.

OVHcloud's rule is that the image must be smaller than the server's RAM minus 3 GiB; we apply it
to the memory available now (what the rescue system itself uses is not free for the image).
"""

from __future__ import annotations

import psutil

from agent import messages as msg
from agent.messages import InstallError

RESERVE = 3 * 1024**3


def available_memory() -> int:
    return int(psutil.virtual_memory().available)


def image_budget(available: int | None = None) -> int:
    """How many bytes of image may be downloaded into memory (may be negative)."""
    return (available_memory() if available is None else available) - RESERVE


def check_fits(image_size: int, image_type: str, available: int | None = None) -> None:
    """Raise the documented message when image + 3 GiB exceeds the available memory."""
    if image_size > image_budget(available):
        raise InstallError(msg.too_big_for_memory(image_type))

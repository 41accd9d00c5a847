"""Checksums: the hasher fed while the image streams in, and the final comparison."""

from __future__ import annotations

import hashlib
import hmac

from agent import messages as msg
from agent.messages import InstallError


def new_hasher(checksum_type: str) -> hashlib._Hash:
    """A fresh hasher for one of OVHcloud's four checksum types."""
    if checksum_type not in msg.CHECKSUM_TYPES:
        raise InstallError(msg.BAD_CHECKSUM_TYPE)
    return hashlib.new(checksum_type)


def verify(checksum_type: str, actual: str, expected: str) -> None:
    """Raise the documented message when the downloaded file's digest is not the expected one."""
    if not hmac.compare_digest(actual.lower(), expected.lower()):
        raise InstallError(msg.bad_checksum(checksum_type, actual.lower(), expected.lower()))

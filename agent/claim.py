"""Pinning the target disk between its choice and the last write.

The disk is chosen before the download, which can take many minutes; a device node names
whatever disk the kernel put there last (a hot-swap, a re-scan, a renamed ``sdX``). So the
chosen disk's identity is recorded at choice time (``pin``), and the write phase runs inside
``hold``: the device is opened with ``O_EXCL`` (the kernel's exclusive claim, which a mount, an
md/dm assembly or any other ``O_EXCL`` opener then cannot take), and the identity read through
that open descriptor must equal the pinned one before the first byte is written. While the
descriptor is open, the kernel cannot hand the disk's name to another device either.

The claim does not stop our own tools: qemu-img, sgdisk, sfdisk, wipefs --force and blkid open
the device without ``O_EXCL``. It does stop BLKRRPART through another descriptor (EBUSY), so the
partition re-read goes through the claimed descriptor (``blockdev.claimed_fd``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent import blockdev
from agent import messages as msg
from agent.messages import InstallError
from agent.sysfs import read_attr

log = logging.getLogger(__name__)

SYSFS = Path("/sys")


@dataclass(frozen=True)
class Identity:
    """What tells one disk from another, read the same way at pin and at write time."""

    devno: tuple[int, int]
    size: int
    name: str
    serial: str | None = None
    wwid: str | None = None
    model: str | None = None
    backing: str | None = None  # a loop device's backing file (its only identity)


def identity_of_fd(fd: int, sysfs: Path = SYSFS) -> Identity:
    """The identity of the block device open on ``fd`` (sysfs through its dev number)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        raise OSError(errno.ENOTBLK, "not a block device")
    devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
    size = struct.unpack("Q", fcntl.ioctl(fd, blockdev.BLKGETSIZE64, bytes(8)))[0]
    sysdir = (sysfs / "dev" / "block" / f"{devno[0]}:{devno[1]}").resolve()
    device = sysdir / "device"
    backing = read_attr(sysdir / "loop" / "backing_file")
    if backing:
        with contextlib.suppress(OSError):
            bst = os.stat(backing.removesuffix(" (deleted)"))
            backing += f" (dev {bst.st_dev} inode {bst.st_ino})"
    return Identity(
        devno=devno,
        size=size,
        name=sysdir.name,
        serial=read_attr(sysdir / "serial") or read_attr(device / "serial"),
        wwid=read_attr(sysdir / "wwid") or read_attr(device / "wwid"),
        model=read_attr(device / "model"),
        backing=backing,
    )


def identity_of(path: str, sysfs: Path = SYSFS) -> Identity:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return identity_of_fd(fd, sysfs)
    finally:
        os.close(fd)


def differences(pinned: Identity, now: Identity) -> list[str]:
    """Human-readable differences between two identities (empty: the same disk). Pure."""
    return [
        f"{f.name} was {getattr(pinned, f.name)!r}, now {getattr(now, f.name)!r}"
        for f in dataclasses.fields(Identity)
        if getattr(pinned, f.name) != getattr(now, f.name)
    ]


@dataclass(frozen=True)
class Pin:
    path: str
    identity: Identity


def pin(path: str, major: int = 0, minor: int = 0, size: int = 0) -> Pin:
    """Record the identity of the disk at ``path`` now; with the chosen disk's sysfs numbers
    (``major``, ``minor``, ``size``) it must agree already (a node swapped during discovery)."""
    try:
        identity = identity_of(path)
    except OSError as exc:
        raise InstallError(msg.disk_not_eligible(path, "cannot be opened"), str(exc)) from None
    expected = (major, minor) if major else identity.devno
    if identity.devno != expected or (size and identity.size != size):
        raise InstallError(
            msg.disk_changed(path, f"{identity.devno} {identity.size} bytes, chose {expected}")
        )
    return Pin(path, identity)


@contextlib.contextmanager
def hold(pinned: Pin) -> Iterator[int]:
    """Hold the pinned disk with ``O_EXCL`` for the write phase; refuse a different disk.

    Yields the claimed descriptor (read-only: all writes go through tools or other fds).
    """
    path = pinned.path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise InstallError(
                msg.disk_busy(path, "opened exclusively by another user (mount, RAID, LVM, dm)")
            ) from None
        raise InstallError(msg.disk_changed(path, f"cannot be opened: {exc.strerror}")) from None
    try:
        changed = differences(pinned.identity, identity_of_fd(fd))
        if changed:
            raise InstallError(msg.disk_changed(path, "; ".join(changed)))
        with blockdev.claimed(path, fd):
            yield fd
    finally:
        os.close(fd)


def check_same(pinned: Pin, fd: int) -> None:
    """The node still names the claimed device (between steps that open it by name)."""
    try:
        st = os.stat(pinned.path)
    except OSError as exc:
        raise InstallError(msg.disk_changed(pinned.path, f"node gone: {exc.strerror}")) from None
    if st.st_rdev != os.fstat(fd).st_rdev:
        raise InstallError(msg.disk_changed(pinned.path, "the node now names another device"))


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """One install per disk across processes: a BSD ``flock(LOCK_EX)`` on the whole-disk node
    for the whole install, the convention udev and systemd's tools honour (udev does not probe
    a disk locked this way while it is being written). A disk another holder has locked is
    refused as busy instead of waited for."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(msg.disk_changed(path, f"cannot be opened: {exc.strerror}")) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallError(
                msg.disk_busy(path, "another install (or a partitioning tool) holds its lock")
            ) from None
        yield
    finally:
        os.close(fd)

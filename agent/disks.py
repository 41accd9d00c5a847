"""Which disk the image goes to, and whether it is safe to write it now.

A wrong disk wiped is the worst thing this agent can do, so the rules are strict and explained:
every block device is listed with the reason it is (or is not) eligible, the default choice is
deterministic, and a disk is refused while anything uses it.

Discovery lists ``<sysfs>/block`` (every whole disk) of a ``DiskSource``: the running system
(``RUNNING``: /sys, /dev, udev's database through pyudev, the mounts, swaps and exclusive opens
of this machine) or a fabricated tree in tests, which reaches every rule, the udev-properties
one included. The attributes are read by ONE function, ``_read_disk``: udev properties when
udevd has populated them, sysfs files when it has not (no udevd runs in most rescue ramdisks):
serial, WWN and by-path per device kind (agent/diskid.py, agent/bypath.py).

Never eligible: loop, ram, zram, optical (sr), floppy (fd), md, dm, nbd devices and eMMC
boot/RPMB areas, read-only or zero-size disks, removable media and USB-attached disks (sticks,
card readers, BMC virtual media: only ``--disk`` names them), a disk that holds the running
rescue system (what backs ``/``, ``/boot``, ``/boot/efi`` or a live medium, through partitions,
dm/md slaves and loop backing files; a root on overlay, tmpfs or a ramdisk has no disk), a disk
in use (mounted partitions, active swap, holders such as LVM/RAID/dm) and, for the automatic
choice only, a disk smaller than 4 GiB.

Default choice, among eligible disks (see ``choice_key``):
  1. non-removable before removable (kept as a second line of defence: removable media are
     not eligible);
  2. non-rotational before rotational: a server mixing SSD/NVMe and HDD puts the OS on flash;
  3. the smallest first, like OpenStack Ironic: OS disks are usually smaller than data disks,
     and choosing the big data disk wipes the most;
  4. the natural name order last (sda < sdb, nvme0n1 < nvme1n1) so identical twins always give
     the same answer.
The eligible disks also form numbered disk groups (agent/diskgroups.py, OVHcloud's
``diskGroupId``): group 1 holds the default choice. Precedence: ``--disk`` > root-device hints
(``--hint KEY=VALUE``) > ``diskGroupId`` (the group's first disk) > the default; ``--disk``
still goes through the safety checks (read-only, zero size, running system, busy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent import messages as msg
from agent.bypath import Location, locate
from agent.diskgroups import DiskGroup, number_groups, pick_group
from agent.diskid import identity
from agent.messages import InstallError
from agent.sysfs import listdir as _listdir
from agent.sysfs import read_attr as _attr
from agent.sysfs import read_int as _int_attr
from agent.units import GiB

log = logging.getLogger(__name__)

MIN_AUTO_SIZE = 4 * GiB
REAL_SYSFS = Path("/sys")
REAL_DEV = Path("/dev")
HINT_KEYS = ("name", "serial", "wwn", "wwid", "model", "vendor", "size", "rotational", "by_path")

# Mount points whose backing disk is the running rescue system itself.
SYSTEM_MOUNTPOINTS = (
    "/",
    "/boot",
    "/boot/efi",
    "/efi",
    "/run/live/medium",
    "/lib/live/mount/medium",
    "/run/initramfs/live",
    "/run/archiso/bootmnt",
    "/cdrom",
)

# (name pattern, reason): devices that are never an install target.
_NEVER: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), reason)
    for pattern, reason in (
        (r"loop\d+$", "loop device"),
        (r"zram\d+$", "compressed RAM disk (zram)"),
        (r"ram\d+$", "RAM disk"),
        (r"sr\d+$", "optical drive"),
        (r"fd\d+$", "floppy drive"),
        (r"md\d+$|md_", "software RAID (md) device"),
        (r"dm-\d+$", "device-mapper (LVM/dm) device"),
        (r"nbd\d+$", "network block device"),
        (r"mmcblk\d+(boot\d+|rpmb)$", "eMMC boot/RPMB area"),
    )
)
# Block majors that are fixed by the kernel, as a second opinion to the names.
_NEVER_MAJORS = {
    1: "RAM disk",
    2: "floppy drive",
    7: "loop device",
    9: "software RAID (md) device",
    11: "optical drive",
    43: "network block device",
}


@dataclass(frozen=True)
class Disk:
    """One whole-disk block device as discovered, with its verdict."""

    name: str  # kernel name: sda, nvme0n1
    path: str  # /dev/sda
    size: int  # bytes
    logical_sector_size: int
    physical_sector_size: int
    model: str | None
    vendor: str | None
    serial: str | None
    wwn: str | None
    rotational: bool
    removable: bool
    read_only: bool
    by_path: str | None
    eligible: bool
    reason: str  # why eligible or not, for a person
    major: int = 0
    minor: int = 0
    partitions: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()
    wwid: str | None = None  # sysfs' VPD 0x83 designator as is (naa., eui., t10. vendor string)
    transport: str | None = None  # nvme, sata, sas, scsi, usb, virtio (from the sysfs path)
    by_path_aliases: tuple[str, ...] = ()  # udev's compat by-path names of the same disk

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["partitions"] = list(self.partitions)
        data["holders"] = list(self.holders)
        data["by_path_aliases"] = list(self.by_path_aliases)
        return data


@dataclass(frozen=True)
class Mount:
    """A mounted filesystem or an active swap area: its source and, if known, its dev number."""

    source: str  # /dev/sda1, /dev/root, /swapfile
    where: str  # mount point, or "[swap]"
    devno: tuple[int, int] | None = None


@dataclass(frozen=True)
class SystemState:
    """What the running system uses right now (injectable so the rules are testable)."""

    mounts: tuple[Mount, ...] = ()
    swaps: tuple[Mount, ...] = ()


# --- reading the running system -----------------------------------------------------------------


def _devno(value: int) -> tuple[int, int] | None:
    return (os.major(value), os.minor(value)) if os.major(value) else None


def read_system_state(
    proc_swaps: Path = Path("/proc/swaps"), root: Path = Path("/")
) -> SystemState:
    """Mounts (psutil) and active swaps (/proc/swaps) of the running system.

    Only device-backed mounts are kept. For the system mount points the dev number of the
    mounted filesystem (``st_dev``) is recorded too: /proc/mounts often names the root device
    ``/dev/root``, which does not exist as a node. ``root`` is where the system's ``/`` is
    looked for (a test mounts one on a directory); a root on overlay, tmpfs or a ramdisk has no
    block device and marks no disk.
    """
    system = {os.path.normpath(os.path.join(root, m.lstrip("/"))): m for m in SYSTEM_MOUNTPOINTS}
    mounts: list[Mount] = []
    listed: set[str] = set()
    for part in psutil.disk_partitions(all=True):
        if not part.device.startswith("/"):
            continue  # tmpfs, proc, overlay, nfs "host:/path": no local disk behind the name
        devno = None
        where = system.get(part.mountpoint)
        if where is not None:
            listed.add(where)
            with contextlib.suppress(OSError):
                devno = _devno(os.stat(part.mountpoint).st_dev)
        mounts.append(Mount(part.device, where or part.mountpoint, devno))
    # A ramdisk root (rootfs/tmpfs/overlay) is skipped above; its dev number is anonymous anyway.
    # In a chroot (or a mount namespace) the mount that holds "/" may not be listed at all, so
    # the system mount points are also identified by the device their files live on.
    for path, where in system.items():
        if where in listed:
            continue
        with contextlib.suppress(OSError):
            devno = _devno(os.stat(path).st_dev)
            if devno:
                mounts.append(Mount(f"block device {devno[0]}:{devno[1]}", where, devno))
    swaps: list[Mount] = []
    with contextlib.suppress(OSError):
        for line in proc_swaps.read_text().splitlines()[1:]:
            fields = line.split()
            if not fields:
                continue
            path = fields[0].replace("\\040", " ")
            devno = None
            with contextlib.suppress(OSError):
                st = os.stat(path)
                devno = _devno(st.st_rdev) if stat.S_ISBLK(st.st_mode) else _devno(st.st_dev)
            swaps.append(Mount(path, "[swap]", devno))
    return SystemState(tuple(mounts), tuple(swaps))


# --- sysfs helpers ------------------------------------------------------------------------------


def _partitions(sysdir: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in sysdir.iterdir() if (p / "partition").is_file()))
    except OSError:
        return ()


def partition_name(disk: str, number: int) -> str:
    """The kernel name of partition ``number`` of ``disk``: a ``p`` separates two digits
    (``nvme0n1p1``, ``mmcblk0p1``, ``loop0p1``), none otherwise (``sda1``, ``vda1``)."""
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def _name_from_devno(devno: tuple[int, int] | None, sysfs: Path) -> str | None:
    """Kernel name of the block device ``major:minor`` (None for anonymous or unknown numbers:
    a root on overlay, tmpfs or a ramdisk has no block device behind it)."""
    if devno is None or devno[0] == 0:
        return None
    link = sysfs / "dev" / "block" / f"{devno[0]}:{devno[1]}"
    if not link.exists():
        return None
    return link.resolve().name


def _name_from_source(source: str, sysfs: Path) -> str | None:
    """Kernel name of a /dev path: by its dev number when it is a real node, else by its name."""
    real = os.path.realpath(source)
    with contextlib.suppress(OSError):
        st = os.stat(real)
        if stat.S_ISBLK(st.st_mode):
            devno = _devno(st.st_rdev)
            if devno and (name := _name_from_devno(devno, sysfs)):
                return name
    base = os.path.basename(real)
    if (sysfs / "class" / "block" / base).exists():
        return base
    return None


def whole_disks(name: str, sysfs: Path = REAL_SYSFS, _seen: set[str] | None = None) -> set[str]:
    """Every whole disk that a block device lives on.

    A partition lives on its parent disk; a dm or md device on its slaves' disks; a loop device
    on the disk holding its backing file. The device's own whole disk is included.
    """
    seen = _seen if _seen is not None else set()
    if name in seen:
        return set()
    seen.add(name)
    node = sysfs / "class" / "block" / name
    if not node.exists():
        return set()
    resolved = node.resolve()
    disk = resolved.parent.name if (resolved / "partition").is_file() else name
    found = {disk}
    sysdir = resolved.parent if disk != name else resolved
    for slave in _listdir(sysdir / "slaves") + _listdir(resolved / "slaves"):
        found |= whole_disks(slave, sysfs, seen)
    backing = _attr(sysdir / "loop" / "backing_file")
    if backing:
        with contextlib.suppress(OSError):
            devno = _devno(os.stat(backing.removesuffix(" (deleted)")).st_dev)
            if devno and (under := _name_from_devno(devno, sysfs)):
                found |= whole_disks(under, sysfs, seen)
    return found


def _source_disks(use: Mount, sysfs: Path) -> set[str]:
    names: set[str] = set()
    if use.devno and (name := _name_from_devno(use.devno, sysfs)):
        names.add(name)
    if name := _name_from_source(use.source, sysfs):
        names.add(name)
    disks: set[str] = set()
    for name in names:
        disks |= whole_disks(name, sysfs)
    return disks


def usage_by_disk(state: SystemState, sysfs: Path = REAL_SYSFS) -> dict[str, list[str]]:
    """Disk name -> what uses it ("mounted on /mnt (/dev/sdb1)", "swap /dev/sdb2", ...)."""
    uses: dict[str, list[str]] = {}
    for mount in state.mounts:
        for disk in _source_disks(mount, sysfs):
            uses.setdefault(disk, []).append(f"{mount.source} mounted on {mount.where}")
    for swap in state.swaps:
        for disk in _source_disks(swap, sysfs):
            uses.setdefault(disk, []).append(f"active swap on {swap.source}")
    return uses


def system_disks(state: SystemState, sysfs: Path = REAL_SYSFS) -> dict[str, str]:
    """Disk name -> why it holds the running rescue system (its root, boot or live medium)."""
    found: dict[str, str] = {}
    for mount in state.mounts:
        if mount.where in SYSTEM_MOUNTPOINTS:
            for disk in _source_disks(mount, sysfs):
                found.setdefault(
                    disk, f"holds the running system ({mount.where} is on {mount.source})"
                )
    return found


def _holders(sysdir: Path, partitions: Iterable[str]) -> tuple[str, ...]:
    held = set(_listdir(sysdir / "holders"))
    for part in partitions:
        held |= set(_listdir(sysdir / part / "holders"))
    return tuple(sorted(held))


# --- discovery ----------------------------------------------------------------------------------


def udev_database() -> dict[str, dict[str, str]]:
    """Kernel name -> udev properties of every whole disk, from libudev (pyudev)."""
    import pyudev

    context = pyudev.Context()
    return {
        d.sys_name: dict(d.properties)
        for d in context.list_devices(subsystem="block", DEVTYPE="disk")
    }


@dataclass(frozen=True)
class DiskSource:
    """Where discovery reads, injected so that every rule runs the same on a fabricated tree.

    ``sysfs`` and ``dev``: the trees (the real ``/sys`` and ``/dev``, or a test's).
    ``udev``: a callable giving udev's properties per disk name (``udev_database`` on the
    running system, a dict in a test, None where no udev exists); when it fails, the sysfs
    files say the same. ``live``: the running system, whose mounts and swaps are read and whose
    devices may be opened (exclusive-open busy check); a fabricated tree has neither.
    """

    sysfs: Path = REAL_SYSFS
    dev: Path = REAL_DEV
    udev: Callable[[], Mapping[str, Mapping[str, str]]] | None = None
    live: bool = False

    def properties(self) -> Mapping[str, Mapping[str, str]]:
        if self.udev is None:
            return {}
        try:
            return self.udev()
        except Exception as exc:  # no libudev in this ramdisk: sysfs says the same
            log.info("udev unavailable (%s); reading %s only", exc, self.sysfs)
            return {}

    def state(self) -> SystemState:
        """Mounts and swaps that apply to this source's disks."""
        return read_system_state() if self.live else SystemState()


RUNNING = DiskSource(REAL_SYSFS, REAL_DEV, udev=udev_database, live=True)


def never_reason(name: str, major: int, sysdir: Path) -> str | None:
    """Why a device is never an install target by its kind, or None."""
    for pattern, reason in _NEVER:
        if pattern.match(name):
            return reason
    if major in _NEVER_MAJORS:
        return _NEVER_MAJORS[major]
    for sub, reason in (
        ("loop", "loop device"),
        ("md", "software RAID (md) device"),
        ("dm", "device-mapper (LVM/dm) device"),
    ):
        if (sysdir / sub).is_dir():
            return reason
    return None


def _read_disk(
    name: str,
    source: DiskSource,
    props: Mapping[str, str],
    *,
    system: Mapping[str, str],
    uses: Mapping[str, list[str]],
    explicit: bool = False,
) -> Disk:
    """Attributes of one disk (udev properties first, sysfs otherwise) and its verdict.

    With ``explicit`` (the operator named the disk) the discovery rules about the kind of
    device, removable media and the minimum size do not apply; the safety checks do.
    """
    sysdir = source.sysfs / "block" / name
    devnum = (_attr(sysdir / "dev") or "0:0").split(":")
    major, minor = int(devnum[0]), int(devnum[1])
    device = sysdir / "device"
    location = locate(name, source.sysfs)
    ident = identity(name, sysdir, source.dev, props, location)
    partitions = _partitions(sysdir)
    disk = Disk(
        name=name,
        path=props.get("DEVNAME") or str(source.dev / name.replace("!", "/")),
        size=_int_attr(sysdir / "size") * 512,  # sysfs counts 512-byte units whatever the sector
        logical_sector_size=_int_attr(sysdir / "queue" / "logical_block_size", 512),
        physical_sector_size=_int_attr(sysdir / "queue" / "physical_block_size", 512),
        model=props.get("ID_MODEL") or _attr(device / "model"),
        vendor=props.get("ID_VENDOR") or _attr(device / "vendor"),
        serial=ident.serial,
        wwn=ident.wwn,
        rotational=_attr(sysdir / "queue" / "rotational") == "1",
        removable=_attr(sysdir / "removable") == "1",
        read_only=_attr(sysdir / "ro") == "1",
        by_path=ident.by_path,
        eligible=True,
        reason="",
        major=major,
        minor=minor,
        partitions=partitions,
        holders=_holders(sysdir, partitions),
        wwid=ident.wwid,
        transport=_transport(props, location),
        by_path_aliases=ident.by_path_aliases,
    )
    reason = _verdict(disk, sysdir, system=system, uses=uses, explicit=explicit)
    return dataclasses.replace(
        disk,
        eligible=reason is None,
        reason=reason or ("named explicitly" if explicit else "eligible"),
    )


def _transport(props: Mapping[str, str], location: Location) -> str | None:
    if props.get("ID_BUS") == "usb" or location.transport == "usb":
        return "usb"
    return location.transport


def _verdict(
    disk: Disk,
    sysdir: Path,
    *,
    system: Mapping[str, str],
    uses: Mapping[str, list[str]],
    explicit: bool,
) -> str | None:
    """The first reason this disk must not be written, or None."""
    if not explicit and (kind := never_reason(disk.name, disk.major, sysdir)):
        return kind
    if disk.read_only:
        return "read-only"
    if disk.size == 0:
        return "zero size (no medium?)"
    if not explicit and disk.removable:
        return "removable medium (card reader, USB stick, virtual media; use --disk to force it)"
    if not explicit and disk.transport == "usb":
        return "USB-attached (stick, external disk or BMC virtual media; use --disk to force it)"
    if disk.name in system:
        return system[disk.name]
    if explicit:
        return None  # busy disks are refused by check_not_busy, with its own message
    if disk.holders:
        return f"in use: held by {', '.join(disk.holders)} (LVM, RAID or dm)"
    if disk.name in uses:
        return "in use: " + "; ".join(uses[disk.name])
    if disk.size < MIN_AUTO_SIZE:
        return f"smaller than {MIN_AUTO_SIZE // GiB} GiB (use --disk to force it)"
    return None


def discover(source: DiskSource = RUNNING, *, state: SystemState | None = None) -> list[Disk]:
    """Every whole disk (``<sysfs>/block``), each with its eligibility and the reason, in
    natural name order. ``state`` (mounts, swaps) defaults to the source's own."""
    if state is None:
        state = source.state()
    system = system_disks(state, source.sysfs)
    uses = usage_by_disk(state, source.sysfs)
    properties = source.properties()
    return [
        _read_disk(name, source, properties.get(name, {}), system=system, uses=uses)
        for name in sorted(_listdir(source.sysfs / "block"), key=natural_key)
    ]


def natural_key(name: str) -> tuple[Any, ...]:
    """The order a person expects: sda < sdb < sdaa, nvme2n1 < nvme10n1."""
    parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)
    return (len(re.sub(r"\d+", "", name)), parts)


def choice_key(disk: Disk) -> tuple[Any, ...]:
    """Sort key of the default choice (see the module docstring for why)."""
    return (disk.removable, disk.rotational, disk.size, natural_key(disk.name))


# --- hints --------------------------------------------------------------------------------------

_SIZE_HINT = re.compile(r"^\s*(>=|<=|==|>|<)?\s*(\d+)\s*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_hints(pairs: Iterable[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> dict, with keys and values checked.

    Keys: name, serial, wwn, wwid, model, vendor, size (GiB, optionally with >=, <=, >, <, ==),
    rotational (true/false), by_path. A key given twice is refused: which one would win is
    not obvious to the operator.
    """
    hints: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        if not sep or not key:
            raise InstallError(msg.bad_hint(pair, "expected KEY=VALUE"))
        if key not in HINT_KEYS:
            raise InstallError(msg.bad_hint(pair, f"unknown key; known: {', '.join(HINT_KEYS)}"))
        if not value:
            raise InstallError(msg.bad_hint(pair, "empty value"))
        if key in hints:
            raise InstallError(msg.bad_hint(pair, f"{key} given twice"))
        if key == "size" and not _SIZE_HINT.match(value):
            raise InstallError(msg.bad_hint(pair, "size is a whole number of GiB, e.g. 480"))
        if key == "rotational" and value.lower() not in _TRUE | _FALSE:
            raise InstallError(msg.bad_hint(pair, "rotational is true or false"))
        hints[key] = value
    return hints


def _norm(value: str | None) -> str:
    return " ".join((value or "").split()).lower()


def _norm_wwn(value: str | None) -> str:
    value = _norm(value)
    for prefix in ("0x", "naa.", "eui.", "wwn-"):
        value = value.removeprefix(prefix)
    return value


def hint_matches(disk: Disk, key: str, value: str) -> bool:
    """Whether one hint matches one disk (text compared case- and spacing-insensitively)."""
    if key == "name":
        return value in (disk.name, disk.path) or os.path.basename(value) == disk.name
    if key == "size":
        m = _SIZE_HINT.match(value)
        if not m:
            return False
        op, want, have = m.group(1) or "==", int(m.group(2)), disk.size // GiB
        return {
            "==": have == want,
            ">=": have >= want,
            "<=": have <= want,
            ">": have > want,
            "<": have < want,
        }[op]
    if key == "rotational":
        return disk.rotational == (value.lower() in _TRUE)
    if key == "wwn":
        return bool(disk.wwn) and _norm_wwn(value) == _norm_wwn(disk.wwn)
    if key == "wwid":
        return bool(disk.wwid) and _norm(value) == _norm(disk.wwid)
    if key == "by_path":
        names = [p for p in (disk.by_path, *disk.by_path_aliases) if p]
        return value in names or value in {os.path.basename(p) for p in names}
    have = {"serial": disk.serial, "model": disk.model, "vendor": disk.vendor}[key]
    return bool(have) and _norm(value) == _norm(have)


def format_hints(hints: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(hints.items()))


# --- the choice ---------------------------------------------------------------------------------


def choose(
    disks: list[Disk], hints: Mapping[str, str] | None = None, group: int | None = None
) -> tuple[Disk, str]:
    """The target among discovered disks and why (pure: no I/O).

    With hints, the disk must match all of them and be eligible; several matches are ordered
    like the default choice. Else with ``group`` (``diskGroupId``), the first disk of that disk
    group (see agent/diskgroups.py). Raises InstallError when nothing fits.
    """
    if hints:
        if group is not None:
            log.info("root device hints given: diskGroupId %s ignored", group)
        return _by_hints(disks, hints)
    if group is not None:
        chosen = pick_group(disk_groups(disks), group)
        return chosen.first, f"first disk of disk group {chosen.id} ({chosen.describe()})"
    eligible = [d for d in disks if d.eligible]
    if not eligible:
        raise InstallError(msg.NO_ELIGIBLE_DISK)
    best = sorted(eligible, key=choice_key)[0]
    traits = [
        "removable" if best.removable else "non-removable",
        "rotational" if best.rotational else "non-rotational",
    ]
    return best, (
        f"default choice: the smallest {' '.join(traits)} eligible disk "
        f"({best.size // GiB} GiB) of {len(eligible)} eligible"
    )


def _by_hints(disks: list[Disk], hints: Mapping[str, str]) -> tuple[Disk, str]:
    matching = [d for d in disks if all(hint_matches(d, k, v) for k, v in hints.items())]
    usable = sorted((d for d in matching if d.eligible), key=choice_key)
    if usable:
        extra = f" (first of {len(usable)} by the default order)" if len(usable) > 1 else ""
        return usable[0], f"matches the root device hints {format_hints(hints)}{extra}"
    if matching:
        first = matching[0]
        raise InstallError(msg.disk_not_eligible(first.path, first.reason))
    raise InstallError(msg.no_disk_matches_hints(format_hints(hints)))


def disk_groups(disks: list[Disk]) -> list[DiskGroup]:
    """The eligible disks' groups, numbered so that group 1 holds the default choice."""
    eligible = [d for d in disks if d.eligible]
    default = sorted(eligible, key=choice_key)[0] if eligible else None
    return number_groups(disks, default, natural_key)


def explicit_disk(
    device: str, source: DiskSource = RUNNING, *, state: SystemState | None = None
) -> Disk:
    """The disk the operator named, read like a discovered one, safety checks applied."""
    sysfs = source.sysfs
    path = device if device.startswith("/") else str(source.dev / device)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise InstallError(msg.disk_not_eligible(device, "no such device"), str(exc)) from None
    if not stat.S_ISBLK(st.st_mode):
        raise InstallError(msg.disk_not_eligible(device, "not a block device"))
    devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
    name = _name_from_devno(devno, sysfs)
    if name is None or not (sysfs / "class" / "block" / name).exists():
        raise InstallError(msg.disk_not_eligible(device, "not known to the kernel (sysfs)"))
    if ((sysfs / "class" / "block" / name).resolve() / "partition").is_file():
        parent = (sysfs / "class" / "block" / name).resolve().parent.name
        raise InstallError(
            msg.disk_not_eligible(device, f"is a partition; name the whole disk ({parent})")
        )
    if state is None:
        state = source.state()
    disk = _read_disk(
        name,
        source,
        {"DEVNAME": real},
        system=system_disks(state, sysfs),
        uses={},
        explicit=True,
    )
    if not disk.eligible:
        raise InstallError(msg.disk_not_eligible(disk.path, disk.reason))
    return disk


def select_target(
    explicit: str | None,
    hints: Mapping[str, str],
    *,
    group: int | None = None,
    source: DiskSource = RUNNING,
    state: SystemState | None = None,
) -> Disk:
    """The disk to install on: ``explicit`` (``--disk``) if given, else discovery + hints, else
    discovery + disk group ``group`` (``diskGroupId``), else the default choice.

    An explicit disk skips the discovery rules (a loop device is fine) but not the safety
    checks: read-only, zero size, the running system, busy.
    """
    if explicit:
        if hints or group is not None:
            log.info("--disk %s given: hints %s, diskGroupId %s ignored", explicit, hints, group)
        disk = explicit_disk(explicit, source, state=state)
        check_not_busy(disk, source=source, state=state)
        return disk
    disk, why = choose(discover(source, state=state), hints, group)
    log.info("target disk %s: %s", disk.path, why)
    return dataclasses.replace(disk, reason=why)


def disks_report(
    hints: Mapping[str, str] | None = None,
    *,
    group: int | None = None,
    source: DiskSource = RUNNING,
    state: SystemState | None = None,
) -> dict[str, Any]:
    """SPEC's ``disks --json`` / ``GET /disks`` document: every disk (with its ``diskGroupId``),
    the disk groups, the choice and why."""
    disks = discover(source, state=state)
    groups = disk_groups(disks)
    member = {d.name: g.id for g in groups for d in g.disks}
    chosen: str | None
    try:
        disk, reason = choose(disks, hints, group)
        chosen = disk.path
    except InstallError as exc:
        chosen, reason = None, exc.message
    report: dict[str, Any] = {
        "disks": [{**d.to_json(), "diskGroupId": member.get(d.name)} for d in disks],
        "diskGroups": [g.to_json() for g in groups],
        "chosen": chosen,
        "reason": reason,
    }
    if hints:
        report["hints"] = dict(hints)
    if group is not None:
        report["diskGroupId"] = group
    return report


# --- busy ---------------------------------------------------------------------------------------


def _openers(paths: set[str]) -> list[str]:
    """Processes holding one of ``paths`` open, as "pid N (name)" (best effort, for a message)."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.info["pid"] == os.getpid():
            continue
        fd_dir = Path(f"/proc/{proc.info['pid']}/fd")
        try:
            targets = {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
        except OSError:
            continue
        if targets & paths:
            found.append(f"pid {proc.info['pid']} ({proc.info['name']})")
    return found


def exclusive_holder(path: str) -> str | None:
    """Why ``path`` cannot be opened exclusively (EBUSY: a mount, md, dm or a process), or None.

    The kernel's exclusive claim covers the partitions too: a claimed partition makes the
    whole disk unclaimable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return None  # not ours to judge here (ENOENT, EACCES): the write will say
        who = _openers({os.path.realpath(path)})
        return "opened exclusively " + (
            f"by {', '.join(who)}" if who else "(by the kernel: a mount, RAID, LVM or dm)"
        )
    os.close(fd)
    return None


def busy_reasons(
    disk: Disk, *, source: DiskSource = RUNNING, state: SystemState | None = None
) -> list[str]:
    """Everything that uses ``disk`` now: mounts, swaps, holders, an exclusive opener."""
    if state is None:
        state = source.state()
    sysfs = source.sysfs
    sysdir = sysfs / "block" / disk.name
    reasons = list(usage_by_disk(state, sysfs).get(disk.name, []))
    partitions = _partitions(sysdir)
    holders = _holders(sysdir, partitions)
    if holders:
        reasons.append(f"held by {', '.join(holders)} (LVM, RAID or dm)")
    # The exclusive open catches what the lists above do not know (another process, a holder
    # without sysfs trace); when they already explain the disk, it adds nothing.
    if not reasons and source.live and (why := exclusive_holder(disk.path)):
        reasons.append(why)
    return reasons


def check_not_busy(
    disk: Disk, *, source: DiskSource = RUNNING, state: SystemState | None = None
) -> None:
    """Refuse a disk that anything uses, before the first byte is written.

    Checked fresh each call (the state may have changed since discovery): mounted filesystems
    on the disk or its partitions, active swap, holders (LVM, md, dm) of the disk or its
    partitions, and an exclusive open by another process (``O_EXCL`` gives EBUSY).
    """
    reasons = busy_reasons(disk, source=source, state=state)
    if reasons:
        raise InstallError(msg.disk_busy(disk.path, "; ".join(reasons)))

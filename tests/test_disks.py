"""Disk discovery, eligibility, the default choice, hints and busy checks.

The discovery rules run on fabricated sysfs trees (fast, no root, every device kind); the
``--disk`` path and the busy checks run on real loop devices with real mounts, swap and
exclusive opens.
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import disks, messages
from agent.disks import Disk, DiskSource, Mount, SystemState
from agent.messages import InstallError
from tests.conftest import needs_root

GiB = 1024**3


class FakeSysfs:
    """A fabricated /sys and /dev laid out like the kernel's (block/, class/block, dev/block)."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        for d in ("block", "class/block", "dev/block", "devices/virtual/block"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        (self.dev / "disk" / "by-path").mkdir(parents=True)

    @staticmethod
    def _write(path: Path, value: str | bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            path.write_text(value + "\n")

    def _link(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))

    def disk(
        self,
        name: str,
        major: int,
        minor: int,
        *,
        size: int = 100 * GiB,
        ro: bool = False,
        rotational: bool = False,
        removable: bool = False,
        lbs: int = 512,
        pbs: int | None = None,
        attrs: dict[str, str | bytes] | None = None,
        partitions: int = 0,
        holders: dict[str, list[str]] | None = None,
        slaves: list[str] = (),
        by_path: str | None = None,
        parent: str | None = None,
    ) -> Path:
        """A whole disk; with ``parent`` (the directory holding it under devices/, e.g.
        ``pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block``) its ``device`` link
        points at the hardware device that directory belongs to."""
        d = self.sys / "devices" / (parent or "virtual/block") / name
        d.mkdir(parents=True)
        self._link(d / "subsystem", self.sys / "class" / "block")
        self._write(d / "uevent", f"MAJOR={major}\nMINOR={minor}\nDEVNAME={name}\nDEVTYPE=disk")
        if parent:
            hw = d.parent.parent if d.parent.name == "block" else d.parent
            self._link(d / "device", hw)
        self._write(d / "dev", f"{major}:{minor}")
        self._write(d / "size", str(size // 512))
        self._write(d / "ro", "1" if ro else "0")
        self._write(d / "removable", "1" if removable else "0")
        self._write(d / "queue" / "rotational", "1" if rotational else "0")
        self._write(d / "queue" / "logical_block_size", str(lbs))
        self._write(d / "queue" / "physical_block_size", str(pbs or lbs))
        for rel, value in (attrs or {}).items():
            self._write(d / rel, value)
        (d / "holders").mkdir()
        (d / "slaves").mkdir()
        for slave in slaves:
            (d / "slaves" / slave).mkdir()
        self._link(self.sys / "block" / name, d)
        self._link(self.sys / "class" / "block" / name, d)
        self._link(self.sys / "dev" / "block" / f"{major}:{minor}", d)
        (self.dev / name).touch()
        for number in range(1, partitions + 1):
            pname = f"{name}p{number}" if name[-1].isdigit() else f"{name}{number}"
            p = d / pname
            self._write(p / "partition", str(number))
            self._write(p / "dev", f"{major}:{minor + number}")
            self._write(p / "size", str(size // 512 // (partitions + 1)))
            (p / "holders").mkdir()
            self._link(self.sys / "class" / "block" / pname, p)
            self._link(self.sys / "dev" / "block" / f"{major}:{minor + number}", p)
            (self.dev / pname).touch()
        for owner, held in (holders or {}).items():
            (d / owner / "holders" if owner != name else d / "holders").mkdir(exist_ok=True)
            for h in held:
                ((d / owner if owner != name else d) / "holders" / h).mkdir()
        if by_path:
            self._link(self.dev / "disk" / "by-path" / by_path, self.dev / name)
        return d

    @property
    def source(self) -> DiskSource:
        return DiskSource(self.sys, self.dev)

    def device(self, rel: str, subsystem: str, devtype: str | None = None, **attrs: str) -> Path:
        """A hardware device directory under devices/ with its subsystem link and uevent."""
        d = self.sys / "devices" / rel
        d.mkdir(parents=True, exist_ok=True)
        (self.sys / "bus" / subsystem).mkdir(parents=True, exist_ok=True)
        if not (d / "subsystem").is_symlink():
            self._link(d / "subsystem", self.sys / "bus" / subsystem)
        self._write(d / "uevent", f"DEVTYPE={devtype}" if devtype else "")
        for key, value in attrs.items():
            self._write(d / key, value)
        return d

    def klass(self, cls: str, name: str, **attrs: str) -> None:
        """A class device's attributes (class/ata_port/ata1/port_no, class/sas_device/...)."""
        for key, value in attrs.items():
            self._write(self.sys / "class" / cls / name / key, value)

    def discover(self, state: SystemState | None = None) -> dict[str, Disk]:
        found = disks.discover(self.source, state=state or SystemState())
        return {d.name: d for d in found}


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path)


def zoo(fake: FakeSysfs) -> SystemState:
    """Every kind of block device the rules know, plus the running system on sdd."""
    fake.disk(
        "sda",
        8,
        0,
        size=480 * GiB,
        rotational=True,
        attrs={
            "device/model": "ST480  ",
            "device/vendor": "ATA     ",
            "device/wwid": "naa.5000c500a1b2c3d4",
            "device/vpd_pg80": b"\x00\x80\x00\x08ZA1B2C3D",
        },
        by_path="pci-0000:00:1f.2-ata-1",
    )
    fake.disk(
        "nvme0n1",
        259,
        0,
        size=960 * GiB,
        pbs=4096,
        attrs={
            "device/model": "Samsung SSD 980",
            "device/serial": "S64ANS0R123456",
            "wwid": "eui.0025385b71b0abcd",
        },
    )
    fake.disk("sr0", 11, 0, size=GiB, removable=True)
    fake.disk("loop0", 7, 0, size=10 * GiB)
    fake.disk("zram0", 252, 0, size=8 * GiB, lbs=4096)
    fake.disk("ram0", 1, 0, size=64 * 1024**2)
    fake.disk("md0", 9, 0, size=100 * GiB, slaves=["sdf1"])
    fake.disk("dm-0", 253, 0, size=100 * GiB, slaves=["sdg1"], attrs={"dm/name": "vg-lv"})
    fake.disk("fd0", 2, 0, size=1474560)
    fake.disk("sdb", 8, 16, size=200 * GiB, ro=True)
    fake.disk("sdc", 8, 32, size=0, removable=True)
    fake.disk("sdd", 8, 48, size=50 * GiB, partitions=2, attrs={"serial": "ROOTDISK"})
    fake.disk("sde", 8, 64, size=2 * GiB)
    fake.disk("sdf", 8, 80, size=300 * GiB, partitions=1, holders={"sdf1": ["md0"]})
    fake.disk("sdg", 8, 96, size=300 * GiB, partitions=1, holders={"sdg1": ["dm-0"]})
    fake.disk("sdh", 8, 112, size=300 * GiB, partitions=2)
    fake.disk("sdi", 8, 128, size=64 * GiB, removable=True)
    fake.disk("sdj", 8, 144, size=2000 * GiB, rotational=True, attrs={"device/model": "ST2000"})
    return SystemState(
        mounts=(
            Mount("/dev/root", "/", (8, 49)),  # /proc/mounts says /dev/root: found by dev number
            Mount("/dev/sdd2", "/boot"),
            Mount("/dev/sdh1", "/mnt/data"),
        ),
        swaps=(Mount("/dev/sdh2", "[swap]"),),
    )


# --- discovery rules on a fabricated tree -------------------------------------------------------


def test_discovery_rules_give_each_disk_a_verdict_and_a_reason(fake: FakeSysfs) -> None:
    found = fake.discover(zoo(fake))
    expected = {
        "sda": (True, "eligible"),
        "nvme0n1": (True, "eligible"),
        "sr0": (False, "optical"),
        "loop0": (False, "loop"),
        "zram0": (False, "zram"),
        "ram0": (False, "RAM disk"),
        "md0": (False, "software RAID"),
        "dm-0": (False, "device-mapper"),
        "fd0": (False, "floppy"),
        "sdb": (False, "read-only"),
        "sdc": (False, "zero size"),
        "sdd": (False, "holds the running system (/ is on /dev/root)"),
        "sde": (False, "smaller than 4 GiB"),
        "sdf": (False, "held by md0"),
        "sdg": (False, "held by dm-0"),
        "sdh": (False, "/dev/sdh1 mounted on /mnt/data"),
        "sdi": (False, "removable medium"),
        "sdj": (True, "eligible"),
    }
    assert set(found) == set(expected)
    for name, (eligible, reason) in expected.items():
        assert found[name].eligible is eligible, (name, found[name].reason)
        assert reason in found[name].reason, (name, found[name].reason)
    assert "active swap on /dev/sdh2" in found["sdh"].reason
    # natural order, the order a person reads
    order = [d.name for d in disks.discover(fake.source, state=SystemState())]
    assert order.index("sda") < order.index("sdb") < order.index("sdi")


def test_attributes_come_from_sysfs_without_udev(fake: FakeSysfs) -> None:
    found = fake.discover(zoo(fake))
    sda, nvme = found["sda"], found["nvme0n1"]
    assert (sda.path, sda.size, sda.model, sda.vendor) == (
        str(fake.dev / "sda"),
        480 * GiB,
        "ST480",
        "ATA",
    )
    assert sda.serial == "ZA1B2C3D"  # from the SCSI unit serial number VPD page
    assert (sda.wwn, sda.wwid) == ("0x5000c500a1b2c3d4", "naa.5000c500a1b2c3d4")
    assert sda.rotational and not sda.removable and not sda.read_only
    assert sda.by_path == str(fake.dev / "disk" / "by-path" / "pci-0000:00:1f.2-ata-1")
    assert (nvme.serial, nvme.wwn, nvme.model) == (
        "S64ANS0R123456",
        "eui.0025385b71b0abcd",
        "Samsung SSD 980",
    )
    assert (nvme.logical_sector_size, nvme.physical_sector_size) == (512, 4096)
    assert (nvme.major, nvme.minor, nvme.rotational) == (259, 0, False)
    assert found["zram0"].logical_sector_size == 4096
    assert found["sdd"].serial == "ROOTDISK"  # virtio-style block-level serial
    assert found["sdd"].partitions == ("sdd1", "sdd2")
    assert found["sdf"].holders == ("md0",)
    as_json = sda.to_json()
    assert {"name", "path", "size", "eligible", "reason"} <= set(as_json)
    assert as_json["size"] == 480 * GiB and as_json["eligible"] is True


def test_system_disk_found_through_dm_and_md_slaves(fake: FakeSysfs) -> None:
    fake.disk("sda", 8, 0, partitions=2)
    fake.disk("sdb", 8, 16, partitions=1)
    fake.disk("sdc", 8, 32, partitions=1)
    fake.disk("sdd", 8, 48)
    fake.disk("dm-0", 253, 0, slaves=["sda2"])  # LVM root on sda2
    fake.disk("md127", 9, 127, slaves=["sdb1", "sdc1"])  # RAID1 /boot on sdb1 + sdc1
    state = SystemState(
        mounts=(Mount("/dev/mapper/vg-root", "/", (253, 0)), Mount("/dev/md127", "/boot"))
    )
    found = fake.discover(state)
    for name in ("sda", "sdb", "sdc"):
        assert not found[name].eligible
        assert "holds the running system" in found[name].reason
    assert "/boot" in found["sdb"].reason and "/ is on" in found["sda"].reason
    assert found["sdd"].eligible
    assert disks.choose(list(found.values()))[0].name == "sdd"


@pytest.fixture
def mounted(loop, tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory: ``mounted("ext4")`` (a fresh loop disk) or ``mounted("tmpfs")`` -> a mount point
    under tmp_path, unmounted at teardown. Real block-backed and anonymous filesystems, whatever
    "/" and /tmp are on this machine."""
    points: list[Path] = []

    def mount(kind: str) -> Path:
        where = tmp_path / f"{kind}-{len(points)}"
        where.mkdir()
        if kind == "tmpfs":
            _run("mount", "-t", "tmpfs", "tmpfs", str(where))
        else:
            dev = loop(32 * 1024**2, name=f"{where.name}.img")
            _run("mkfs.ext4", "-q", "-F", dev)
            _run("mount", dev, str(where))
        points.append(where)
        return where

    yield mount
    for where in reversed(points):
        subprocess.run(["umount", str(where)], capture_output=True, timeout=60)


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_system_disk_found_through_a_loop_backing_file(fake: FakeSysfs, mounted, kind) -> None:
    """A live system: / is a squashfs on loop0 whose file sits on the "medium" disk. On a block
    filesystem the medium is found through the backing file; on tmpfs (a ramdisk, an overlay)
    there is no disk behind it and nothing is marked."""
    squashfs = mounted(kind) / "filesystem.squashfs"
    squashfs.write_bytes(b"hsqs")
    st_dev = os.stat(squashfs).st_dev
    assert (os.major(st_dev) == 0) == (kind == "tmpfs")
    fake.disk("medium", os.major(st_dev) or 8, os.minor(st_dev) if kind == "ext4" else 16)
    fake.disk("other", 8, 0)
    fake.disk("loop200", 7, 200, attrs={"loop/backing_file": str(squashfs)})
    system = disks.system_disks(SystemState(mounts=(Mount("/dev/loop200", "/"),)), fake.sys)
    if kind == "ext4":
        assert set(system) == {"loop200", "medium"}
        assert system["medium"] == "holds the running system (/ is on /dev/loop200)"
    else:
        assert set(system) == {"loop200"}


def test_nothing_eligible_says_so(fake: FakeSysfs) -> None:
    fake.disk("loop0", 7, 0)
    fake.disk("sda", 8, 0, ro=True)
    report = disks.disks_report(source=fake.source, state=SystemState())
    assert report["chosen"] is None
    assert report["reason"] == messages.NO_ELIGIBLE_DISK
    assert [d["name"] for d in report["disks"]] == ["sda", "loop0"]
    with pytest.raises(InstallError) as err:
        disks.select_target(None, {}, source=fake.source, state=SystemState())
    assert err.value.message == messages.NO_ELIGIBLE_DISK


def test_disks_report_shape(fake: FakeSysfs) -> None:
    state = zoo(fake)
    report = disks.disks_report(source=fake.source, state=state)
    assert set(report) == {"disks", "diskGroups", "chosen", "reason"}
    assert report["chosen"] == str(fake.dev / "nvme0n1")
    assert "default choice" in report["reason"]
    assert len(report["disks"]) == 18
    groups = [
        (g["id"], g["technology"], g["size"] // GiB, g["disks"]) for g in report["diskGroups"]
    ]
    assert groups == [
        (1, "NVMe", 960, [str(fake.dev / "nvme0n1")]),
        (2, "HDD", 480, [str(fake.dev / "sda")]),
        (3, "HDD", 2000, [str(fake.dev / "sdj")]),
    ]
    by_name = {d["name"]: d["diskGroupId"] for d in report["disks"]}
    assert (by_name["nvme0n1"], by_name["sdj"], by_name["sdi"], by_name["loop0"]) == (
        1,
        3,
        None,
        None,
    )
    hinted = disks.disks_report({"rotational": "true"}, source=fake.source, state=state)
    assert hinted["chosen"] == str(fake.dev / "sda")
    assert "rotational=true" in hinted["reason"] and hinted["hints"] == {"rotational": "true"}


# --- the default choice -------------------------------------------------------------------------


def make_disk(
    name: str, size_gib: int, *, rotational=False, removable=False, eligible=True, **kw
) -> Disk:
    fields = dict(
        name=name,
        path=f"/dev/{name}",
        size=size_gib * GiB,
        logical_sector_size=512,
        physical_sector_size=512,
        model=None,
        vendor=None,
        serial=None,
        wwn=None,
        rotational=rotational,
        removable=removable,
        read_only=False,
        by_path=None,
        eligible=eligible,
        reason="eligible" if eligible else "loop device",
    )
    fields.update(kw)
    return Disk(**fields)


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        # non-rotational beats a smaller rotational disk
        ([("sda", 500, True, False), ("nvme0n1", 1000, False, False)], "nvme0n1"),
        # non-removable beats a smaller non-rotational removable one
        ([("sdb", 16, False, True), ("sda", 2000, True, False)], "sda"),
        # smallest among equals (OS disk vs data disk)
        ([("nvme1n1", 3840, False, False), ("nvme0n1", 480, False, False)], "nvme0n1"),
        # identical twins: natural name order, nvme2 before nvme10, sdb before sdaa
        ([("nvme10n1", 960, False, False), ("nvme2n1", 960, False, False)], "nvme2n1"),
        ([("sdaa", 960, False, False), ("sdb", 960, False, False)], "sdb"),
    ],
)
def test_default_choice_is_deterministic(pool, expected) -> None:
    candidates = [make_disk(n, s, rotational=r, removable=rm) for n, s, r, rm in pool]
    candidates.append(make_disk("loop0", 1, eligible=False))
    rng = random.Random(4)
    for _ in range(6):
        rng.shuffle(candidates)
        chosen, why = disks.choose(candidates)
        assert chosen.name == expected
        assert "default choice" in why


def test_select_target_default_on_fabricated_tree(fake: FakeSysfs) -> None:
    target = disks.select_target(None, {}, source=fake.source, state=zoo(fake))
    assert target.name == "nvme0n1"
    assert "smallest non-removable non-rotational" in target.reason


# --- hints --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hints", "expected"),
    [
        ({"name": "sda"}, "sda"),
        ({"name": "/dev/sdj"}, "sdj"),
        ({"serial": "za1b2c3d"}, "sda"),
        ({"serial": "S64ANS0R123456"}, "nvme0n1"),
        ({"wwn": "0x5000C500A1B2C3D4"}, "sda"),  # udev style vs sysfs naa. style
        ({"wwn": "eui.0025385b71b0abcd"}, "nvme0n1"),
        ({"model": "samsung  ssd 980"}, "nvme0n1"),
        ({"vendor": "ata"}, "sda"),
        ({"size": "480"}, "sda"),
        ({"size": ">=900"}, "nvme0n1"),
        ({"size": ">1000"}, "sdj"),
        ({"rotational": "true"}, "sda"),
        ({"rotational": "0"}, "nvme0n1"),  # several match: the default order decides
        ({"by_path": "pci-0000:00:1f.2-ata-1"}, "sda"),
        ({"rotational": "true", "size": "2000"}, "sdj"),
        ({"wwid": "NAA.5000c500a1b2c3d4"}, "sda"),
        ({"vendor": "ATA", "size": ">=400", "rotational": "yes"}, "sda"),
    ],
)
def test_hints_select(fake: FakeSysfs, hints, expected) -> None:
    state = zoo(fake)
    target = disks.select_target(None, hints, source=fake.source, state=state)
    assert target.name == expected
    assert "matches the root device hints" in target.reason


@pytest.mark.parametrize(
    "hints", [{"serial": "nope"}, {"size": "481"}, {"vendor": "ATA", "rotational": "false"}]
)
def test_hints_matching_nothing(fake: FakeSysfs, hints) -> None:
    state = zoo(fake)
    with pytest.raises(InstallError) as err:
        disks.select_target(None, hints, source=fake.source, state=state)
    assert err.value.message == messages.no_disk_matches_hints(disks.format_hints(hints))


def test_hint_matching_only_an_ineligible_disk_says_why(fake: FakeSysfs) -> None:
    state = zoo(fake)
    with pytest.raises(InstallError) as err:
        disks.select_target(None, {"serial": "ROOTDISK"}, source=fake.source, state=state)
    assert err.value.message.startswith(f"Target disk {fake.dev / 'sdd'} cannot be used: holds")
    with pytest.raises(InstallError) as err:  # a hint never makes removable media eligible
        disks.select_target(None, {"name": "sdi"}, source=fake.source, state=state)
    assert err.value.message.startswith(f"Target disk {fake.dev / 'sdi'} cannot be used: remov")


def test_parse_hints() -> None:
    assert disks.parse_hints(["name=sda", "size=>=100", " Rotational = false", "by-path=x"]) == {
        "name": "sda",
        "size": ">=100",
        "rotational": "false",
        "by_path": "x",
    }
    assert disks.parse_hints([]) == {}
    for bad, why in [
        ("colour=blue", "unknown key"),
        ("name", "expected KEY=VALUE"),
        ("=sda", "expected KEY=VALUE"),
        ("serial=", "empty value"),
        ("size=big", "size is a whole number"),
        ("size=1.5", "size is a whole number"),
        ("rotational=maybe", "rotational is true or false"),
    ]:
        with pytest.raises(InstallError) as err:
            disks.parse_hints([bad])
        assert err.value.message == messages.bad_hint(bad, err.value.message.split(": ", 1)[1][:-1])
        assert why in err.value.message, bad
    with pytest.raises(InstallError, match="given twice"):
        disks.parse_hints(["name=sda", "name=sdb"])


# --- busy checks, rules only (fabricated tree) --------------------------------------------------


def test_busy_reasons_on_fabricated_tree(fake: FakeSysfs) -> None:
    state = zoo(fake)
    found = fake.discover(state)
    assert disks.busy_reasons(found["sda"], source=fake.source, state=state) == []
    sdh = disks.busy_reasons(found["sdh"], source=fake.source, state=state)
    assert sdh == ["/dev/sdh1 mounted on /mnt/data", "active swap on /dev/sdh2"]
    with pytest.raises(InstallError) as err:
        disks.check_not_busy(found["sdf"], source=fake.source, state=state)
    assert err.value.message == messages.disk_busy(
        str(fake.dev / "sdf"), "held by md0 (LVM, RAID or dm)"
    )


def test_natural_key() -> None:
    names = ["sdaa", "nvme10n1", "sdb", "sda", "nvme2n1", "vda"]
    assert sorted(names, key=disks.natural_key) == [
        "sda",
        "sdb",
        "vda",
        "sdaa",
        "nvme2n1",
        "nvme10n1",
    ]


# --- the real machine and real loop devices -----------------------------------------------------


def test_real_discovery_never_offers_the_root_disk_or_loops() -> None:
    found = disks.discover()
    root_dev = os.stat("/").st_dev
    for disk in found:
        if (disk.major, disk.minor) == (os.major(root_dev), os.minor(root_dev)):
            assert not disk.eligible and "holds the running system" in disk.reason
        if disk.name.startswith(("loop", "zram")):
            assert not disk.eligible


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_root_disk_found_when_its_mount_is_not_listed(monkeypatch, mounted, kind) -> None:
    """In a chroot the mount holding "/" is invisible in /proc/mounts: the device that "/"
    lives on still marks its disk as the running system's (seen in a debootstrap chroot). A
    root on tmpfs or overlay (containers, the rescue ramdisk) has no disk and marks none."""
    root = mounted(kind)
    (root / "boot").mkdir()
    monkeypatch.setattr(disks.psutil, "disk_partitions", lambda all=True: [])
    state = disks.read_system_state(root=root)
    found = disks.system_disks(state)
    st_dev = os.stat(root).st_dev
    if kind == "tmpfs":
        assert [m for m in state.mounts if m.where in ("/", "/boot")] == []
        assert found == {}
        return
    devno = (os.major(st_dev), os.minor(st_dev))
    assert {m.where: m.devno for m in state.mounts if m.where in ("/", "/boot")} == {
        "/": devno,
        "/boot": devno,
    }
    loop_name = disks._name_from_devno(devno, disks.REAL_SYSFS)
    # the loop disk, and the disk its backing file is on when /tmp is on one
    assert loop_name in found and set(found) == disks.whole_disks(loop_name)
    assert found[loop_name].startswith("holds the running system (/ is on block device")


def test_running_system_state_whatever_root_is() -> None:
    """The real "/" may be a disk, an overlay or a tmpfs: reading the state never fails, and
    it marks "/" exactly when "/" is on a block device."""
    state = disks.read_system_state()
    root = os.stat("/").st_dev
    with_devno = {m.devno for m in state.mounts if m.where == "/" and m.devno}
    if os.major(root) == 0:  # overlay, tmpfs, ramdisk: no disk to protect, none invented
        assert with_devno == set()
    else:
        assert (os.major(root), os.minor(root)) in with_devno
    assert all("holds the running system" in why for why in disks.system_disks(state).values())


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def partitioned_loop(loop) -> Iterator[str]:
    """A loop disk with two MBR partitions whose nodes exist (partx -a), removed at teardown."""
    dev = loop(64 * 1024**2)
    subprocess.run(
        ["sfdisk", "-q", dev],
        input="start=2048, size=40960\nstart=43008\n",
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )
    _run("partx", "-a", dev)
    yield dev
    subprocess.run(["partx", "-d", dev], capture_output=True, timeout=60)


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("sector", [512, 4096])
def test_explicit_loop_disk_is_accepted(loop, sector) -> None:
    dev = loop(32 * 1024**2, sector_size=sector)
    disk = disks.select_target(dev, {"serial": "ignored when --disk is given"})
    assert (disk.path, disk.size, disk.logical_sector_size) == (dev, 32 * 1024**2, sector)
    assert disk.eligible and disk.name == os.path.basename(dev)
    # discovery itself never offers it
    assert not {d.name: d for d in disks.discover()}[disk.name].eligible


@pytest.fixture
def readonly_loop(loop) -> Iterator[str]:
    """A loop disk set read-only, set back read-write at teardown whatever the test did: the
    flag outlives ``losetup -d`` and would break the next user of that loop number."""
    dev = loop(8 * 1024**2, name="ro.img")
    try:
        _run("blockdev", "--setro", dev)
        yield dev
    finally:
        subprocess.run(["blockdev", "--setrw", dev], capture_output=True, timeout=60)


@pytest.mark.root
@needs_root
def test_explicit_refusals(loop, partitioned_loop, readonly_loop, tmp_path) -> None:
    regular = tmp_path / "file.img"
    regular.write_bytes(bytes(4096))
    cases = {
        str(regular): "not a block device",
        str(tmp_path / "missing"): "no such device",
        partitioned_loop + "p1": f"is a partition; name the whole disk ({partitioned_loop[5:]})",
        loop(0, name="empty.img"): "zero size",
        readonly_loop: "read-only",
    }
    # The root disk, when "/" is on one: refused from sysfs and /proc/mounts alone, never opened.
    root = disks._name_from_devno(disks._devno(os.stat("/").st_dev), disks.REAL_SYSFS)
    if root is not None:
        cases[f"/dev/{root}"] = "holds the running system"
    for device, reason in cases.items():
        with pytest.raises(InstallError) as err:
            disks.select_target(device, {})
        assert err.value.message.startswith("Target disk "), device
        assert "cannot be used" in err.value.message and reason in err.value.message, device


@pytest.mark.root
@needs_root
def test_busy_mounted_whole_disk(loop, tmp_path) -> None:
    dev = loop(32 * 1024**2)
    _run("mkfs.ext4", "-q", "-F", dev)
    disk = disks.explicit_disk(dev)
    disks.check_not_busy(disk)  # not yet mounted: fine
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("mount", dev, str(mnt))
    try:
        with pytest.raises(InstallError) as err:
            disks.check_not_busy(disk)
        assert err.value.message == messages.disk_busy(dev, f"{dev} mounted on {mnt}")
        with pytest.raises(InstallError, match="is busy"):
            disks.select_target(dev, {})
    finally:
        _run("umount", str(mnt))
    disks.check_not_busy(disk)


@pytest.mark.root
@needs_root
def test_busy_mounted_partition_and_swap(partitioned_loop, tmp_path) -> None:
    dev = partitioned_loop
    disk = disks.explicit_disk(dev)
    assert disk.partitions == (f"{dev[5:]}p1", f"{dev[5:]}p2")
    _run("mkswap", dev + "p1")
    _run("mkfs.ext4", "-q", "-F", dev + "p2")
    disks.check_not_busy(disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("swapon", dev + "p1")
    try:
        with pytest.raises(InstallError) as err:
            disks.check_not_busy(disk)
        assert f"active swap on {dev}p1" in err.value.message
        _run("mount", dev + "p2", str(mnt))
        try:
            with pytest.raises(InstallError) as err:
                disks.check_not_busy(disk)
            assert f"{dev}p2 mounted on {mnt}" in err.value.message
            assert f"active swap on {dev}p1" in err.value.message
        finally:
            _run("umount", str(mnt))
    finally:
        _run("swapoff", dev + "p1")
    disks.check_not_busy(disk)


@pytest.mark.root
@needs_root
def test_busy_exclusively_opened_by_another_process(loop) -> None:
    dev = loop(8 * 1024**2)
    disk = disks.explicit_disk(dev)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
            dev,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InstallError) as err:
            disks.check_not_busy(disk)
        assert err.value.message.startswith(
            messages.disk_busy(dev, f"opened exclusively by pid {holder.pid} (python")[:-1]
        )
    finally:
        holder.kill()
        holder.wait(timeout=30)
    disks.check_not_busy(disk)


# --- real server hardware on a fabricated tree: NVMe, SATA, ATAPI, SCSI, SAS, USB, virtio --------


def identify_words(serial: str, model: str, wwn: int | None = None) -> str:
    """libata's ``id`` attribute: 256 IDENTIFY words in hex, 8 per line, strings byte-swapped."""
    words = [0] * 256

    def put(text: str, first: int, count: int) -> None:
        raw = text.ljust(count * 2).encode()
        for i in range(count):
            words[first + i] = raw[2 * i] << 8 | raw[2 * i + 1]

    put(serial, 10, 10)
    put(model, 27, 20)
    if wwn is not None:
        words[87] |= 0x0100
        for i in range(4):
            words[108 + i] = (wwn >> (48 - 16 * i)) & 0xFFFF
    lines = [" ".join(f"{w:04x}" for w in words[i : i + 8]) for i in range(0, 256, 8)]
    return "\n".join(lines)


PCI = "pci0000:00"


def sata(fake: FakeSysfs, port: int, host: int, name: str, minor: int, **kw) -> None:
    """A disk (or ATAPI drive, ``sr``) on AHCI port ``port`` of 0000:00:1f.2."""
    identify = kw.pop("identify")
    fake.device(f"{PCI}/0000:00:1f.2", "pci")
    ata = f"{PCI}/0000:00:1f.2/ata{port}"
    fake.klass("ata_port", f"ata{port}", port_no=str(port))
    idfile = fake.sys / "devices" / ata / f"link{port}/dev{port}.0/ata_device/dev{port}.0/id"
    fake._write(idfile, identify)
    fake.device(f"{ata}/host{host}", "scsi", "scsi_host")
    fake.device(f"{ata}/host{host}/target{host}:0:0", "scsi", "scsi_target")
    scsi = f"{ata}/host{host}/target{host}:0:0/{host}:0:0:0"
    fake.device(scsi, "scsi", "scsi_device", model="QEMU HARDDISK", vendor="ATA")
    major = 11 if name.startswith("sr") else 8
    fake.disk(name, major, minor, parent=f"{scsi}/block", rotational=True, **kw)


def server(fake: FakeSysfs) -> None:
    """The mixed VM of issue 14 as its sysfs looks, plus a SAS disk and a virtio-blk disk."""
    nvme = f"{PCI}/0000:00:05.0/nvme/nvme0"
    fake.device(f"{PCI}/0000:00:05.0", "pci")
    fake.device(nvme, "nvme", serial="NVME0001", model="QEMU NVMe Ctrl")
    fake.disk(
        "nvme0n1", 259, 0, size=20 * GiB, parent=nvme, attrs={"nsid": "1", "wwid": "nvme.1b36-4e"}
    )
    t10 = "t10.ATA     QEMU HARDDISK                           QM00001"
    for port, name in ((1, "sda"), (2, "sdb")):
        wwn = 0x5000C500A1B2C3D0 + port if port == 1 else None
        words = identify_words(f"SATA000{port}", "QEMU HARDDISK", wwn)
        sata(fake, port, port - 1, name, 16 * (port - 1), size=40 * GiB, identify=words,
             attrs={"device/wwid": t10})  # fmt: skip
    sata(fake, 3, 2, "sr0", 0, size=GiB, removable=True,
         identify=identify_words("CDROM0003", "QEMU DVD-ROM"))  # fmt: skip
    # virtio-scsi: host 3 is the controller's only host, so udev numbers it 0
    vs = f"{PCI}/0000:00:06.0/virtio2/host3/target3:0:1/3:0:1:0"
    fake.device(f"{PCI}/0000:00:06.0", "pci")
    fake.device(f"{PCI}/0000:00:06.0/virtio2", "virtio")
    fake.device(f"{PCI}/0000:00:06.0/virtio2/host3", "scsi", "scsi_host")
    fake.device(vs, "scsi", "scsi_device", model="QEMU HARDDISK", vendor="QEMU")
    fake.disk("sdc", 8, 32, size=30 * GiB, rotational=True, parent=f"{vs}/block",
              attrs={"device/vpd_pg80": b"\x00\x80\x00\x07SCSI003"})  # fmt: skip
    # a USB stick on xhci port 1 (QEMU's usb-storage is not "removable" by default)
    usb = f"{PCI}/0000:00:07.0/usb2/2-1"
    fake.device(f"{PCI}/0000:00:07.0", "pci")
    fake.device(f"{PCI}/0000:00:07.0/usb2", "usb", "usb_device")
    fake.device(usb, "usb", "usb_device", serial="USBSTICK7")
    fake.device(f"{usb}/2-1:1.0", "usb", "usb_interface")
    fake.device(f"{usb}/2-1:1.0/host4", "scsi", "scsi_host")
    stick = f"{usb}/2-1:1.0/host4/target4:0:0/4:0:0:0"
    fake.device(stick, "scsi", "scsi_device", model="QEMU HARDDISK", vendor="QEMU")
    fake.disk("sdd", 8, 48, size=8 * GiB, rotational=True, parent=f"{stick}/block")
    # a SAS disk on phy 2 of an HBA (no expander)
    sas = f"{PCI}/0000:00:09.0/host5/port-5:0/end_device-5:0/target5:0:0/5:0:0:0"
    fake.device(f"{PCI}/0000:00:09.0", "pci")
    fake.device(f"{PCI}/0000:00:09.0/host5", "scsi", "scsi_host")
    fake.device(sas.rsplit("/", 1)[0], "scsi", "scsi_target")
    fake.device(sas, "scsi", "scsi_device", model="ST4000NM", vendor="SEAGATE")
    fake.klass("sas_port", "port-5:0", num_phys="1")
    fake.klass("sas_device", "end_device-5:0", phy_identifier="2", sas_address="0x5000c5")
    fake.disk("sde", 8, 64, size=4000 * GiB, rotational=True, parent=f"{sas}/block",
              attrs={"device/wwid": "naa.5000c500deadbeef"})  # fmt: skip
    fake.device(f"{PCI}/0000:00:08.0", "pci")
    fake.device(f"{PCI}/0000:00:08.0/virtio3", "virtio")
    fake.disk("vda", 254, 0, size=50 * GiB, rotational=True, attrs={"serial": "VIRTIO8"},
              parent=f"{PCI}/0000:00:08.0/virtio3/block")  # fmt: skip


def test_by_path_transport_serial_and_wwn_of_each_kind(fake: FakeSysfs) -> None:
    server(fake)
    found = fake.discover()
    byp = fake.dev / "disk" / "by-path"
    expected = {
        "nvme0n1": ("pci-0000:00:05.0-nvme-1", "nvme", "NVME0001", None, "nvme.1b36-4e"),
        "sda": ("pci-0000:00:1f.2-ata-1.0", "sata", "SATA0001", "0x5000c500a1b2c3d1", None),
        "sdb": ("pci-0000:00:1f.2-ata-2.0", "sata", "SATA0002", None, None),
        "sr0": ("pci-0000:00:1f.2-ata-3.0", "sata", "CDROM0003", None, None),
        "sdc": ("pci-0000:00:06.0-scsi-0:0:1:0", "scsi", "SCSI003", None, None),
        "sdd": ("pci-0000:00:07.0-usb-0:1:1.0-scsi-0:0:0:0", "usb", "USBSTICK7", None, None),
        "sde": ("pci-0000:00:09.0-sas-phy2-lun-0", "sas", None, "0x5000c500deadbeef", None),
        "vda": ("pci-0000:00:08.0", "virtio", "VIRTIO8", None, None),
    }
    for name, (path_id, transport, serial, wwn, wwid) in expected.items():
        disk = found[name]
        assert disk.by_path == str(byp / path_id), name
        assert (disk.transport, disk.serial, disk.wwn) == (transport, serial, wwn), name
        if wwid:
            assert disk.wwid == wwid
    # the t10 vendor string is reported as the wwid it is, never as a WWN
    assert found["sdb"].wwid.startswith("t10.ATA") and found["sdb"].wwn is None
    assert found["sde"].wwid == "naa.5000c500deadbeef"
    assert found["sda"].by_path_aliases == (str(byp / "pci-0000:00:1f.2-ata-1"),)
    assert found["vda"].by_path_aliases == (str(byp / "virtio-pci-0000:00:08.0"),)
    assert (found["sr0"].eligible, found["sr0"].reason) == (False, "optical drive")
    assert not found["sdd"].eligible and found["sdd"].reason.startswith("USB-attached")


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        ("pci-0000:00:1f.2-ata-2.0", "sdb"),
        ("pci-0000:00:1f.2-ata-1", "sda"),  # udev's compat link
        ("/dev/disk/by-path/pci-0000:00:06.0-scsi-0:0:1:0", "sdc"),
        ("pci-0000:00:05.0-nvme-1", "nvme0n1"),
        ("virtio-pci-0000:00:08.0", "vda"),
        ("pci-0000:00:09.0-sas-phy2-lun-0", "sde"),
    ],
)
def test_by_path_hint_matches_without_udev(fake: FakeSysfs, hint: str, expected: str) -> None:
    server(fake)
    hint = hint.replace("/dev/", f"{fake.dev}/")
    target = disks.select_target(None, {"by_path": hint}, source=fake.source, state=SystemState())
    assert target.name == expected


def test_removable_and_usb_media_only_by_name(fake: FakeSysfs) -> None:
    server(fake)
    with pytest.raises(InstallError, match="USB-attached"):
        disks.select_target(None, {"serial": "USBSTICK7"}, source=fake.source, state=SystemState())
    # nothing but a stick and a CD: nothing eligible, never the stick
    only = FakeSysfs(fake.sys.parent / "only")
    only.disk("sda", 8, 0, size=16 * GiB, removable=True)
    only.disk("sr0", 11, 0, size=GiB, removable=True)
    with pytest.raises(InstallError) as err:
        disks.select_target(None, {}, source=only.source, state=SystemState())
    assert err.value.message == messages.NO_ELIGIBLE_DISK


@pytest.mark.root
@needs_root
def test_removable_and_usb_media_named_with_disk(fake: FakeSysfs) -> None:
    """--disk names them: the kind rules give way (real block nodes for the fabricated disks)."""
    server(fake)
    for device, major, minor in (("sdd", 8, 48), ("sr0", 11, 0)):
        (fake.dev / device).unlink()
        os.mknod(fake.dev / device, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        disk = disks.explicit_disk(str(fake.dev / device), fake.source, state=SystemState())
        assert (disk.name, disk.eligible, disk.reason) == (device, True, "named explicitly")
    # --disk wins over hints and disk groups
    named = disks.select_target(
        str(fake.dev / "sdd"),
        {"serial": "SATA0002"},
        group=3,
        source=fake.source,
        state=SystemState(),
    )
    assert named.name == "sdd"


def test_disk_groups_numbered_from_the_default_choice(fake: FakeSysfs) -> None:
    server(fake)
    report = disks.disks_report(source=fake.source, state=SystemState())
    dev = fake.dev
    rows = [
        (g["id"], g["technology"], g["size"] // GiB, g["count"], g["disks"])
        for g in report["diskGroups"]
    ]  # noqa: E501
    assert rows == [
        (1, "NVMe", 20, 1, [f"{dev}/nvme0n1"]),
        (2, "HDD", 30, 1, [f"{dev}/sdc"]),
        (3, "HDD", 40, 2, [f"{dev}/sda", f"{dev}/sdb"]),
        (4, "HDD", 50, 1, [f"{dev}/vda"]),
        (5, "HDD", 4000, 1, [f"{dev}/sde"]),
    ]  # fmt: skip
    assert report["chosen"] == f"{dev}/nvme0n1"
    assert report["diskGroups"][2]["model"] == "QEMU HARDDISK"
    pick = {}
    for group in (1, 3, 5):
        pick[group] = disks.select_target(
            None, {}, group=group, source=fake.source, state=SystemState()
        )
    assert {g: d.name for g, d in pick.items()} == {1: "nvme0n1", 3: "sda", 5: "sde"}
    assert pick[3].reason == "first disk of disk group 3 (2 x HDD 40 GiB QEMU HARDDISK)"
    with pytest.raises(InstallError) as err:
        disks.select_target(None, {}, group=9, source=fake.source, state=SystemState())
    assert err.value.message.startswith("Disk group 9 does not exist on this server")
    assert "3: 2 x HDD 40 GiB QEMU HARDDISK" in err.value.message
    # hints and --disk win over the group
    hinted = disks.select_target(
        None, {"serial": "SATA0002"}, group=1, source=fake.source, state=SystemState()
    )
    assert hinted.name == "sdb"


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        # 2 x NVMe 512 + 2 x HDD 4000: the default (NVMe) is group 1
        ([("nvme1n1", 512, 0), ("nvme0n1", 512, 0), ("sda", 4000, 1), ("sdb", 4000, 1)],
         [["nvme0n1", "nvme1n1"], ["sda", "sdb"]]),
        # the default (smallest SSD) comes first even though NVMe is faster
        ([("nvme0n1", 960, 0), ("sda", 240, 0), ("sdb", 2000, 1), ("sdc", 480, 0)],
         [["sda"], ["nvme0n1"], ["sdc"], ["sdb"]]),
        # same size, different model: two groups, ordered by the first name
        ([("sdb", 100, 1, "B"), ("sda", 100, 1, "A"), ("sdc", 100, 1, "A")],
         [["sda", "sdc"], ["sdb"]]),
    ],
)  # fmt: skip
def test_disk_group_order(sizes, expected) -> None:
    pool = [
        make_disk(n, size, rotational=bool(rot), model=(rest[0] if rest else None),
                  transport="nvme" if n.startswith("nvme") else "sata")
        for n, size, rot, *rest in sizes
    ]  # fmt: skip
    for _ in range(3):
        random.Random(7).shuffle(pool)
        groups = disks.disk_groups(pool)
        assert [[d.name for d in g.disks] for g in groups] == expected
        assert [g.id for g in groups] == list(range(1, len(expected) + 1))


def test_partition_names_per_kind() -> None:
    assert [disks.partition_name(n, 1) for n in ("nvme0n1", "sda", "vda", "mmcblk0", "loop3")] == [
        "nvme0n1p1",
        "sda1",
        "vda1",
        "mmcblk0p1",
        "loop3p1",
    ]


# --- the source is injected: udev properties on a fabricated tree, pyudev on the real one -------


def test_udev_properties_win_over_sysfs(fake: FakeSysfs) -> None:
    server(fake)
    udev = {
        "sdb": {
            "ID_SERIAL_SHORT": "FROM-UDEV",
            "ID_PATH": "pci-0000:00:1f.2-ata-2.0",
            "ID_WWN": "0x5000aaaa",
            "ID_MODEL": "Udev_Model",
            "DEVNAME": "/dev/sdb",
        }
    }
    source = DiskSource(fake.sys, fake.dev, udev=lambda: udev)
    sdb = {d.name: d for d in disks.discover(source, state=SystemState())}["sdb"]
    assert (sdb.serial, sdb.wwn, sdb.model, sdb.path) == (
        "FROM-UDEV",
        "0x5000aaaa",
        "Udev_Model",
        "/dev/sdb",
    )

    def broken() -> dict:
        raise OSError("libudev.so.1: cannot open shared object file")

    fallback = {d.name: d for d in disks.discover(DiskSource(fake.sys, fake.dev, udev=broken))}
    assert fallback["sdb"].serial == "SATA0002"


def test_pyudev_and_sysfs_agree_on_the_running_system() -> None:
    pytest.importorskip("pyudev")
    with_udev = disks.discover(disks.RUNNING)
    without = disks.discover(DiskSource(live=True))
    assert [d.name for d in with_udev] == [d.name for d in without]
    assert {d.name: d.eligible for d in with_udev} == {d.name: d.eligible for d in without}
    assert set(disks.udev_database()) <= {d.name for d in without}


# --- diskGroupId through the install pipeline --------------------------------------------------


def test_unknown_disk_group_refused_before_download(tmp_path: Path) -> None:
    """``details.diskGroupId`` reaches the disk step, which refuses an unknown group before the
    image is requested (a real HTTP server on 127.0.0.1 counts the requests)."""
    import http.server
    import json
    import threading

    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/image.raw"
    body = {
        "templateName": "byoi_64",
        "details": {"diskGroupId": 99},
        "userMetadata": [{"key": "imageURL", "value": url}, {"key": "imageType", "value": "raw"}],
    }
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps(body))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "install", "--payload", str(payload), "--json"]
            + ["--workdir", str(tmp_path / "work")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parent.parent,
        )
    finally:
        server.shutdown()
        server.server_close()
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and result["step"] == "disk", proc.stderr
    assert result["message"].startswith("Disk group 99 does not exist on this server")
    assert requests == []

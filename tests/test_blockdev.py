"""Sizes, sector sizes, stale-metadata wiping and partition re-reads on real loop devices."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import blockdev, disks
from tests.conftest import needs_root
from tests.test_layout import install

MiB = 1024**2


def _run(*args: str, input: str | None = None) -> str:
    return subprocess.run(
        args, input=input, check=True, capture_output=True, text=True, timeout=60
    ).stdout


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _signatures(path: str) -> list[str]:
    """What libblkid's wipefs finds on the whole device (types only)."""
    out = _run("wipefs", "--json", path)
    return sorted(s["type"] for s in json.loads(out)["signatures"]) if out.strip() else []


def _probe_at(path: str, offset: int) -> str:
    """blkid's low-level probe of a filesystem/raid signature at an offset ("" when none)."""
    proc = subprocess.run(
        ["blkid", "-p", "-O", str(offset), "-o", "export", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout


# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("sector", [512, 4096])
def test_wipe_regions_cover_both_ends_of_disk_and_partitions(sector: int) -> None:
    size = 64 * MiB
    regions = blockdev.wipe_regions(size, sector, [(1 * MiB, 8 * MiB), (40 * MiB, 100)])
    assert regions == [
        (0, 2 * MiB),  # head + start of partition 1, merged
        (8 * MiB, MiB),  # end of partition 1
        (40 * MiB, sector),  # a tiny partition, rounded out to whole sectors
        (63 * MiB, MiB),  # tail: backup GPT header and entries
    ]
    for offset, length in regions:
        assert offset % sector == 0 and length % sector == 0


def test_wipe_regions_small_disk_and_clipping() -> None:
    assert blockdev.wipe_regions(MiB // 2, 512) == [(0, MiB // 2)]
    # partitions that claim to go past the end (a table copied from a bigger disk) are clipped
    assert blockdev.wipe_regions(4 * MiB, 512, [(3 * MiB, 10 * MiB)]) == [
        (0, MiB),
        (3 * MiB, MiB),
    ]


def test_alternate_gpt_regions_from_a_real_header(tmp_path: Path) -> None:
    """A 16 MiB GPT image written onto a 64 MiB disk: its backup GPT is mid-disk."""
    image = tmp_path / "old.img"
    image.write_bytes(bytes(16 * MiB))
    _run("sgdisk", "-o", str(image))
    head = image.read_bytes()[:8192]
    assert blockdev.alternate_gpt_regions(head, 64 * MiB) == [(15 * MiB, MiB)]
    assert blockdev.alternate_gpt_regions(bytes(8192), 64 * MiB) == []
    # an AlternateLBA beyond the device (a table from a bigger disk) is ignored
    assert blockdev.alternate_gpt_regions(head, 8 * MiB) == []


def test_sizes_of_a_regular_file(tmp_path: Path) -> None:
    image = tmp_path / "f.img"
    image.write_bytes(bytes(3 * MiB + 512))
    assert blockdev.size_bytes(image) == 3 * MiB + 512
    assert blockdev.logical_sector_size(image) == 512
    assert blockdev.physical_sector_size(image) == 512
    blockdev.reread_partition_table(str(image))  # not a block device: nothing to do


# --- real loop devices --------------------------------------------------------------------------


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("sector", [512, 4096])
def test_sizes_of_loop_devices(loop, sector: int) -> None:
    dev = loop(24 * MiB, sector_size=sector)
    assert blockdev.size_bytes(dev) == 24 * MiB
    assert blockdev.logical_sector_size(dev) == sector
    assert blockdev.physical_sector_size(dev) == sector
    assert disks.explicit_disk(dev).logical_sector_size == sector


def _kernel_partitions(dev: str) -> list[str]:
    name = os.path.basename(dev)
    return sorted(p.name for p in Path("/sys/block", name).iterdir() if p.name.startswith(name))


@pytest.mark.root
@needs_root
def test_reread_partition_table_on_a_loop_device(loop) -> None:
    dev = loop(32 * MiB)
    name = os.path.basename(dev)
    assert _kernel_partitions(dev) == []
    _run(
        "sfdisk", "-q", "--no-reread", dev, input="label: dos\nstart=2048, size=8192\nstart=10240\n"
    )
    blockdev.reread_partition_table(dev)
    assert _kernel_partitions(dev) == [f"{name}p1", f"{name}p2"]
    _run("sfdisk", "-q", "--no-reread", "--delete", dev, "2")
    blockdev.reread_partition_table(dev)
    assert _kernel_partitions(dev) == [f"{name}p1"]
    _run("wipefs", "--all", "--force", "--no-act", dev)  # read-only sanity: the tool sees the disk
    with open(dev, "r+b") as f:  # no table at all: the kernel must forget the partitions
        f.write(bytes(MiB))
    blockdev.reread_partition_table(dev)
    assert _kernel_partitions(dev) == []


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("nodes", [True, False], ids=["with-nodes", "no-nodes"])
def test_stale_gpt_then_mbr_image_leaves_nothing_old(loop, tmp_path, sector, nodes) -> None:
    """Old GPT + swap + ext4 (to the disk's last usable sector), then an MBR image.

    ``no-nodes``: the kernel has no partition nodes (as on kernels without the partition
    parsers), so the old signatures inside partitions can only be found through the table.
    """
    size = 64 * MiB
    dev = loop(size, sector_size=sector)
    name = os.path.basename(dev)
    _run("sgdisk", "-o", "-n", "1:0:+8M", "-n", "2:0:+16M", "-n", "3:0:0", dev)
    _run("partx", "-a", dev)
    _run("mkswap", f"{dev}p1")
    _run("mkfs.ext4", "-q", "-F", f"{dev}p2")
    _run("mkfs.ext4", "-q", "-F", f"{dev}p3")  # its end is the disk's last usable sectors
    if not nodes:
        _run("partx", "-d", dev)
    table = json.loads(_run("sfdisk", "--json", dev))["partitiontable"]
    parts = [(p["start"] * sector, p["size"] * sector) for p in table["partitions"]]
    assert len(parts) == 3
    before = _read_all(dev)
    assert before.count(b"EFI PART") == 2  # primary + backup: the check below can fail
    assert b"SWAPSPACE2" in before
    assert "TYPE=ext4" in _probe_at(dev, parts[1][0])
    assert "TYPE=ext4" in _probe_at(dev, parts[2][0])

    image = tmp_path / "mbr.img"
    image.write_bytes(bytes(4 * MiB))
    _run("sfdisk", "-q", str(image), input="label: dos\nstart=2048, size=4096, type=83\n")
    install(image, dev, _drive(tmp_path, sector))
    assert _kernel_partitions(dev) in ([], [f"{name}p1", f"{name}p2"])  # old nodes are gone

    after = _read_all(dev)
    assert len(after) == size
    assert b"EFI PART" not in after
    assert b"SWAPSPACE2" not in after
    assert _signatures(dev) == ["dos"]
    for offset, _ in parts:
        if offset != 4 * MiB and offset < 48 * MiB:  # not the new config drive's place
            assert "TYPE=" not in _probe_at(dev, offset), offset
    assert _run("blkid", "-p", "-o", "export", dev).strip().endswith("PTTYPE=dos")
    assert name  # the same device throughout


@pytest.mark.root
@needs_root
def test_wipe_finds_a_backup_gpt_left_mid_disk(loop, tmp_path) -> None:
    """An earlier 16 MiB GPT image never moved its backup: it sits at 16 MiB on a 64 MiB disk."""
    dev = loop(64 * MiB)
    old = tmp_path / "old.img"
    old.write_bytes(bytes(16 * MiB))
    _run("sgdisk", "-o", "-n", "1:0:0", str(old))
    with open(dev, "r+b") as f:
        f.write(old.read_bytes())
    data = _read_all(dev)
    assert data.count(b"EFI PART") == 2 and data.find(b"EFI PART", 4096) == 16 * MiB - 512
    image = tmp_path / "mbr.img"
    image.write_bytes(bytes(4 * MiB))
    _run("sfdisk", "-q", str(image), input="label: dos\nstart=2048, size=4096, type=83\n")
    install(image, dev, _drive(tmp_path, 512))
    assert b"EFI PART" not in _read_all(dev)
    assert _signatures(dev) == ["dos"]


def _drive(tmp_path, sector: int):
    from agent import configdrive
    from agent.payload import parse_request

    request = parse_request(
        {
            "operatingSystem": "byoi_64",
            "customizations": {"imageURL": "http://x/i.raw", "imageType": "raw"},
        }
    )
    return configdrive.build_drive(request, tmp_path / "drive", sector_size=sector)


@pytest.fixture
def partscan_loop(tmp_path) -> Iterator[str]:
    """A loop device attached with partition scanning (losetup -P): BLKRRPART is allowed."""
    backing = tmp_path / "partscan.img"
    backing.write_bytes(bytes(32 * MiB))
    dev = _run("losetup", "-f", "-P", "--show", str(backing)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["partx", "-d", dev], capture_output=True, timeout=60)
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


@pytest.mark.root
@needs_root
def test_reread_retries_ebusy_then_falls_back(partscan_loop, tmp_path, monkeypatch) -> None:
    """A mounted partition makes BLKRRPART fail with EBUSY: retried, then partx, no raise."""
    dev = partscan_loop
    _run("sfdisk", "-q", "--no-reread", dev, input="label: dos\nstart=2048\n")
    _run("partx", "-a", dev)
    _run("mkfs.ext4", "-q", "-F", f"{dev}p1")
    calls: list[str] = []
    real = blockdev._blkrrpart

    def counting(path: str) -> None:
        calls.append(path)
        real(path)

    monkeypatch.setattr(blockdev, "_blkrrpart", counting)
    blockdev.reread_partition_table(dev, attempts=3, wait_max=0.1)
    assert calls == [dev]  # nothing open: the first attempt succeeds
    _run("partx", "-a", dev)  # this kernel parses no tables itself: put the node back
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("mount", f"{dev}p1", str(mnt))
    try:
        calls.clear()
        blockdev.reread_partition_table(dev, attempts=3, wait_max=0.1)
        assert calls == [dev] * 3
        assert _kernel_partitions(dev) == [f"{os.path.basename(dev)}p1"]  # still in use, kept
    finally:
        _run("umount", str(mnt))

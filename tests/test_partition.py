"""GPT relocation and the config-drive partition, on real loop devices.

The kernel here creates no partition nodes, so every check reads the whole disk at the
partition's byte offset: blkid ``-O`` (cloud-init's candidate rule), pycdlib and mtools.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from cloudinit_reader import (
    extract_fat,
    extract_iso,
    fetch_cloudinit,
    import_cloudinit,
    read_with_cloudinit,
)

from agent import configdrive, messages, partition
from agent.messages import InstallError
from agent.partition import Partition, Table
from agent.payload import parse_request

MIB = 1024 * 1024
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "cloud-init"
BASIC_DATA = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"


@pytest.fixture(scope="session")
def cloudinit():
    return import_cloudinit(fetch_cloudinit(CACHE))


def sh(*args: str, input: str | None = None) -> str:
    return subprocess.run(
        args, input=input, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def request(user_data: str = "#cloud-config\nhostname: x\n", key: str = "ssh-ed25519 AAAA k"):
    return parse_request(
        {
            "operatingSystem": "byoi_64",
            "customizations": {
                "hostname": "node-7",
                "imageURL": "https://example.com/img.raw",
                "imageType": "raw",
                "configDriveUserData": user_data,
                "sshKey": key,
            },
        }
    )


def disk_of(dev: str) -> SimpleNamespace:
    size = int(sh("blockdev", "--getsize64", dev))
    ss = int(sh("blockdev", "--getss", dev))
    return SimpleNamespace(path=dev, size=size, logical_sector_size=ss)


def write_image(image: Path, dev: str) -> None:
    """What the writer does: the image's bytes at the start of the disk."""
    with open(image, "rb") as src, open(dev, "r+b") as dst:
        dst.write(src.read())
        dst.flush()


def gpt_image(make_loop, size: int, ss: int, *, drop_backup: bool = False) -> Path:
    """A GPT 'cloud image' of ``size`` bytes for ``ss``-byte sectors: ESP + root partition."""
    dev = make_loop(size, ss, name="image.raw")
    sh("sgdisk", "-n", "1:1M:+4M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300", dev)
    image = Path(sh("losetup", "-n", "-O", "BACK-FILE", dev).strip())
    if drop_backup:
        # cut short: the backup header and table are gone, not just misplaced
        with open(image, "r+b") as f:
            f.seek(size - 64 * ss)
            f.write(bytes(64 * ss))
    return image


def mbr_image(tmp_path: Path, size: int, parts: list[str]) -> Path:
    image = tmp_path / "mbr.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    sh("sfdisk", "--no-reread", str(image), input="label: dos\n" + "\n".join(parts) + "\n")
    return image


def probe(dev: str, offset: int) -> dict[str, str]:
    """cloud-init's candidate rule, at the partition's offset: blkid -p by LABEL/TYPE."""
    out = sh("blkid", "-p", "-O", str(offset), "-o", "export", dev)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def table(dev: str) -> dict:
    return json.loads(sh("sfdisk", "--json", dev))["partitiontable"]


def part(dev: str, number: int) -> dict:
    (found,) = [p for p in table(dev)["partitions"] if p["node"] == f"{dev}p{number}"]
    return found


def head(dev: str, n: int) -> bytes:
    with open(dev, "rb") as f:
        return f.read(n)


def sgdisk_clean(dev: str) -> bool:
    return "No problems found" in sh("sgdisk", "-v", dev)


def read_last_lba(dev: str, ss: int) -> bytes:
    size = int(sh("blockdev", "--getsize64", dev))
    with open(dev, "rb") as f:
        f.seek(size - ss)
        return f.read(8)


# --- pure decisions -----------------------------------------------------------------------------


def test_plan_gpt_ends_at_last_usable_lba_and_is_aligned() -> None:
    t = Table("gpt", 512, (Partition(1, 2048, 40960, "x"),), first_lba=34, last_lba=204766)
    start, size = partition.plan_new_partition(t, 204800, 300 * 1024)
    assert start % 2048 == 0
    assert start + size - 1 == 204766
    assert MIB <= size * 512 < 2 * MIB


def test_plan_4kn_aligns_to_256_sectors() -> None:
    t = Table("gpt", 4096, (), first_lba=6, last_lba=25594)
    start, size = partition.plan_new_partition(t, 25600, 3 * MIB + 1)
    assert start % 256 == 0 and start + size - 1 == 25594
    assert size * 4096 >= 3 * MIB + 1


def test_plan_mbr_stays_below_2tib() -> None:
    disk_sectors = 3 * 2**40 // 512
    t = Table("dos", 512, (Partition(1, 2048, 100000, "83"),))
    start, size = partition.plan_new_partition(t, disk_sectors, MIB)
    assert start + size <= 2**32
    assert start % 2048 == 0


def test_plan_refusals() -> None:
    full = Table("dos", 512, tuple(Partition(n, n * 4096, 4096, "83") for n in (1, 2, 3, 4)))
    with pytest.raises(ValueError, match="four primary"):
        partition.plan_new_partition(full, 10**6, MIB)
    to_the_end = Table("gpt", 512, (Partition(1, 2048, 202719, "x"),), 34, 204766)
    with pytest.raises(ValueError, match="no free"):
        partition.plan_new_partition(to_the_end, 204800, MIB)
    with pytest.raises(ValueError, match="64 MiB"):
        partition.plan_new_partition(Table("gpt", 512, (), 34, 10**7), 10**7, 65 * MIB)


def test_parse_sfdisk_json_numbers_from_node_names() -> None:
    text = json.dumps(
        {
            "partitiontable": {
                "label": "gpt",
                "sectorsize": 4096,
                "firstlba": 6,
                "lastlba": 999,
                "partitions": [
                    {
                        "node": "/dev/nvme0n1p12",
                        "start": 256,
                        "size": 10,
                        "type": "X",
                        "name": "config-2",
                    },
                    {"node": "/dev/nvme0n1p3", "start": 512, "size": 10, "type": "Y"},
                ],
            }
        }
    )
    t = partition.parse_sfdisk_json(text, "/dev/nvme0n1")
    assert [p.number for p in t.partitions] == [3, 12]
    assert t.sector_size == 4096 and t.last_lba == 999
    assert partition.find_existing(t, {}) == t.partitions[1]
    assert partition.find_existing(t, {3: ("CONFIG-2", "vfat")}) == t.partitions[0]
    assert partition.find_existing(t, {3: ("config-2", "ext4")}) == t.partitions[1]


# --- GPT relocation -----------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("ss", [512, 4096])
@pytest.mark.parametrize("drop_backup", [False, True], ids=["misplaced", "missing"])
def test_relocate_backup_gpt(make_loop, ss: int, drop_backup: bool) -> None:
    image = gpt_image(make_loop, 16 * MIB, ss, drop_backup=drop_backup)
    dev = make_loop(64 * MIB, ss)
    write_image(image, dev)
    assert not sgdisk_clean(dev)
    assert read_last_lba(dev, ss) != b"EFI PART"
    before = [(p["start"], p["size"]) for p in table(dev)["partitions"]]

    partition.relocate_backup_gpt(disk_of(dev))

    assert sgdisk_clean(dev)
    assert read_last_lba(dev, ss) == b"EFI PART"
    assert table(dev)["lastlba"] == 64 * MIB // ss - 1 - (1 + 16384 // ss)
    assert [(p["start"], p["size"]) for p in table(dev)["partitions"]] == before


@pytest.mark.root
def test_relocate_is_a_noop_on_mbr(make_loop, tmp_path: Path) -> None:
    dev = make_loop(32 * MIB)
    write_image(mbr_image(tmp_path, 8 * MIB, ["start=2048, size=8192, type=83"]), dev)
    before = head(dev, MIB)
    partition.relocate_backup_gpt(disk_of(dev))
    assert head(dev, MIB) == before
    assert partition.table_type(dev) == "dos"


@pytest.mark.root
def test_relocate_refuses_protective_mbr_without_gpt(make_loop) -> None:
    """sgdisk -e would write an empty GPT here; the partitions would be lost silently."""
    image = gpt_image(make_loop, 16 * MIB, 512, drop_backup=True)
    with open(image, "r+b") as f:  # primary header gone too
        f.seek(512)
        f.write(bytes(512))
    dev = make_loop(32 * MIB)
    write_image(image, dev)
    assert partition.table_type(dev) == "gpt"
    with pytest.raises(InstallError) as err:
        partition.relocate_backup_gpt(disk_of(dev))
    assert err.value.message == messages.GPT_MOVE_FAILED
    assert "no valid GPT" in err.value.detail


# --- the config-drive partition -----------------------------------------------------------------


def check_drive(cloudinit, dev: str, number: int, tmp_path: Path, user_data: str) -> None:
    """The partition holds a drive cloud-init finds (blkid) and reads (its own reader)."""
    ss = disk_of(dev).logical_sector_size
    p = part(dev, number)
    offset = p["start"] * ss
    found = probe(dev, offset)
    if ss == 512:
        assert (found["LABEL"], found["TYPE"]) == ("config-2", "iso9660")
        tree = extract_iso(dev, tmp_path / "tree", offset=offset, size=p["size"] * ss)
    else:
        assert (found["LABEL"], found["TYPE"]) == ("CONFIG-2", "vfat")
        tree = extract_fat(dev, tmp_path / "tree", offset=offset)
    seen = read_with_cloudinit(cloudinit, tree, tmp_path / "ci")
    assert seen["userdata"] == user_data.encode()
    assert seen["hostname"] == "node-7"


@pytest.mark.root
@pytest.mark.parametrize("ss", [512, 4096])
def test_gpt_config_drive(cloudinit, make_loop, tmp_path: Path, ss: int) -> None:
    dev = make_loop(64 * MIB, ss)
    write_image(gpt_image(make_loop, 16 * MIB, ss), dev)
    disk = disk_of(dev)
    partition.relocate_backup_gpt(disk)
    drive = configdrive.build_drive(request(), tmp_path / "drive", sector_size=ss)

    number = partition.add_config_drive(disk, drive)

    assert number == 3
    p, pt = part(dev, 3), table(dev)
    assert p["name"] == "config-2" and p["type"].lower() == BASIC_DATA
    assert (p["start"] * ss) % MIB == 0
    assert p["start"] + p["size"] - 1 == pt["lastlba"]
    assert p["size"] * ss >= drive.stat().st_size
    assert sgdisk_clean(dev)
    assert read_last_lba(dev, ss) == b"EFI PART"
    check_drive(cloudinit, dev, number, tmp_path, "#cloud-config\nhostname: x\n")


@pytest.mark.root
def test_config_drive_moves_a_misplaced_backup_gpt_first(make_loop, tmp_path: Path) -> None:
    dev = make_loop(64 * MIB)
    write_image(gpt_image(make_loop, 16 * MIB, 512, drop_backup=True), dev)
    number = partition.add_config_drive(
        disk_of(dev), configdrive.build_drive(request(), tmp_path / "drive.iso")
    )
    p = part(dev, number)
    assert p["start"] + p["size"] - 1 == table(dev)["lastlba"] == 64 * MIB // 512 - 34
    assert sgdisk_clean(dev)
    assert probe(dev, p["start"] * 512)["LABEL"] == "config-2"


@pytest.mark.root
def test_mbr_with_free_slots(cloudinit, make_loop, tmp_path: Path) -> None:
    dev = make_loop(64 * MIB)
    write_image(
        mbr_image(
            tmp_path,
            16 * MIB,
            ["start=2048, size=8192, type=83, bootable", "start=10240, size=20480, type=83"],
        ),
        dev,
    )
    drive = configdrive.build_drive(request(), tmp_path / "drive.iso")
    number = partition.add_config_drive(disk_of(dev), drive)
    assert number == 3
    p = part(dev, 3)
    assert p["type"] == "c"
    assert p["start"] % 2048 == 0 and p["start"] + p["size"] == 64 * MIB // 512
    assert [q.get("bootable", False) for q in table(dev)["partitions"]] == [True, False, False]
    check_drive(cloudinit, dev, number, tmp_path, "#cloud-config\nhostname: x\n")


@pytest.mark.root
def test_mbr_over_2tib_stays_below_the_limit(make_loop, tmp_path: Path) -> None:
    dev = make_loop(3 * 2**40)  # sparse
    write_image(mbr_image(tmp_path, 16 * MIB, ["start=2048, size=8192, type=83"]), dev)
    drive = configdrive.build_drive(request(), tmp_path / "drive.iso")
    number = partition.add_config_drive(disk_of(dev), drive)
    p = part(dev, number)
    assert p["start"] + p["size"] == 2**32  # ends on the last sector MBR can address
    assert probe(dev, p["start"] * 512)["LABEL"] == "config-2"


@pytest.mark.root
def test_mbr_with_four_primaries_fails_clearly(make_loop, tmp_path: Path) -> None:
    dev = make_loop(64 * MIB)
    parts = [f"start={2048 + i * 4096}, size=4096, type=83" for i in range(4)]
    write_image(mbr_image(tmp_path, 16 * MIB, parts), dev)
    before = head(dev, 512)
    drive = configdrive.build_drive(request(), tmp_path / "drive.iso")
    with pytest.raises(InstallError) as err:
        partition.add_config_drive(disk_of(dev), drive)
    assert err.value.message == messages.CONFIGDRIVE_FAILED
    assert "four primary" in err.value.detail
    assert head(dev, 512) == before


@pytest.mark.root
@pytest.mark.parametrize("ss", [512, 4096])
def test_reinstall_reuses_the_config_drive(cloudinit, make_loop, tmp_path: Path, ss) -> None:
    dev = make_loop(64 * MIB, ss)
    write_image(gpt_image(make_loop, 16 * MIB, ss), dev)
    disk = disk_of(dev)
    partition.relocate_backup_gpt(disk)
    first = partition.add_config_drive(
        disk,
        configdrive.build_drive(request("#!/bin/sh\necho one\n"), tmp_path / "a", sector_size=ss),
    )
    second = partition.add_config_drive(
        disk,
        configdrive.build_drive(request("#!/bin/sh\necho two\n"), tmp_path / "b", sector_size=ss),
    )
    assert first == second
    assert [p.get("name") for p in table(dev)["partitions"]].count("config-2") == 1
    check_drive(cloudinit, dev, second, tmp_path, "#!/bin/sh\necho two\n")


@pytest.mark.root
def test_image_with_its_own_config_drive_is_reused(cloudinit, make_loop, tmp_path: Path) -> None:
    """An MBR image that ships a FAT CONFIG-2 partition: found by label, overwritten with our
    ISO, and no stale FAT signature left to make blkid's answer ambiguous."""
    image = mbr_image(
        tmp_path, 16 * MIB, ["start=2048, size=8192, type=83", "start=10240, size=4096, type=c"]
    )
    fat = tmp_path / "old.fat"
    sh("mkfs.fat", "-C", "-n", "CONFIG-2", str(fat), "2048")
    with open(image, "r+b") as f:
        f.seek(10240 * 512)
        f.write(fat.read_bytes())
        f.seek((10240 + 4096) * 512 - 64 * 1024)  # old data in the partition's tail
        f.write(b"\xaa" * 64 * 1024)
    dev = make_loop(64 * MIB)
    write_image(image, dev)
    number = partition.add_config_drive(
        disk_of(dev), configdrive.build_drive(request(), tmp_path / "drive.iso")
    )
    assert number == 2
    assert len(table(dev)["partitions"]) == 2
    with open(dev, "rb") as f:
        f.seek((10240 + 4096) * 512 - 64 * 1024)
        assert f.read(64 * 1024) == bytes(64 * 1024)
    check_drive(cloudinit, dev, number, tmp_path, "#cloud-config\nhostname: x\n")


@pytest.mark.root
def test_failures_are_configdrive_failed(make_loop, tmp_path: Path) -> None:
    blank = make_loop(32 * MIB, name="blank.img")
    iso = configdrive.build_drive(request(), tmp_path / "drive.iso")
    with pytest.raises(InstallError) as err:
        partition.add_config_drive(disk_of(blank), iso)
    assert err.value.message == messages.CONFIGDRIVE_FAILED
    assert "no partition table" in err.value.detail

    dev4k = make_loop(64 * MIB, 4096)
    write_image(gpt_image(make_loop, 16 * MIB, 4096), dev4k)
    with pytest.raises(InstallError) as err:
        partition.add_config_drive(disk_of(dev4k), iso)
    assert err.value.message == messages.CONFIGDRIVE_FAILED
    assert "ISO 9660" in err.value.detail

    full = make_loop(32 * MIB, name="full.img")
    sh("sgdisk", "-n", "1:0:0", full)  # the image's partition takes the whole disk
    with pytest.raises(InstallError) as err:
        partition.add_config_drive(disk_of(full), iso)
    assert err.value.message == messages.CONFIGDRIVE_FAILED
    assert "no free" in err.value.detail

"""The disk's final layout (agent/layout.py, gpt.py) written by the writer, on real loop devices.

The tables are built in Python from the image's head; every result is checked with the real
tools: sgdisk -v, sfdisk --json, blkid at the partition's offset (cloud-init's candidate rule),
pycdlib / mtools and cloud-init's own reader. The kernel here creates no partition nodes.
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

from agent import blockdev, configdrive, layout, ptable, regions, writer
from agent.payload import parse_request
from agent.ptable import Partition, Table

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


def virtual_size(image: Path, fmt: str = "raw") -> int:
    info = json.loads(sh("qemu-img", "info", "--output=json", "-f", fmt, str(image)))
    return int(info["virtual-size"])


def install(image: Path, dev: str, drive: Path, fmt: str = "raw", scratch: Path | None = None):
    """The write phase as the pipeline runs it: plan, zero, body, verify, drive, tail, head."""
    scratch = scratch or image.parent
    disk = disk_of(dev)
    plan = layout.plan(
        image, fmt, virtual_size(image, fmt), disk, drive, blockdev.stale_regions(dev), scratch
    )
    blockdev.zero(dev, plan.zero_first)
    writer.copy_body(image, fmt, dev, plan, fmt)
    writer.verify_body(image, fmt, dev, plan, fmt, "full")
    writer.write_drive(dev, plan, drive)
    writer.write_tail(dev, plan)
    writer.write_head(dev, plan)
    blockdev.reread_partition_table(dev)
    assert writer.result_problems(dev, plan) == []
    return plan


def image_rest_equal(image: Path, dev: str, plan) -> bool:
    """The disk holds the image's bytes outside the tables the plan rewrote."""
    start, length = plan.body
    with open(image, "rb") as a, open(dev, "rb") as b:
        a.seek(start)
        b.seek(start)
        return a.read(length) == b.read(length)


# --- pure decisions -----------------------------------------------------------------------------


def test_plan_gpt_ends_at_last_usable_lba_and_is_aligned() -> None:
    t = Table("gpt", 512, (Partition(1, 2048, 40960, "x"),), first_lba=34, last_lba=204766)
    start, size = layout.plan_new_partition(t, 204800, 300 * 1024)
    assert start % 2048 == 0
    assert start + size - 1 == 204766
    assert MIB <= size * 512 < 2 * MIB


def test_head_length_follows_the_gpt_entry_array(tmp_path: Path) -> None:
    """The head is the first MiB, or whole MiBs up to the end of a larger GPT entry array."""
    image = tmp_path / "big-table.raw"
    image.write_bytes(b"")
    with open(image, "r+b") as f:
        f.truncate(8 * MIB)
    sh("sgdisk", "--resize-table=8192", "-n", "1:4096:+1M", str(image))  # entries: 1 MiB
    first = image.read_bytes()[:MIB]
    assert layout.head_length(first, 8 * MIB, 512) == 2 * MIB
    assert layout.head_length(first, 8 * MIB, 4096) == MIB  # no GPT at 4096-byte LBA 1
    assert layout.head_length(b"\0" * MIB, 8 * MIB, 512) == MIB
    assert layout.head_length(b"\0" * 4096, 4096, 512) == 4096


def test_read_head_uses_a_known_head_that_covers_it(tmp_path: Path) -> None:
    """A head already read is used as it is (no second read of the image), cut to the length
    needed; one too short for the table's entries is read again, longer."""
    image = tmp_path / "big-table.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    sh("sgdisk", "--resize-table=8192", "-n", "1:4096:+1M", str(image))
    data = image.read_bytes()
    marked = bytearray(data[: 3 * MIB])
    marked[MIB - 1] = marked[2 * MIB - 1] = 0x5A  # not in the image: where the bytes came from
    known = bytes(marked)
    assert layout.read_head(image, "raw", 8 * MIB, 512, tmp_path, known) == known[: 2 * MIB]
    assert layout.read_head(image, "raw", 8 * MIB, 4096, tmp_path, known) == known[:MIB]
    assert layout.read_head(image, "raw", 8 * MIB, 512, tmp_path, data[:MIB]) == data[: 2 * MIB]
    assert layout.read_head(image, "raw", 8 * MIB, 512, tmp_path) == data[: 2 * MIB]


def test_gpt_verified_reads_sgdisk_reports() -> None:
    """sgdisk -v says "No problems found" also after a caution about a corrupt GPT."""
    clean = "\nNo problems found. 114621 free sectors (56.0 MiB) available in 2\nsegments, ..."
    caution = (
        "****************************************************************************\n"
        "Caution: Found protective or hybrid MBR and corrupt GPT. Using GPT, but disk\n"
        "verification and recovery are STRONGLY recommended.\n"
        "****************************************************************************\n" + clean
    )
    crc = "Caution! After loading partitions, the CRC doesn't check out!\n" + clean
    assert writer.gpt_verified(clean)
    assert not writer.gpt_verified(caution)
    assert not writer.gpt_verified(crc)
    assert not writer.gpt_verified("Problem: The secondary header's self-pointer is wrong\n")


def test_plan_4kn_aligns_to_256_sectors() -> None:
    t = Table("gpt", 4096, (), first_lba=6, last_lba=25594)
    start, size = layout.plan_new_partition(t, 25600, 3 * MIB + 1)
    assert start % 256 == 0 and start + size - 1 == 25594
    assert size * 4096 >= 3 * MIB + 1


def test_plan_mbr_stays_below_2tib() -> None:
    disk_sectors = 3 * 2**40 // 512
    t = Table("dos", 512, (Partition(1, 2048, 100000, "83"),))
    start, size = layout.plan_new_partition(t, disk_sectors, MIB)
    assert start + size <= 2**32
    assert start % 2048 == 0


def test_plan_refusals() -> None:
    full = Table("dos", 512, tuple(Partition(n, n * 4096, 4096, "83") for n in (1, 2, 3, 4)))
    with pytest.raises(ValueError, match="four primary"):
        layout.plan_new_partition(full, 10**6, MIB)
    to_the_end = Table("gpt", 512, (Partition(1, 2048, 202719, "x"),), 34, 204766)
    with pytest.raises(ValueError, match="no free"):
        layout.plan_new_partition(to_the_end, 204800, MIB)
    with pytest.raises(ValueError, match="64 MiB"):
        layout.plan_new_partition(Table("gpt", 512, (), 34, 10**7), 10**7, 65 * MIB)


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
                    {"node": "disk.img1", "start": 600, "size": 10, "type": "Z"},
                ],
            }
        }
    )
    t = ptable.parse_sfdisk_json(text)
    assert [p.number for p in t.partitions] == [1, 3, 12]
    assert t.sector_size == 4096 and t.last_lba == 999
    assert layout.find_existing(t, {}) == t.partitions[2]
    assert layout.find_existing(t, {3: ("CONFIG-2", "vfat")}) == t.partitions[1]
    assert layout.find_existing(t, {3: ("config-2", "ext4")}) == t.partitions[2]


def test_subtract_and_merge() -> None:
    assert regions.subtract([(0, 100), (200, 100)], (50, 200)) == [(0, 50), (250, 50)]
    assert regions.subtract([(0, 100)], (10, 20)) == [(0, 10), (30, 70)]
    assert regions.merge([(600, 10), (0, 512), (500, 30)], 1024) == [(0, 1024)]
    assert regions.merge([(0, 10), (4096, 10)], 8192, 512) == [(0, 512), (4096, 512)]


def test_gpt_tables_built_in_python_pass_sgdisk(tmp_path: Path) -> None:
    """Without root: the head and tail built from an image's head, laid on a sparse file of
    the disk's size, are a GPT that sgdisk finds clean, with the new partition named config-2
    and the protective MBR covering the disk."""
    image = tmp_path / "img.raw"
    image.write_bytes(bytes(16 * MIB))
    sh("sgdisk", "-n", "1:1M:+4M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300", str(image))
    head = image.read_bytes()[:MIB]
    found = layout.image_table(head, 512)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
    plan = layout.layout(found, head, 16 * MIB, 64 * MIB, [], 300 * 1024, {})
    with open(disk, "r+b") as f:
        f.write(plan.tables.head)
        f.seek(plan.tables.tail_offset)
        f.write(plan.tables.tail)
    assert plan.tables.tail_offset + len(plan.tables.tail) == 64 * MIB
    assert "No problems found" in sh("sgdisk", "-v", str(disk))
    t = ptable.read_table(disk)
    assert t.last_lba == 64 * MIB // 512 - 34
    assert [(p.number, p.name) for p in t.partitions][-1] == (3, "config-2")
    assert t.partitions[-1].type == BASIC_DATA
    assert plan.expected == tuple(t.layout())
    assert int.from_bytes(plan.tables.head[446 + 12 : 446 + 16], "little") == 64 * MIB // 512 - 1
    assert plan.body[0] == MIB and plan.body[0] + plan.body[1] <= 16 * MIB - 33 * 512


def test_protective_mbr_without_gpt_is_refused_before_writing(tmp_path: Path) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(bytes(16 * MIB))
    sh("sgdisk", "-n", "1:1M:+4M", str(image))
    with open(image, "r+b") as f:  # the primary header gone: sgdisk -e would write an empty GPT
        f.seek(512)
        f.write(bytes(512))
    with pytest.raises(layout.PlanError) as err:
        layout.image_table(image.read_bytes()[:MIB], 512)
    assert err.value.kind == "table" and "protective MBR" in str(err.value)


# --- on loop devices ----------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("ss", [512, 4096])
@pytest.mark.parametrize("drop_backup", [False, True], ids=["misplaced", "missing"])
def test_backup_gpt_at_the_end_and_config_drive(
    cloudinit, make_loop, tmp_path: Path, ss: int, drop_backup: bool
) -> None:
    image = gpt_image(make_loop, 16 * MIB, ss, drop_backup=drop_backup)
    dev = make_loop(64 * MIB, ss)
    drive = configdrive.build_drive(request(), tmp_path / "drive", sector_size=ss)
    before = [
        (p.start, p.size) for p in layout.image_table(image.read_bytes()[:MIB], ss).table.partitions
    ]

    plan = install(image, dev, drive)

    assert sgdisk_clean(dev)
    assert read_last_lba(dev, ss) == b"EFI PART"
    pt = table(dev)
    assert pt["lastlba"] == 64 * MIB // ss - 1 - (1 + 16384 // ss)
    assert [(p["start"], p["size"]) for p in pt["partitions"]][:2] == before
    p = part(dev, 3)
    assert plan.partition_number == 3
    assert p["name"] == "config-2" and p["type"].lower() == BASIC_DATA
    assert (p["start"] * ss) % MIB == 0 and p["start"] + p["size"] - 1 == pt["lastlba"]
    assert image_rest_equal(image, dev, plan)
    check_drive(cloudinit, dev, 3, tmp_path, "#cloud-config\nhostname: x\n")


@pytest.mark.root
def test_result_problems_names_each_fault(make_loop, tmp_path: Path) -> None:
    """The finished disk's checks (run side by side) each report their own fault."""
    import dataclasses

    image = gpt_image(make_loop, 16 * MIB, 512)
    dev = make_loop(64 * MIB)
    plan = install(image, dev, configdrive.build_drive(request(), tmp_path / "drive.iso"))
    moved = dataclasses.replace(plan, expected=plan.expected[:-1])
    assert [p.split(" ")[:3] for p in writer.result_problems(dev, moved)] == [
        ["the", "table", "reads"]
    ]
    with open(dev, "r+b") as f:  # the config drive's volume descriptors
        f.seek(plan.drive_offset + 32768)
        f.write(bytes(8192))
    assert [p.split(" ")[:4] for p in writer.result_problems(dev, plan)] == [
        ["the", "config", "drive", "probes"]
    ]
    with open(dev, "r+b") as f:  # the backup header, on the last LBA
        f.seek(64 * MIB - 512 + 16)
        f.write(b"\xff" * 4)
    problems = writer.result_problems(dev, plan)
    assert any(p.startswith("sgdisk -v: ") for p in problems), problems


@pytest.mark.root
def test_mbr_with_free_slots(cloudinit, make_loop, tmp_path: Path) -> None:
    dev = make_loop(64 * MIB)
    image = mbr_image(
        tmp_path,
        16 * MIB,
        ["start=2048, size=8192, type=83, bootable", "start=10240, size=20480, type=83"],
    )
    drive = configdrive.build_drive(request(), tmp_path / "drive.iso")
    plan = install(image, dev, drive)
    assert plan.partition_number == 3
    p = part(dev, 3)
    assert p["type"] == "c"
    assert p["start"] % 2048 == 0 and p["start"] + p["size"] == 64 * MIB // 512
    assert [q.get("bootable", False) for q in table(dev)["partitions"]] == [True, False, False]
    with open(image, "rb") as f:  # boot code and the image's own entries kept
        assert head(dev, 446) == f.read(446)
    check_drive(cloudinit, dev, 3, tmp_path, "#cloud-config\nhostname: x\n")


@pytest.mark.root
def test_mbr_over_2tib_stays_below_the_limit(make_loop, tmp_path: Path) -> None:
    dev = make_loop(3 * 2**40)  # sparse
    image = mbr_image(tmp_path, 16 * MIB, ["start=2048, size=8192, type=83"])
    plan = install(image, dev, configdrive.build_drive(request(), tmp_path / "drive.iso"))
    p = part(dev, plan.partition_number)
    assert p["start"] + p["size"] == 2**32  # ends on the last sector MBR can address
    assert probe(dev, p["start"] * 512)["LABEL"] == "config-2"


def test_mbr_with_four_primaries_is_refused_before_writing(tmp_path: Path) -> None:
    parts = [f"start={2048 + i * 4096}, size=4096, type=83" for i in range(4)]
    image = mbr_image(tmp_path, 16 * MIB, parts)
    drive = configdrive.build_drive(request(), tmp_path / "drive.iso")
    found = layout.image_table(image.read_bytes()[:MIB], 512)
    with pytest.raises(layout.PlanError) as err:
        layout.layout(
            found, image.read_bytes()[:MIB], 16 * MIB, 64 * MIB, [], drive.stat().st_size, {}
        )
    assert err.value.kind == "configdrive" and "four primary" in str(err.value)


@pytest.mark.root
@pytest.mark.parametrize("ss", [512, 4096])
def test_reinstall_leaves_one_config_drive(cloudinit, make_loop, tmp_path: Path, ss) -> None:
    dev = make_loop(64 * MIB, ss)
    image = gpt_image(make_loop, 16 * MIB, ss)
    first = install(
        image,
        dev,
        configdrive.build_drive(request("#!/bin/sh\necho one\n"), tmp_path / "a", sector_size=ss),
    )
    second = install(
        image,
        dev,
        configdrive.build_drive(request("#!/bin/sh\necho two\n"), tmp_path / "b", sector_size=ss),
    )
    assert first.partition_number == second.partition_number == 3
    assert [p.get("name") for p in table(dev)["partitions"]].count("config-2") == 1
    check_drive(cloudinit, dev, 3, tmp_path, "#!/bin/sh\necho two\n")


@pytest.mark.root
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_image_with_its_own_config_drive_is_reused(
    cloudinit, make_loop, tmp_path: Path, fmt
) -> None:
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
    if fmt == "qcow2":
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(tmp_path / "m.qcow2"))
        image = tmp_path / "m.qcow2"
    dev = make_loop(64 * MIB)
    plan = install(image, dev, configdrive.build_drive(request(), tmp_path / "drive.iso"), fmt)
    assert plan.partition_number == 2 and plan.reused
    assert len(table(dev)["partitions"]) == 2
    with open(dev, "rb") as f:
        f.seek((10240 + 4096) * 512 - 64 * 1024)
        assert f.read(64 * 1024) == bytes(64 * 1024)
    check_drive(cloudinit, dev, 2, tmp_path, "#cloud-config\nhostname: x\n")


def test_refusals_before_writing(tmp_path: Path) -> None:
    """No table, an ISO drive for a 4Kn disk, an image whose partition fills the disk: each a
    PlanError (the pipeline's CONFIGDRIVE_FAILED / GPT_MOVE_FAILED) before any write."""
    iso = configdrive.build_drive(request(), tmp_path / "drive.iso")
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(32 * MIB))
    disk = SimpleNamespace(path="/dev/null", size=64 * MIB, logical_sector_size=512)
    with pytest.raises(layout.PlanError) as err:
        layout.plan(blank, "raw", 32 * MIB, disk, iso, [], tmp_path)
    assert err.value.kind == "table"

    disk4k = SimpleNamespace(path="/dev/null", size=64 * MIB, logical_sector_size=4096)
    with pytest.raises(layout.PlanError) as err:
        layout.plan(blank, "raw", 32 * MIB, disk4k, iso, [], tmp_path)
    assert err.value.kind == "configdrive" and "ISO 9660" in str(err.value)

    full = tmp_path / "full.raw"
    full.write_bytes(bytes(64 * MIB))
    sh("sgdisk", "-n", "1:0:0", str(full))  # the image's partition takes the whole disk
    with pytest.raises(layout.PlanError) as err:
        layout.plan(full, "raw", 64 * MIB, disk, iso, [], tmp_path)
    assert err.value.kind == "configdrive" and "no free" in str(err.value)

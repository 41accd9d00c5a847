"""Image inspection against images made by the real qemu-img, mkfs and sgdisk, plus headers
crafted byte by byte (the way oslo.utils' format-inspector tests build theirs). Every refusal
is checked for both declared types, qcow2 and raw."""

from __future__ import annotations

import io
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pycdlib
import pytest

from agent import formats, inspect, layout
from agent import messages as msg
from agent.inspect import (
    ImageInfo,
    Table,
    check_fits_disk,
    check_sector_size,
    data_extents,
    describe_probe,
    inspect_image,
    mapping_problem,
    merge_extents,
    partition_table,
    printable,
)
from agent.messages import InstallError
from agent.tools import Limits
from demo.sample_image import build_image, build_odd_gpt, build_raw

MiB = 1 << 20
TYPES = ("qcow2", "raw")


def qemu_img(*args: str, attempts: int = 1) -> None:
    for _ in range(attempts):
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
    raise AssertionError(proc.stderr)


def to_qcow2(raw: Path, out: Path) -> Path:
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(out))
    return out


def refused(path: Path, declared: str) -> str:
    with pytest.raises(InstallError) as info:
        inspect_image(path, declared)
    return info.value.message


def patched(src: Path, out: Path, edits: dict[int, bytes]) -> Path:
    data = bytearray(src.read_bytes())
    for offset, value in edits.items():
        data[offset : offset + len(value)] = value
    out.write_bytes(bytes(data))
    return out


# --- crafted images ------------------------------------------------------------------------------


def crafted_gpt(ss: int = 512, *, entries: int = 128) -> bytearray:
    """A protective MBR, a GPT header at LBA 1 and its entry array at LBA 2 with one Linux
    partition, checksums right: the minimum a GPT reader accepts."""
    disk = bytearray(2 * MiB)
    disk[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, 4095)
    disk[510:512] = b"\x55\xaa"
    array = bytearray(entries * 128)
    linux = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le
    array[0:56] = linux + uuid.uuid4().bytes_le + struct.pack("<QQQ", 2048, 4000, 0)
    disk[2 * ss : 2 * ss + len(array)] = array
    header = struct.pack(
        "<8sIIIIQQQQ16sQIII",
        b"EFI PART", 0x10000, 92, 0, 0, 1, 4095, 34, 4062,
        uuid.uuid4().bytes_le, 2, entries, 128, zlib.crc32(array),
    )  # fmt: skip
    header = header[:16] + struct.pack("<I", zlib.crc32(header)) + header[20:]
    disk[ss : ss + 92] = header
    return disk


def test_crafted_gpt_is_what_sgdisk_reads(tmp_path: Path) -> None:
    """The crafted GPT is a real one: sgdisk finds its main header and table valid (it has no
    backup: the pure checks read only the start of the disk)."""
    image = tmp_path / "crafted.raw"
    image.write_bytes(bytes(crafted_gpt()))
    out = subprocess.run(["sgdisk", "-v", str(image)], capture_output=True, text=True)
    report = out.stdout + out.stderr
    assert "Main header: OK" in report and "Main partition table: OK" in report, report
    assert partition_table(image.read_bytes()) == Table("gpt", 512)


def build_iso(path: Path, system_area: bytes = b"") -> Path:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="TESTISO")
    iso.add_fp(io.BytesIO(b"hello\n"), 6, "/HELLO.TXT;1")
    iso.write(str(path))
    iso.close()
    if system_area:
        with open(path, "r+b") as f:
            f.write(system_area[: 32 * 1024])
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    out = {
        "qcow2": build_image(d / "gpt.qcow2", fmt="qcow2", table="gpt", size_mib=24),
        "raw_gpt": build_raw(d / "gpt.raw", table="gpt", size_mib=24),
        "raw_mbr": build_image(d / "mbr.raw", fmt="raw", table="dos", size_mib=24),
    }
    for fmt in ("vmdk", "vpc", "vhdx", "vdi", "qed", "qcow", "parallels"):
        out[fmt] = d / f"x.{fmt}"
        qemu_img("convert", "-f", "raw", "-O", fmt, str(out["raw_mbr"]), str(out[fmt]))
    out["luks"] = d / "x.luks"
    qemu_img(
        "create", "--object", "secret,id=s0,data=pw", "-f", "luks", "-o", "key-secret=s0",
        str(out["luks"]), "16M", attempts=5,
    )  # fmt: skip
    out["backing"] = d / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(out["qcow2"]), "-F", "qcow2", str(out["backing"]))
    out["datafile"] = d / "external.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", f"data_file={d / 'external.data'}",
        str(out["datafile"]), "16M",
    )  # fmt: skip
    out["encrypted"] = d / "enc.qcow2"
    qemu_img(
        "create", "--object", "secret,id=sec0,data=pw", "-f", "qcow2",
        "-o", "encrypt.format=luks,encrypt.key-secret=sec0", str(out["encrypted"]), "16M",
        # LUKS times its key derivation with per-thread CPU time, which a loaded machine can
        # report as 0 ms ("Unable to get accurate CPU usage"): a new try then succeeds.
        attempts=5,
    )  # fmt: skip
    out["ext4"] = d / "fs.raw"
    with open(out["ext4"], "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "bare", str(out["ext4"])], check=True)
    out["ext4_qcow2"] = to_qcow2(out["ext4"], d / "fs.qcow2")
    out["empty_qcow2"] = d / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", str(out["empty_qcow2"]), "64M")
    out["zeros"] = d / "zeros.raw"
    out["zeros"].write_bytes(b"\0" * MiB)
    # a GPT disk whose primary header and entries were wiped: the protective MBR remains
    out["pmbr"] = patched(out["raw_gpt"], d / "pmbr.raw", {512: bytes(33 * 512)})
    out["pmbr_qcow2"] = to_qcow2(out["pmbr"], d / "pmbr.qcow2")
    out["iso"] = build_iso(d / "plain.iso")
    return out


# --- the format: what it is, named as qemu names it ----------------------------------------------


def test_valid_images(images: dict[str, Path]) -> None:
    info = inspect_image(images["qcow2"], "qcow2")
    assert (info.format, info.partition_table, info.sector_size) == ("qcow2", "gpt", 512)
    assert info.virtual_size == 24 * MiB
    assert info.data_extents and all(length > 0 for _, length in info.data_extents)
    info = inspect_image(images["raw_mbr"], "raw")
    assert (info.format, info.partition_table) == ("raw", "dos")
    info = inspect_image(images["raw_gpt"], "raw")
    assert (info.format, info.partition_table, info.sector_size) == ("raw", "gpt", 512)


@pytest.mark.parametrize("declared", TYPES)
@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vhdx", "vdi", "qed", "qcow", "luks"])
def test_other_formats_named_as_qemu_names_them(images, fmt: str, declared: str) -> None:
    """QED (magic ``QED\\0``), qcow version 1 (``qcow``, not ``qcow2``), LUKS, ...: the
    detected name is qemu-img's, for either declared type."""
    assert refused(images[fmt], declared) == msg.format_mismatch(fmt, declared)


@pytest.mark.parametrize("declared", TYPES)
def test_text_vmdk_starting_with_a_comment(images, tmp_path: Path, declared: str) -> None:
    """A text VMDK descriptor (which points qemu at other files) is found however it starts,
    not only when it starts with the usual ``# Disk DescriptorFile`` line."""
    flat = tmp_path / "flat.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "16M")
    text = flat.read_text()
    assert text.startswith("# Disk DescriptorFile")
    commented = tmp_path / "commented.vmdk"
    commented.write_text(
        "# exported by a hand-made tool\n\n" + text.replace("# Disk Desc", "# Desc")
    )
    sparse = tmp_path / "sparse-descriptor.vmdk"  # a sparse createType in a text descriptor
    sparse.write_text("#\n" + text.replace("monolithicFlat", "monolithicSparse"))
    for image in (commented, sparse):
        assert refused(image, declared) == msg.format_mismatch("vmdk", declared)


def test_qcow2_declared_raw(images: dict[str, Path]) -> None:
    assert refused(images["qcow2"], "raw") == (
        "image provided format is qcow2 which does not match expected raw format"
    )
    assert refused(images["raw_mbr"], "qcow2") == msg.format_mismatch("raw", "qcow2")


def test_unknown_to_the_inspector_is_still_refused(images: dict[str, Path]) -> None:
    """parallels is a format qemu reads and oslo.utils does not know: it comes out as raw, and
    is refused all the same (no partition table at its start; declared qcow2, not qcow2)."""
    assert refused(images["parallels"], "qcow2") == msg.format_mismatch("raw", "qcow2")
    assert refused(images["parallels"], "raw").startswith(msg.raw_without_partition_table(""))


# --- polyglots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", TYPES)
def test_iso_qcow2_polyglot(images, tmp_path: Path, declared: str) -> None:
    """An ISO 9660 whose system area holds a qcow2 header: qemu would read a qcow2, an ISO
    reader a CD. Either declared type is refused, naming both."""
    qcow2_head = images["qcow2"].read_bytes()[: 32 * 1024]
    poly = build_iso(tmp_path / "poly.iso", system_area=qcow2_head)
    assert formats.detect(poly).matches == ("iso", "qcow2")
    assert refused(poly, declared) == msg.ambiguous_format(["iso", "qcow2"])


@pytest.mark.parametrize("declared", TYPES)
def test_qcow2_with_mbr_signature_polyglot(images, tmp_path: Path, declared: str) -> None:
    poly = patched(images["qcow2"], tmp_path / "poly.qcow2", {510: b"\x55\xaa"})
    assert refused(poly, declared) == msg.ambiguous_format(["raw (MBR signature)", "qcow2"])


def test_iso_hybrid(images: dict[str, Path], tmp_path: Path) -> None:
    """An ISO-hybrid (ISO 9660 plus an MBR with partitions, as installer images are) is a raw
    disk image to qemu: accepted declared raw, an ``iso`` declared qcow2. A plain ISO has no
    partition table and is refused either way."""
    mbr_sector = images["raw_mbr"].read_bytes()[:512]
    hybrid = build_iso(tmp_path / "hybrid.iso", system_area=mbr_sector)
    assert formats.detect(hybrid).matches == ("gpt", "iso")
    info = inspect_image(hybrid, "raw")
    assert (info.format, info.partition_table) == ("raw", "dos")
    assert refused(hybrid, "qcow2") == msg.format_mismatch("iso", "qcow2")
    for declared in TYPES:
        assert refused(images["iso"], declared) == msg.format_mismatch("iso", declared)


# --- qcow2 safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [("backing", "backing file"), ("datafile", "external data file"), ("encrypted", "encrypted")],
)
def test_unsafe_qcow2(images: dict[str, Path], name: str, reason: str) -> None:
    message = refused(images[name], "qcow2")
    assert message.startswith("image provided is an unsafe qcow2 image") and reason in message
    assert refused(images[name], "raw") == msg.format_mismatch("qcow2", "raw")


@pytest.mark.parametrize(
    ("offset", "value"),
    [(72, (1 << 40).to_bytes(8, "big")), (79, b"\x80"), (4, (4).to_bytes(4, "big"))],
    ids=["high-feature-bit", "unassigned-bit-7", "version-4"],
)
def test_unknown_incompatible_feature_or_version(images, tmp_path, offset, value) -> None:
    crafted = patched(images["qcow2"], tmp_path / "crafted.qcow2", {offset: value})
    assert refused(crafted, "qcow2") == msg.unsafe_qcow2(
        "it uses unknown incompatible features or an unsupported version"
    )
    assert refused(crafted, "raw") == msg.format_mismatch("qcow2", "raw")


def test_marked_corrupt(images: dict[str, Path], tmp_path: Path) -> None:
    crafted = patched(images["qcow2"], tmp_path / "corrupt.qcow2", {79: b"\x02"})
    assert refused(crafted, "qcow2") == msg.damaged_image("qcow2", "it is marked corrupt")


# --- qcow2 integrity ------------------------------------------------------------------------------


def random_gpt_qcow2(d: Path, size_mib: int = 8) -> Path:
    """A qcow2 of a GPT disk whose partition is full of random data (so its file is about its
    virtual size and a cut file loses data clusters)."""
    raw = build_raw(d / "rand.raw", table="gpt", size_mib=size_mib + 18)
    with open(raw, "r+b") as f:
        f.seek(17 * MiB)
        f.write(_random(size_mib * MiB))
    return to_qcow2(raw, d / "rand.qcow2")


def _random(n: int) -> bytes:
    with open("/dev/urandom", "rb") as f:
        return f.read(n)


def l2_entry_offset(image: Path, cluster: int) -> int:
    """File offset of the L2 entry mapping virtual cluster ``cluster`` (first L2 table)."""
    data = image.read_bytes()
    (l1,) = struct.unpack_from(">Q", data, 40)
    (l2,) = struct.unpack_from(">Q", data, l1)
    return (l2 & 0x00FFFFFFFFFFFE00) + 8 * cluster


@pytest.mark.parametrize("declared", TYPES)
def test_truncated_qcow2(tmp_path: Path, declared: str) -> None:
    """A qcow2 cut to its first half (a download cut short that no checksum covered):
    ``qemu-img check`` counts a corruption for every data cluster past the end."""
    full = random_gpt_qcow2(tmp_path)
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    inspect_image(full, "qcow2")  # whole, it passes
    message = refused(cut, declared)
    if declared == "raw":
        assert message == msg.format_mismatch("qcow2", "raw")
    else:
        assert message.startswith(msg.damaged_image("qcow2", "qemu-img check found")[:-1])


@pytest.mark.parametrize("declared", TYPES)
def test_misaligned_l2_entry(tmp_path: Path, declared: str) -> None:
    """One L2 entry moved by 512 bytes: qemu would fail on that cluster mid-write."""
    image = random_gpt_qcow2(tmp_path)
    at = l2_entry_offset(image, 300)  # a data cluster in the partition
    (entry,) = struct.unpack_from(">Q", image.read_bytes(), at)
    assert entry & 0x00FFFFFFFFFFFE00, "cluster 300 must be allocated"
    bad = patched(image, tmp_path / "misaligned.qcow2", {at: struct.pack(">Q", entry + 512)})
    message = refused(bad, declared)
    if declared == "raw":
        assert message == msg.format_mismatch("qcow2", "raw")
    else:
        assert message.startswith("image provided is a damaged qcow2 image: qemu-img check")


def test_mapped_cluster_beyond_the_file() -> None:
    """The map check on its own (qemu-img check would already count these): a data range
    stored past the file's end is named; unallocated and compressed ranges are ignored."""
    entries = [
        {"start": 0, "length": 65536, "data": True, "offset": 327680},
        {"start": 65536, "length": 65536, "data": False, "zero": True},
        {"start": 131072, "length": 65536, "data": True},  # compressed: no host offset
        {"start": 196608, "length": 65536, "data": True, "offset": 393216},
    ]
    assert mapping_problem(entries, 458752) == ""
    assert mapping_problem(entries, 458751) == (
        "data at virtual offset 196608 is mapped to file offset 393216, beyond the end of the "
        "458751-byte file (truncated?)"
    )
    assert merge_extents(entries) == [(0, 65536), (131072, 131072)]


def test_data_extents(images: dict[str, Path], tmp_path: Path) -> None:
    """Guest ranges that hold data, from qemu-img map, for raw and qcow2 alike."""
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"x" * 65536)
        f.seek(4 * MiB)
        f.write(b"y" * 65536)
    extents = data_extents(raw, "raw")
    assert (MiB, 65536) in extents and (4 * MiB, 65536) in extents
    assert sum(length for _, length in extents) < MiB  # the holes are not listed
    qcow2 = to_qcow2(raw, tmp_path / "sparse.qcow2")
    assert data_extents(qcow2, "qcow2") == [(MiB, 65536), (4 * MiB, 65536)]
    assert data_extents(images["empty_qcow2"], "qcow2") == []


def test_tools_run_under_the_untrusted_limits(images, monkeypatch) -> None:
    """qemu-img is run through tools.run with inspect's limits: an address space too small
    for qemu-img makes the inspection fail closed."""
    monkeypatch.setattr(inspect, "UNTRUSTED", Limits(address_space=16 * MiB, cpu_seconds=5))
    assert refused(images["qcow2"], "qcow2") == msg.damaged_image(
        "qcow2", "qemu-img cannot open it"
    )
    source = Path(inspect.__file__).read_text() + Path(formats.__file__).read_text()
    assert "subprocess" not in source and "preexec_fn" not in source


# --- a partition table is required ----------------------------------------------------------------


def test_raw_without_partition_table(images: dict[str, Path]) -> None:
    assert refused(images["ext4"], "raw") == msg.raw_without_partition_table(
        "ext4 filesystem labelled bare"
    )
    assert refused(images["zeros"], "raw") == msg.raw_without_partition_table(
        "only zeroes at its start"
    )
    assert refused(images["pmbr"], "raw") == msg.raw_without_partition_table(
        "a protective MBR (type 0xEE) without a GPT header"
    )
    for name in ("ext4", "zeros", "pmbr"):
        assert refused(images[name], "qcow2") == msg.format_mismatch("raw", "qcow2")


def test_qcow2_without_partition_table(images: dict[str, Path]) -> None:
    assert refused(images["ext4_qcow2"], "qcow2") == msg.qcow2_without_partition_table(
        "ext4 filesystem labelled bare"
    )
    assert refused(images["empty_qcow2"], "qcow2") == msg.qcow2_without_partition_table(
        "nothing (no cluster holds data)"
    )
    assert refused(images["pmbr_qcow2"], "qcow2") == msg.qcow2_without_partition_table(
        "a protective MBR (type 0xEE) without a GPT header"
    )
    for name in ("ext4_qcow2", "empty_qcow2", "pmbr_qcow2"):
        assert refused(images[name], "raw") == msg.format_mismatch("qcow2", "raw")


@pytest.mark.parametrize("ss", [512, 4096])
def test_gpt_checksums(tmp_path: Path, ss: int) -> None:
    """A GPT with a bad checksum is still a GPT (not "no partition table"): inspect lets it
    through with its problem noted, and the layout refuses it before any write (the SPEC's
    "Can not move backup GPT ..." for the pipeline, tests/test_install.py)."""
    good = crafted_gpt(ss)
    assert partition_table(bytes(good)) == Table("gpt", ss)
    header = bytearray(good)
    header[ss + 60] ^= 1  # a byte of the disk GUID
    assert partition_table(bytes(header)) == Table("gpt", ss, "the GPT header's CRC is wrong")
    entries = bytearray(good)
    entries[2 * ss + 60] ^= 1  # a byte of partition 1's name
    assert partition_table(bytes(entries)).problem == (
        "the GPT's partition entry array CRC is wrong"
    )
    with pytest.raises(layout.PlanError):
        layout.image_table(bytes(entries), ss)
    for declared in TYPES:
        image = tmp_path / f"bad-{declared}.raw"
        image.write_bytes(bytes(entries))
        if declared == "qcow2":
            image = to_qcow2(image, tmp_path / "bad.qcow2")
        info = inspect_image(image, declared)
        assert (info.partition_table, info.sector_size) == ("gpt", ss)


@pytest.mark.parametrize("declared", TYPES)
def test_gpt_entries_beyond_the_first_mib_and_hybrid_mbr(tmp_path: Path, declared: str) -> None:
    """Unusual but valid: the GPT's entry array at LBA 2048 (sgdisk -j), an ESP also in a
    hybrid MBR. Inspect reads the head as far as the entries reach, as the layout does."""
    image = build_odd_gpt(tmp_path / "odd.raw")
    if declared == "qcow2":
        image = to_qcow2(image, tmp_path / "odd.qcow2")
    info = inspect_image(image, declared)
    assert (info.partition_table, info.sector_size) == ("gpt", 512)


def test_partition_table_pure() -> None:
    assert partition_table(bytes(8192)) == Table(None)
    mbr = bytearray(1024)
    mbr[510:512] = b"\x55\xaa"
    assert partition_table(bytes(mbr)) == Table(None)  # signature, no partition
    mbr[446 + 4] = 0x83
    assert partition_table(bytes(mbr)) == Table(None)  # a type, but no sectors
    mbr[446 + 12 : 446 + 16] = (2048).to_bytes(4, "little")
    assert partition_table(bytes(mbr)) == Table("dos")
    fat = bytearray(mbr)
    fat[0x10], fat[0x15] = 2, 0xF8
    assert partition_table(bytes(fat)) == Table("dos")  # boot code may hold those bytes
    fat[0x36:0x3B] = b"FAT16"
    assert partition_table(bytes(fat)) == Table(None)  # a FAT boot sector is no MBR
    mbr[446] = 0x12  # not a boot flag: this is boot code, not a table
    assert partition_table(bytes(mbr)) == Table(None)
    mbr[446] = 0x80
    mbr[462 + 4] = 0xEE
    mbr[462 + 12 : 462 + 16] = (4096).to_bytes(4, "little")
    assert partition_table(bytes(mbr)).problem.startswith("a protective MBR")
    moved = crafted_gpt()
    moved[512 + 24 : 512 + 32] = struct.pack("<Q", 7)  # my_lba must be 1
    moved[512 + 16 : 512 + 20] = b"\0\0\0\0"
    moved[512 + 16 : 512 + 20] = struct.pack("<I", zlib.crc32(moved[512 : 512 + 92]))
    assert partition_table(bytes(moved)).problem == (
        "the primary GPT header says it lives at LBA 7"
    )


def test_describe_probe_and_printable() -> None:
    assert describe_probe({"TYPE": "ext4", "LABEL": "my\\ root"}, b"x") == (
        "ext4 filesystem labelled my root"
    )
    assert describe_probe({"TYPE": "swap", "USAGE": "other"}, b"x") == "swap"
    assert describe_probe({}, bytes(512)) == "only zeroes at its start"
    assert describe_probe({}, b"\1") == "unrecognised data"
    assert printable("ok\r\nFAKE: done\x1b[2J" + "x" * 100) == "ok??FAKE: done?[2J" + "x" * 46


def test_fit_and_sector_size() -> None:
    info = ImageInfo("raw", 100, "gpt", 512)
    with pytest.raises(InstallError) as e:
        check_fits_disk(info, "/dev/sdz", 99)
    assert e.value.message == (
        "image provided has a size of 100 bytes which is larger than /dev/sdz of 99 bytes"
    )
    check_fits_disk(info, "/dev/sdz", 100)
    with pytest.raises(InstallError):
        check_sector_size(info, "/dev/sdz", 4096)
    check_sector_size(info, "/dev/sdz", 512)


def test_mbr_image_only_on_512_byte_sectors() -> None:
    mbr = ImageInfo("raw", 100, "dos", None)
    check_sector_size(mbr, "/dev/sdz", 512)
    with pytest.raises(InstallError) as e:
        check_sector_size(mbr, "/dev/nvme1n1", 4096)
    assert e.value.message == msg.mbr_on_large_sectors("/dev/nvme1n1", 4096)
    check_sector_size(ImageInfo("raw", 100, "gpt", 4096), "/dev/nvme1n1", 4096)

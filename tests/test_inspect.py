"""Image inspection against images made by the real qemu-img, mkfs and sgdisk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent import messages as msg
from agent.inspect import (
    check_fits_disk,
    check_sector_size,
    detect_format,
    inspect_image,
    partition_table,
)
from agent.messages import InstallError
from demo.sample_image import build_image


def qemu_img(*args: str, attempts: int = 1) -> None:
    for _ in range(attempts):
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
    raise AssertionError(proc.stderr)


def refused(path: Path, declared: str) -> str:
    with pytest.raises(InstallError) as info:
        inspect_image(path, declared)
    return info.value.message


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    out = {
        "qcow2": build_image(d / "gpt.qcow2", fmt="qcow2", table="gpt", size_mib=24),
        "raw_mbr": build_image(d / "mbr.raw", fmt="raw", table="dos", size_mib=24),
    }
    for fmt in ("vmdk", "vpc", "vhdx", "vdi"):
        out[fmt] = d / f"x.{fmt}"
        qemu_img("convert", "-f", "raw", "-O", fmt, str(out["raw_mbr"]), str(out[fmt]))
    out["backing"] = d / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(out["qcow2"]), "-F", "qcow2", str(out["backing"]))
    out["datafile"] = d / "external.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        f"data_file={d / 'external.data'}",
        str(out["datafile"]),
        "16M",
    )
    out["encrypted"] = d / "enc.qcow2"
    qemu_img(
        "create",
        "--object",
        "secret,id=sec0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        str(out["encrypted"]),
        "16M",
        # LUKS times its key derivation with per-thread CPU time, which a loaded machine can
        # report as 0 ms ("Unable to get accurate CPU usage"): a new try then succeeds.
        attempts=5,
    )
    out["ext4"] = d / "fs.raw"
    with open(out["ext4"], "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "bare", str(out["ext4"])], check=True)
    out["zeros"] = d / "zeros.raw"
    out["zeros"].write_bytes(b"\0" * (1 << 20))
    return out


def test_valid_images(images: dict[str, Path]) -> None:
    info = inspect_image(images["qcow2"], "qcow2")
    assert (info.format, info.partition_table, info.sector_size) == ("qcow2", "gpt", 512)
    assert info.virtual_size == 24 << 20
    info = inspect_image(images["raw_mbr"], "raw")
    assert (info.format, info.partition_table) == ("raw", "dos")


def test_declared_qcow2_but_raw(images: dict[str, Path]) -> None:
    assert refused(images["raw_mbr"], "qcow2") == msg.format_mismatch("raw", "qcow2")


@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vhdx", "vdi"])
def test_declared_raw_but_other_format(images: dict[str, Path], fmt: str) -> None:
    assert refused(images[fmt], "raw") == msg.format_mismatch(fmt, "raw")
    assert refused(images[fmt], "qcow2") == msg.format_mismatch(fmt, "qcow2")


def test_declared_raw_but_qcow2(images: dict[str, Path]) -> None:
    assert refused(images["qcow2"], "raw") == (
        "image provided format is qcow2 which does not match expected raw format"
    )


def test_raw_without_partition_table(images: dict[str, Path]) -> None:
    assert refused(images["ext4"], "raw") == msg.raw_without_partition_table(
        "ext4 filesystem labelled bare"
    )
    assert refused(images["zeros"], "raw") == msg.raw_without_partition_table(
        "only zeroes at its start"
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [("backing", "backing file"), ("datafile", "external data file"), ("encrypted", "encrypted")],
)
def test_unsafe_qcow2(images: dict[str, Path], name: str, reason: str) -> None:
    message = refused(images[name], "qcow2")
    assert message.startswith("image provided is an unsafe qcow2 image") and reason in message


def test_unknown_incompatible_feature(images: dict[str, Path], tmp_path: Path) -> None:
    crafted = tmp_path / "crafted.qcow2"
    data = bytearray(images["qcow2"].read_bytes())
    data[72:80] = (1 << 40).to_bytes(8, "big")
    crafted.write_bytes(bytes(data))
    assert "unknown incompatible features" in refused(crafted, "qcow2")


def test_pure_helpers() -> None:
    assert detect_format(b"QFI\xfb" + b"\0" * 100) == "qcow2"
    assert detect_format(b"conectix" + b"\0" * 100) == "vpc"
    assert detect_format(b"\0" * 512) == "raw"
    gpt4k = bytearray(8192)
    gpt4k[4096:4104] = b"EFI PART"
    assert partition_table(bytes(gpt4k)) == ("gpt", 4096)
    from agent.inspect import ImageInfo

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

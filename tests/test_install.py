"""End-to-end installs through the real CLI: real HTTP on 127.0.0.1, real loop devices.

Every result message of SPEC.md's table is triggered here by its real cause, and the disk is
proven untouched when the failure comes before the write.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pycdlib
import pytest

from agent import messages as msg
from demo.sample_image import build_image

pytestmark = pytest.mark.root
MiB = 1024 * 1024
DISK = 128 * MiB


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )


def payload(url: str, image_type: str, **extra: str) -> dict:
    meta = {"imageURL": url, "imageType": image_type, **extra}
    return {
        "templateName": "byoi_64",
        "details": {"customHostname": "node-1"},
        "userMetadata": [{"key": k, "value": v} for k, v in meta.items()],
    }


def install(
    tmp_path: Path, body: dict, disk: str, *extra: str
) -> tuple[subprocess.CompletedProcess, dict]:
    f = tmp_path / "payload.json"
    f.write_text(json.dumps(body))
    work = tmp_path / "work"
    proc = run_cli(
        "install", "--payload", str(f), "--disk", disk, "--workdir", str(work), "--json", *extra
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    last = proc.stderr.strip().splitlines()[-1]
    assert last == result["message"], proc.stderr
    # nothing left behind in the workdir, and no tmpfs still mounted there
    assert not work.exists() or not any(work.iterdir())
    assert str(work) not in Path("/proc/mounts").read_text()
    return proc, result


def sfdisk_json(disk: str) -> dict:
    out = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["partitiontable"]


def disk_digest(disk: str) -> str:
    with open(disk, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fill_pattern(disk: str) -> str:
    with open(disk, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(os.urandom(size))
    return disk_digest(disk)


def read_config_drive(disk: str, part: dict, sector: int) -> dict[str, bytes]:
    with open(disk, "rb") as f:
        f.seek(part["start"] * sector)
        data = f.read(part["size"] * sector)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    files = {}
    for root, _dirs, names in iso.walk(rr_path="/"):
        for name in names:
            path = f"{root.rstrip('/')}/{name}".lstrip("/")
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path="/" + path)
            files[path] = out.getvalue()
    iso.close()
    return files


def blkid_at(disk: str, offset: int) -> dict[str, str]:
    out = subprocess.run(
        ["blkid", "-p", "-O", str(offset), "-o", "export", disk], capture_output=True, text=True
    )
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def image_partitions(raw: Path) -> list[dict]:
    out = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["partitiontable"]["partitions"]


def assert_partitions_equal(raw: Path, disk: str) -> None:
    """Every partition of the image is on the disk, byte for byte, at the same offset."""
    with open(raw, "rb") as img, open(disk, "rb") as dev:
        for part in image_partitions(raw):
            img.seek(part["start"] * 512)
            dev.seek(part["start"] * 512)
            size = part["size"] * 512
            assert img.read(size) == dev.read(size), f"partition at {part['start']} differs"


@pytest.mark.parametrize(
    ("fmt", "table", "algo"), [("qcow2", "gpt", "sha256"), ("raw", "dos", "md5")]
)
def test_install_success(tmp_path, http_dir, make_loop, fmt, table, algo) -> None:
    www, base_url = http_dir
    image = build_image(www / f"img.{fmt}", fmt=fmt, table=table)
    raw = image  # the reference is the served image's own content
    if fmt == "qcow2":
        raw = tmp_path / "reference.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True
        )
    digest = hashlib.new(algo, image.read_bytes()).hexdigest()
    disk = make_loop(DISK)
    user_data = "#!/bin/sh\necho user-data-ran\n"
    body = payload(
        f"{base_url}/img.{fmt}",
        fmt,
        imageCheckSum=digest,
        imageCheckSumType=algo,
        sshKey="ssh-ed25519 AAAAkey1 a@b\nssh-rsa AAAAkey2 c@d",
        configDriveUserData=user_data,
        configDriveMetadata=json.dumps({"role": "db"}),
    )
    proc, result = install(tmp_path, body, disk)
    assert proc.returncode == 0, proc.stderr
    assert result == {**result, "status": "done", "disk": disk, "message": msg.install_done(disk)}

    assert_partitions_equal(raw, disk)
    pt = sfdisk_json(disk)
    parts = pt["partitions"]
    assert len(parts) == len(image_partitions(raw)) + 1
    last = parts[-1]
    if table == "gpt":
        verify = subprocess.run(["sgdisk", "-v", disk], capture_output=True, text=True)
        assert "No problems found" in verify.stdout, verify.stdout
        with open(disk, "rb") as f:  # backup GPT header at the disk's last LBA
            f.seek(DISK - 512)
            assert f.read(8) == b"EFI PART"
        assert last.get("name") == "config-2"
    assert (last["start"] * 512) % MiB == 0
    probe = blkid_at(disk, last["start"] * 512)
    assert probe.get("LABEL") == "config-2" and probe.get("TYPE") == "iso9660", probe
    files = read_config_drive(disk, last, 512)
    meta = json.loads(files["openstack/latest/meta_data.json"])
    assert meta["hostname"] == "node-1"
    assert sorted(meta["public_keys"].values()) == [
        "ssh-ed25519 AAAAkey1 a@b",
        "ssh-rsa AAAAkey2 c@d",
    ]
    assert meta["meta"] == {"role": "db"}
    assert meta["uuid"]
    assert files["openstack/latest/user_data"] == user_data.encode()


def _expect_failure(tmp_path, body, disk, message, untouched=True, extra=()):
    before = fill_pattern(disk) if untouched else None
    proc, result = install(tmp_path, body, disk, *extra)
    assert proc.returncode == 1
    assert result["status"] == "error"
    assert result["message"] == message, proc.stderr
    if untouched:
        assert disk_digest(disk) == before, "the disk was written although the install failed"
    return result


def test_404(tmp_path, http_dir, make_loop) -> None:
    _www, base_url = http_dir
    url = f"{base_url}/missing.qcow2"
    result = _expect_failure(
        tmp_path,
        payload(url, "qcow2"),
        make_loop(DISK),
        f"Could not download image located: {url} .",
    )
    assert result["step"] == "download"


def test_checksum_mismatch(tmp_path, http_dir, make_loop) -> None:
    www, base_url = http_dir
    image = build_image(www / "img.qcow2", size_mib=24)
    actual = hashlib.sha1(image.read_bytes()).hexdigest()
    expected = "0" * 40
    body = payload(
        f"{base_url}/img.qcow2", "qcow2", imageCheckSum=expected, imageCheckSumType="sha1"
    )
    _expect_failure(
        tmp_path,
        body,
        make_loop(DISK),
        f"Bad sha1 for downloaded file, got: {actual} while expecting {expected}.",
    )


@pytest.mark.parametrize(("real", "declared"), [("qcow2", "raw"), ("raw", "qcow2")])
def test_declared_format_mismatch(tmp_path, http_dir, make_loop, real, declared) -> None:
    www, base_url = http_dir
    build_image(www / "img", fmt=real, size_mib=24)
    _expect_failure(
        tmp_path,
        payload(f"{base_url}/img", declared),
        make_loop(DISK),
        msg.format_mismatch(real, declared),
    )


def test_raw_without_table(tmp_path, http_dir, make_loop) -> None:
    www, base_url = http_dir
    fs = www / "fs.raw"
    with open(fs, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.vfat", "-n", "DATA", str(fs)], check=True, capture_output=True)
    result = _expect_failure(
        tmp_path,
        payload(f"{base_url}/fs.raw", "raw"),
        make_loop(DISK),
        msg.raw_without_partition_table("vfat filesystem labelled DATA"),
    )
    assert result["step"] == "inspect"


def test_image_larger_than_disk(tmp_path, http_dir, make_loop) -> None:
    www, base_url = http_dir
    build_image(www / "big.qcow2", size_mib=160)
    disk = make_loop(DISK)
    _expect_failure(
        tmp_path,
        payload(f"{base_url}/big.qcow2", "qcow2"),
        disk,
        f"image provided has a size of {160 * MiB} bytes which is larger than "
        f"{disk} of {DISK} bytes",
    )


def test_too_big_for_memory(tmp_path, http_dir, make_loop) -> None:
    """A (sparse) file larger than RAM - 3 GiB: refused from its Content-Length."""
    import psutil

    www, base_url = http_dir
    huge = www / "huge.raw"
    with open(huge, "wb") as f:
        f.truncate(psutil.virtual_memory().total + MiB)
    _expect_failure(
        tmp_path,
        payload(f"{base_url}/huge.raw", "raw"),
        make_loop(DISK),
        "Could not download, raw image is too big to download in memory.",
    )


def test_cant_write_failing_disk(tmp_path, http_dir) -> None:
    """A disk that fails mid-write: a loop device whose backing store runs out of space
    (an 8 MiB tmpfs behind a 128 MiB disk), so writes past that fail with I/O errors."""
    www, base_url = http_dir
    raw = build_image(tmp_path / "img.raw", fmt="raw", size_mib=48)
    with open(raw, "r+b") as f:  # incompressible data that must really reach the disk
        f.seek(20 * MiB)
        f.write(os.urandom(16 * MiB))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(www / "img.qcow2")],
        check=True,
    )
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(store)], check=True)
    disk = None
    try:
        backing = store / "disk.img"
        with open(backing, "wb") as f:
            f.truncate(DISK)
        disk = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
        ).stdout.strip()
        _expect_failure(
            tmp_path,
            payload(f"{base_url}/img.qcow2", "qcow2"),
            disk,
            "Can't write qcow2 on disk.",
            untouched=False,
        )
    finally:
        if disk:
            subprocess.run(["losetup", "-d", disk], capture_output=True)
        subprocess.run(["umount", "-l", str(store)], capture_output=True)


def test_gpt_cannot_be_moved(tmp_path, http_dir, make_loop) -> None:
    """Both GPT headers damaged: sgdisk cannot relocate the backup."""
    www, base_url = http_dir
    image = build_image(www / "broken.raw", fmt="raw", table="gpt", size_mib=24)
    data = bytearray(image.read_bytes())
    for header in (512, len(data) - 512):
        assert data[header : header + 8] == b"EFI PART"
        data[header + 16] ^= 0xFF  # header CRC32
        data[header + 88] ^= 0xFF  # partition entries CRC32
    image.write_bytes(bytes(data))
    _expect_failure(
        tmp_path,
        payload(f"{base_url}/broken.raw", "raw"),
        make_loop(DISK),
        msg.GPT_MOVE_FAILED,
        untouched=False,
    )


def test_no_room_for_config_drive(tmp_path, http_dir, make_loop) -> None:
    """An MBR image with four primary partitions leaves no slot for the config drive."""
    www, base_url = http_dir
    image = build_image(www / "full.raw", fmt="raw", table="dos", size_mib=48)
    # four primaries, the last one up to the end of the image (which is the disk's size)
    script = (
        "label: dos\nstart=2048, size=32768, type=ef, bootable\n"
        "start=34816, size=59392, type=83\nstart=94208, size=2048, type=83\n"
        "start=96256, type=83\n"
    )
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", str(image)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    _expect_failure(
        tmp_path,
        payload(f"{base_url}/full.raw", "raw"),
        make_loop(48 * MiB),
        msg.CONFIGDRIVE_FAILED,
        untouched=True,  # refused before the write: the disk is not wiped for a sure failure
    )


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"imageType": "iso"}, "Bad format image, expected: qcow2, raw."),
        ({"imageCheckSumType": "crc"}, "Please provide checkSum AND checkSumType or none of them"),
        (
            {"imageCheckSum": "ab", "imageCheckSumType": "crc"},
            "Bad checkSumType, expected: md5, sha1, sha256, sha512.",
        ),
    ],
)
def test_validation_refusals_via_cli(tmp_path, make_loop, meta, message) -> None:
    body = payload("http://127.0.0.1:9/x", "qcow2")
    for item in body["userMetadata"]:
        if item["key"] in meta:
            item["value"] = meta.pop(item["key"])
    body["userMetadata"] += [{"key": k, "value": v} for k, v in meta.items()]
    result = _expect_failure(tmp_path, body, make_loop(DISK), message)
    assert result["step"] == "validate"


def test_cli_misuse_exit_2(tmp_path) -> None:
    assert run_cli("install", "--bogus").returncode == 2
    assert run_cli("install", "--payload", str(tmp_path / "nope.json")).returncode == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = run_cli("install", "--payload", str(bad))
    assert proc.returncode == 2 and "not JSON" in proc.stderr
    assert run_cli("install", "--payload", "-", stdin="[").returncode == 2
    assert run_cli("frobnicate").returncode == 2


def build_4kn_image(path: Path, make_loop) -> Path:
    """A raw GPT image for 4096-byte sectors, partitioned on a 4Kn loop device (sgdisk then
    writes the 4Kn layout: GPT header at byte 4096)."""
    dev = make_loop(32 * MiB, sector_size=4096, name="4kn-source.img")
    subprocess.run(
        ["sgdisk", "-o", "-n1:256:+8M", "-t1:ef00", "-c1:EFI", "-n2:0:+8M", "-t2:8300", dev],
        check=True,
        capture_output=True,
    )
    with open(dev, "rb") as src:
        data = src.read()
    path.write_bytes(data)
    assert data[4096:4104] == b"EFI PART"
    return path


def test_install_4kn_disk_gets_fat_config_drive(tmp_path, http_dir, make_loop) -> None:
    www, base_url = http_dir
    build_4kn_image(www / "img4k.raw", make_loop)
    disk = make_loop(DISK, sector_size=4096)
    body = payload(f"{base_url}/img4k.raw", "raw", sshKey="ssh-ed25519 AAAA4k k@4k")
    proc, result = install(tmp_path, body, disk, "--firmware", "uefi")  # 4Kn boots by UEFI only
    assert proc.returncode == 0, proc.stderr
    verify = subprocess.run(["sgdisk", "-v", disk], capture_output=True, text=True)
    assert "No problems found" in verify.stdout, verify.stdout
    with open(disk, "rb") as f:
        f.seek(DISK - 4096)
        assert f.read(8) == b"EFI PART"
    pt = sfdisk_json(disk)
    assert pt.get("sectorsize", 4096) == 4096
    last = pt["partitions"][-1]
    probe = blkid_at(disk, last["start"] * 4096)
    assert probe.get("LABEL") == "CONFIG-2" and probe.get("TYPE") == "vfat", probe
    # read the FAT drive back with mtools at its offset
    meta = subprocess.run(
        ["mtype", "-i", f"{disk}@@{last['start'] * 4096}", "::/openstack/latest/meta_data.json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(meta)["public_keys"] == {"key-0": "ssh-ed25519 AAAA4k k@4k"}


REFUSED_ON_4KN = {  # image kind: (firmware that boots the disk, expected message, step)
    "gpt-512": ("uefi", lambda disk: msg.sector_size_mismatch(512, disk, 4096), "inspect"),
    "mbr": ("uefi", lambda disk: msg.mbr_on_large_sectors(disk, 4096), "inspect"),
    "gpt-4k-legacy": ("bios", lambda disk: msg.legacy_boot_sector_size(disk, 4096), "disk"),
}


@pytest.mark.parametrize("kind", list(REFUSED_ON_4KN))
def test_refused_on_4kn_disk(tmp_path, http_dir, make_loop, kind) -> None:
    """What a 4Kn disk cannot take, refused with nothing written: a GPT made for 512-byte
    sectors; an MBR image (it says nothing of its sector size: read with 4 KiB sectors, a
    512-byte image's partitions would point 8 times too far); and any image when legacy BIOS
    will boot the disk (agent/firmware.py), refused at the disk step, before the download."""
    www, base_url = http_dir
    image = www / f"{kind}.raw"
    if kind == "gpt-4k-legacy":
        build_4kn_image(image, make_loop)
    else:
        build_image(image, fmt="raw", table="gpt" if kind == "gpt-512" else "dos", size_mib=24)
    disk = make_loop(DISK, sector_size=4096)
    firmware, expected, step = REFUSED_ON_4KN[kind]
    result = _expect_failure(
        tmp_path,
        payload(f"{base_url}/{image.name}", "raw"),
        disk,
        expected(disk),
        extra=("--firmware", firmware),
    )
    assert result["step"] == step


def test_https_with_ca_bundle(tmp_path, https_dir, make_loop) -> None:
    """https: an unknown CA is refused (documented message); --ca-bundle makes it trusted."""
    www, base_url, ca_file = https_dir
    image = build_image(www / "img.qcow2", size_mib=24)
    digest = hashlib.sha512(image.read_bytes()).hexdigest()
    body = payload(
        f"{base_url}/img.qcow2", "qcow2", imageCheckSum=digest, imageCheckSumType="sha512"
    )
    disk = make_loop(DISK)
    _expect_failure(
        tmp_path, body, disk, f"Could not download image located: {base_url}/img.qcow2 ."
    )
    f = tmp_path / "payload-tls.json"
    f.write_text(json.dumps(body))
    proc = run_cli(
        "install",
        "--payload",
        str(f),
        "--disk",
        disk,
        "--workdir",
        str(tmp_path / "work"),
        "--ca-bundle",
        str(ca_file),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["status"] == "done"

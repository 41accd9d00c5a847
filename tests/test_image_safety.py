"""Unsafe or broken images are refused through the real CLI before anything is written.

Each image below was installed (or half-written) before inspection checked its integrity, its
partition table and its format with OpenStack's inspector. Here each one goes through a real
``byoi-agent install`` from a real HTTP server on 127.0.0.1 onto a real loop device filled with
a random pattern: exit 1, the exact message, the step ``inspect``, and the disk byte-identical
(its first and last MiB, and the whole of it).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from test_inspect import (
    build_iso,
    l2_entry_offset,
    patched,
    qemu_img,
    random_gpt_qcow2,
    to_qcow2,
)
from test_install import DISK, disk_digest, fill_pattern, install, payload

from agent import messages as msg
from demo.sample_image import build_image, build_raw

pytestmark = pytest.mark.root
MiB = 1 << 20


def ends(disk: str) -> tuple[bytes, bytes]:
    with open(disk, "rb") as f:
        first = f.read(MiB)
        f.seek(-MiB, os.SEEK_END)
        return first, f.read(MiB)


def check_corruptions(image: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(image)],
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)["corruptions"]


def truncated(d: Path) -> tuple[Path, str, str]:
    """A qcow2 cut to its first half, as a download cut short with no checksum would be."""
    full = random_gpt_qcow2(d)
    cut = d / "img"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    n = check_corruptions(cut)
    assert n > 0
    return cut, "qcow2", msg.damaged_image("qcow2", f"qemu-img check found {n} corruptions")


def misaligned(d: Path) -> tuple[Path, str, str]:
    """One L2 entry 512 bytes off: before, the disk was wiped and half written."""
    image = random_gpt_qcow2(d)
    at = l2_entry_offset(image, 300)
    entry = int.from_bytes(image.read_bytes()[at : at + 8], "big")
    bad = patched(image, d / "img", {at: (entry + 512).to_bytes(8, "big")})
    n = check_corruptions(bad)
    return bad, "qcow2", msg.damaged_image("qcow2", f"qemu-img check found {n} corruptions")


def bare_ext4_qcow2(d: Path) -> tuple[Path, str, str]:
    fs = d / "fs.raw"
    with open(fs, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "rootfs", str(fs)], check=True)
    contents = "ext4 filesystem labelled rootfs"
    return to_qcow2(fs, d / "img"), "qcow2", msg.qcow2_without_partition_table(contents)


def empty_qcow2(d: Path) -> tuple[Path, str, str]:
    qemu_img("create", "-f", "qcow2", str(d / "img"), "64M")
    contents = "nothing (no cluster holds data)"
    return d / "img", "qcow2", msg.qcow2_without_partition_table(contents)


def protective_mbr_only(d: Path) -> tuple[Path, str, str]:
    """A GPT disk image whose primary GPT was wiped: the protective MBR and the backup GPT
    at the end remain (a tool that 'recovers' from the backup would accept it)."""
    raw = build_raw(d / "gpt.raw", table="gpt", size_mib=24)
    image = patched(raw, d / "img", {512: bytes(33 * 512)})
    contents = "a protective MBR (type 0xEE) without a GPT header"
    return image, "raw", msg.raw_without_partition_table(contents)


def qed_declared_raw(d: Path) -> tuple[Path, str, str]:
    raw = build_image(d / "mbr.raw", fmt="raw", table="dos", size_mib=24)
    qemu_img("convert", "-f", "raw", "-O", "qed", str(raw), str(d / "img"))
    return d / "img", "raw", msg.format_mismatch("qed", "raw")


def qcow_v1_declared_qcow2(d: Path) -> tuple[Path, str, str]:
    raw = build_image(d / "mbr.raw", fmt="raw", table="dos", size_mib=24)
    qemu_img("convert", "-f", "raw", "-O", "qcow", str(raw), str(d / "img"))
    return d / "img", "qcow2", msg.format_mismatch("qcow", "qcow2")


def commented_vmdk_declared_raw(d: Path) -> tuple[Path, str, str]:
    """A text VMDK whose descriptor starts with a comment: qemu would open the flat extent
    it names, wherever that is."""
    flat = d / "flat.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "16M")
    (d / "img").write_text("# hand-written\n" + flat.read_text().replace("# Disk", "# A"))
    return d / "img", "raw", msg.format_mismatch("vmdk", "raw")


def iso_qcow2_polyglot(d: Path) -> tuple[Path, str, str]:
    qcow2 = build_image(d / "gpt.qcow2", fmt="qcow2", table="gpt", size_mib=24)
    build_iso(d / "img", system_area=qcow2.read_bytes()[: 32 * 1024])
    return d / "img", "qcow2", msg.ambiguous_format(["iso", "qcow2"])


CASES: list[Callable[[Path], tuple[Path, str, str]]] = [
    truncated,
    misaligned,
    bare_ext4_qcow2,
    empty_qcow2,
    protective_mbr_only,
    qed_declared_raw,
    qcow_v1_declared_qcow2,
    commented_vmdk_declared_raw,
    iso_qcow2_polyglot,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_before_writing(tmp_path, http_dir, make_loop, case) -> None:
    www, base_url = http_dir
    build = tmp_path / "build"
    build.mkdir()
    image, declared, message = case(build)
    image.rename(www / "img")
    disk = make_loop(DISK)
    before, (first, last) = fill_pattern(disk), ends(disk)
    proc, result = install(tmp_path, payload(f"{base_url}/img", declared), disk)
    assert proc.returncode == 1, proc.stderr
    assert (result["status"], result["step"]) == ("error", "inspect"), proc.stderr
    assert result["message"] == message, proc.stderr
    assert ends(disk) == (first, last), "the first or last MiB of the disk changed"
    assert disk_digest(disk) == before, "the disk was written although the image was refused"

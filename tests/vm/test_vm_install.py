"""End-to-end proof in virtual machines: the real agent installs a cloud image, and it boots.

Each test boots the rescue VM (Debian kernel + tiny initramfs that chroots into the host's root
over read-only 9p) which runs ``python -m agent install --json`` WITHOUT ``--disk``: the agent
finds the VM's virtio disk itself, downloads the image from an HTTP server on the host's
127.0.0.1 (10.0.2.2 in the guest), checks its sha256 and writes it. Then the same disk boots
under real firmware (OVMF or SeaBIOS) through a qcow2 overlay: the tiny OS in the image must
read the config drive (hostname, SSH key, user data script run) and see no GPT warning, and
firmware and guest must have written nothing (base disk hash unchanged, overlay identical to the
base): OVMF repairs a broken backup GPT during boot, so only an untouched overlay proves that the
agent, not the firmware, left a correct GPT.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qmp_harness import VM, Drive, VMConfig, VMError, between, build_command, markers

pytestmark = [pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
DISK_SIZE = 6 * 1024**3  # sparse; the agent's discovery ignores disks under 4 GiB
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByoiVmTestKeyOnlyForTheVmProof byoi@vm-test"
# The user data computes its output, so the marker below only appears if the script really ran.
USER_DATA = "#!/bin/sh\necho BYOI-UD-OUT $((6 * 7)) $(uname -s)\n"
USER_DATA_OUT = "BYOI-UD-OUT 42 Linux"
RESCUE_TIMEOUT = 300
BOOT_TIMEOUT = 240


def _fingerprint(path: Path) -> str:
    """sha256 of a sparse file's data extents with their offsets, size and mtime.

    Equal fingerprints mean equal content (holes read as zeros), and any write, even of zeros
    into a hole, changes it; reading only the extents keeps a 6 GiB sparse disk cheap.
    """
    h = hashlib.sha256()
    st = path.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < st.st_size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(f"@{start}-{end}".encode())
            os.lseek(fd, start, os.SEEK_SET)
            left = end - start
            while left:
                chunk = os.read(fd, min(left, 8 * 1024 * 1024))
                h.update(chunk)
                left -= len(chunk)
            pos = end
    finally:
        os.close(fd)
    return h.hexdigest()


def _payload(url: str, image: dict, hostname: str, extra: dict[str, str] | None = None) -> dict:
    body = {
        "templateName": "byoi_64",
        "details": {"customHostname": hostname},
        "userMetadata": [
            {"key": "imageURL", "value": url},
            {"key": "imageType", "value": image["format"]},
            {"key": "imageCheckSum", "value": image["sha256"]},
            {"key": "imageCheckSumType", "value": "sha256"},
            {"key": "sshKey", "value": SSH_KEY},
            {"key": "configDriveUserData", "value": USER_DATA},
        ],
    }
    for key, value in (extra or {}).items():
        body["userMetadata"].append({"key": key, "value": value})
    return body


def _rescue_install(
    start_vm,
    fixtures: dict,
    disk: Path,
    sector: int,
    payload: dict,
    xfer: Path,
    firmware: str = "bios",
    vars_file: Path | None = None,
) -> dict:
    """Boot the rescue VM on ``disk``; run the agent; return its JSON result line."""
    xfer.mkdir()
    (xfer / "payload.json").write_text(json.dumps(payload))
    (xfer / "run.sh").write_text(
        f"cd {REPO}\n"
        f"export PYTHONPATH={REPO}\n"
        f"exec {sys.executable} -m agent install --payload /run/xfer/payload.json --json\n"
    )
    vm = start_vm(
        name="rescue",
        memory_mb=4096,  # the agent keeps 3 GiB free besides the image (OVHcloud rule)
        kernel=Path(fixtures["kernel"]),
        initrd=Path(fixtures["rescue_initrd"]),
        append="console=ttyS0 quiet panic=-1",
        drives=[Drive(disk, fmt="raw", sector=sector, bootindex=None)],
        shares={"hostroot": (Path("/"), True), "xfer": (xfer, False)},
        network=True,
        firmware=firmware,
        vars_file=vars_file,
    )
    assert vm.status() == "running"
    block = {b["device"]: b for b in vm.command("query-block")}
    assert block["disk0"]["inserted"]["file"] == str(disk)
    assert block["disk0"]["inserted"]["ro"] is False
    vm.wait_for(r"^BYOI-RESCUE-(DONE|ERROR)", RESCUE_TIMEOUT)
    vm.wait_exit(60)
    console = vm.console()
    assert "BYOI-RESCUE-ERROR" not in console, console[-3000:]
    assert f"BYOI-RESCUE-DISK vda {DISK_SIZE // 512} {sector}" in console
    stdout = between(console, "BYOI-RESCUE-STDOUT-BEGIN", "BYOI-RESCUE-STDOUT-END")
    stderr = between(console, "BYOI-RESCUE-STDERR-BEGIN", "BYOI-RESCUE-STDERR-END")
    rc = markers(console, "BYOI-RESCUE-RC")
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, f"the agent printed no JSON line; stderr:\n{stderr}"
    result = json.loads(lines[-1])
    assert rc == ["0"], f"agent exit {rc}: {result}\n{stderr}"
    assert result["status"] == "done", f"{result}\n{stderr}"
    assert result["disk"] == "/dev/vda"
    return result


@contextlib.contextmanager
def overlay_boot(
    start_vm, disk: Path, tmp: Path, *, name: str, firmware: str, vars_file=None, **drive
) -> Iterator[VM]:
    """Boot ``disk`` through a qcow2 overlay (``drive``: the overlay's ``Drive`` fields); once
    the block is done with the VM, stop it and check that neither firmware nor guest wrote to
    the disk: the base unchanged and the overlay identical to it (OVMF repairs a broken backup
    GPT while booting, so only an untouched overlay proves the agent's GPT)."""
    before = _fingerprint(disk)
    overlay = tmp / f"overlay-{name}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw", str(overlay)],
        check=True,
        timeout=60,
    )
    vm = start_vm(
        name=name,
        memory_mb=512,
        firmware=firmware,
        drives=[Drive(overlay, fmt="qcow2", **drive)],
        vars_file=vars_file,
    )
    block = {b["device"]: b for b in vm.command("query-block")}["disk0"]["inserted"]
    assert block["file"] == str(overlay)
    assert block["backing_file"] == str(disk)
    yield vm
    vm.stop()
    assert _fingerprint(disk) == before, "the base disk changed during the boot"
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(disk), str(overlay)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cmp.returncode == 0, f"firmware or guest wrote to the disk: {cmp.stdout}{cmp.stderr}"


def _boot_installed(
    start_vm,
    fixtures: dict,
    disk: Path,
    firmware: str,
    sector: int,
    tmp: Path,
    vars_file: Path | None = None,
) -> str:
    """Boot the installed disk through a qcow2 overlay, to the tiny OS's end; the console."""
    # With an NVRAM from the install, no bootindex: the firmware follows its BootOrder.
    bootindex = None if vars_file else 0
    with overlay_boot(
        start_vm, disk, tmp, name=f"boot-{firmware}", firmware=firmware, vars_file=vars_file,
        sector=sector, bootindex=bootindex,
    ) as vm:  # fmt: skip
        vm.wait_for(r"^BYOI-TINY-DONE", BOOT_TIMEOUT)
        vm.wait_exit(60)
    return vm.console()


def _check_tiny_os(console: str, hostname: str, bootmode: str, fstype: str, sector: int) -> None:
    assert markers(console, "BYOI-BOOTMODE") == [bootmode]
    assert markers(console, "BYOI-SECTOR-SIZE") == [str(sector)]
    drive = markers(console, "BYOI-CONFIGDRIVE")
    assert len(drive) == 1 and drive[0].endswith(f" {fstype}"), drive
    meta = json.loads(between(console, "BYOI-META-BEGIN", "BYOI-META-END"))
    assert meta["hostname"] == hostname
    assert markers(console, "BYOI-HOSTNAME") == [hostname]
    assert SSH_KEY in meta["public_keys"].values()
    user_data = between(console, "BYOI-USERDATA-BEGIN", "BYOI-USERDATA-END")
    assert USER_DATA_OUT in user_data
    assert "BYOI-USERDATA-RC=0" in user_data
    assert "BYOI-GPT-WARNING" not in console, console
    assert 'LABEL="byoi-root"' in console  # the image's own root partition survived


def _install_then_boot(
    start_vm,
    fixtures,
    http_dir,
    tmp_path,
    image_name,
    firmware,
    bootmode,
    fstype,
    sector,
    *,
    extra: dict[str, str] | None = None,
    rescue_firmware: str = "bios",
    vars_file: Path | None = None,
) -> str:
    image = fixtures["images"][image_name]
    assert image["sector_size"] == sector
    www, base_url = http_dir
    src = Path(image["path"])
    shutil.copyfile(src, www / src.name)
    url = base_url.replace("127.0.0.1", "10.0.2.2") + "/" + src.name
    hostname = f"byoi-{image_name}-vm"
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    t0 = time.monotonic()
    payload = _payload(url, image, hostname, extra)
    _rescue_install(
        start_vm, fixtures, disk, sector, payload, tmp_path / "xfer", rescue_firmware, vars_file
    )
    t1 = time.monotonic()
    console = _boot_installed(start_vm, fixtures, disk, firmware, sector, tmp_path, vars_file)
    t2 = time.monotonic()
    _check_tiny_os(console, hostname, bootmode, fstype, sector)
    timings = {"install_s": round(t1 - t0, 1), "boot_s": round(t2 - t1, 1)}
    print(f"VM-TIMINGS {image_name}: {timings}")
    return console


def test_uefi_qcow2_install_boots_under_ovmf(vm_fixtures, start_vm, http_dir, tmp_path):
    _install_then_boot(
        start_vm, vm_fixtures, http_dir, tmp_path, "uefi", "uefi", "uefi", "iso9660", 512
    )
    # The backup GPT is where firmware and Linux expect it: sgdisk finds nothing to fix.
    verify = subprocess.run(
        ["sgdisk", "-v", str(tmp_path / "disk.raw")], capture_output=True, text=True, timeout=60
    )
    assert "No problems found" in verify.stdout, verify.stdout


def test_legacy_mbr_raw_install_boots_under_seabios(vm_fixtures, start_vm, http_dir, tmp_path):
    _install_then_boot(
        start_vm, vm_fixtures, http_dir, tmp_path, "bios", "bios", "bios", "iso9660", 512
    )
    # GRUB's boot code in the MBR and core.img in the gap survived the install.
    with open(tmp_path / "disk.raw", "rb") as f:
        head = f.read(1024 * 1024)
    image = Path(vm_fixtures["images"]["bios"]["path"]).read_bytes()[: 1024 * 1024]
    assert head[:440] == image[:440]
    assert head[512:] == image[512:]


def test_4kn_uefi_install_boots_under_ovmf(vm_fixtures, start_vm, http_dir, tmp_path):
    """The rescue itself boots under OVMF: the agent sees UEFI (agent/firmware.py) and takes
    the 4Kn disk, which a legacy-booted rescue refuses (tests/vm/test_vm_hardware.py)."""
    _install_then_boot(
        start_vm,
        vm_fixtures,
        http_dir,
        tmp_path,
        "uefi-4k",
        "uefi",
        "uefi",
        "vfat",
        4096,
        rescue_firmware="uefi",
    )


def test_uefi_rescue_creates_the_efi_boot_entry_the_firmware_follows(
    vm_fixtures, start_vm, http_dir, tmp_path
):
    """efiBootloaderPath: the rescue VM runs under OVMF (efivarfs), the agent adds an NVRAM
    entry, and the next boot with that NVRAM starts the image's loader through that entry."""
    nvram = tmp_path / "OVMF_VARS.fd"
    console = _install_then_boot(
        start_vm,
        vm_fixtures,
        http_dir,
        tmp_path,
        "uefi",
        "uefi",
        "uefi",
        "iso9660",
        512,
        extra={"efiBootloaderPath": "/EFI/byoi/grubx64.efi"},
        rescue_firmware="uefi",
        vars_file=nvram,
    )
    started = re.findall(r'BdsDxe: starting (Boot[0-9A-F]{4}) "([^"]*)" from (.*)$', console, re.M)
    assert started, console[:2000]
    assert started[0][1] == "byoi", started
    assert "\\EFI\\byoi\\grubx64.efi" in started[0][2].replace("/", "\\"), started


def test_gpt_check_catches_an_unmoved_backup_gpt(vm_fixtures, start_vm, tmp_path):
    """Negative control: the image written WITHOUT moving the backup GPT must be caught.

    Proves the GPT-warning marker and the overlay check are able to fail.
    """
    disk = tmp_path / "disk.raw"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            vm_fixtures["images"]["uefi"]["path"],
            str(disk),
        ],
        check=True,
        timeout=120,
    )
    os.truncate(disk, 1024**3)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw", str(overlay)],
        check=True,
        timeout=60,
    )
    vm = start_vm(name="negative", firmware="uefi", drives=[Drive(overlay, fmt="qcow2")])
    vm.wait_for(r"^BYOI-TINY-DONE", BOOT_TIMEOUT)
    console = vm.console()
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(disk), str(overlay)],
        capture_output=True,
        timeout=300,
    )
    # Either Linux warned, or the firmware silently rewrote the GPT: both must be visible.
    assert "BYOI-GPT-WARNING" in console or cmp.returncode != 0
    assert markers(console, "BYOI-CONFIGDRIVE") == ["none"]


def test_qemu_command_line_is_what_the_proof_needs(tmp_path):
    """The pure command builder: 4Kn geometry, overlay-free base, read-only host share."""
    cfg = VMConfig(
        name="x",
        workdir=tmp_path,
        firmware="uefi",
        drives=[Drive(tmp_path / "d.qcow2", fmt="qcow2", sector=4096)],
        shares={"hostroot": (Path("/"), True)},
    )
    cmd = build_command(cfg, tmp_path / "q.sock", tmp_path / "s.log")
    joined = " ".join(cmd)
    assert "logical_block_size=4096,physical_block_size=4096" in joined
    assert "mount_tag=hostroot" in joined and "readonly=on" in joined
    assert "-no-reboot" in cmd and "-nic" in cmd and cmd[cmd.index("-nic") + 1] == "none"
    assert any("OVMF_CODE_4M.fd" in a and "readonly=on" in a for a in cmd)


def test_wait_for_reports_the_console_on_timeout(tmp_path):
    """A VM that never prints the marker fails with the console tail, and is stopped."""
    vm = VM(VMConfig(name="idle", workdir=tmp_path, memory_mb=64))
    with vm, pytest.raises(VMError, match="no 'NEVER-PRINTED' within"):
        vm.wait_for("NEVER-PRINTED", 2)
    assert vm.proc is not None and vm.proc.poll() is not None

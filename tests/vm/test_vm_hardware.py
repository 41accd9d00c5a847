"""Real server hardware in one VM: NVMe, two SATA disks (AHCI), virtio-scsi, a USB stick, a CD.

One rescue VM (booted like tests/vm/test_vm_install.py's: the host's root over 9p, the agent
from this tree, no udevd) carries every kind of disk. Inside it the test runs
``byoi-agent disks --json`` and then three installs in a row, pausing after each so that the
host can fingerprint every backing file: the install with no ``--disk`` must land on the NVMe
(the default choice, disk group 1), the one with ``diskGroupId`` 2 on the first SATA disk, the
one with a ``by_path`` hint (udev's compat name, derived from sysfs) on the second SATA disk,
each on that disk ONLY (every other backing file unchanged). Then the NVMe disk boots under OVMF
and the first SATA disk under SeaBIOS, each reading its config drive.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qmp_harness import VM, Drive, VMError, between, markers
from test_vm_install import _check_tiny_os, _fingerprint, _payload

pytestmark = [pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3
STEP_TIMEOUT = 400
BOOT_TIMEOUT = 240
WWN = 0x5000C500A1B2C3D1
# key: (bus, size, serial); the order sets the AHCI ports (SATA 1, 2, then the CD on port 3)
DISKS = {
    "nvme": ("nvme", 8 * GiB, "NVME-OS-1"),
    "sata1": ("sata", 10 * GiB, "SATA-DATA-1"),
    "sata2": ("sata", 10 * GiB, "SATA-DATA-2"),
    "cdrom": ("cdrom", 4 * 1024**2, "CDROM-5"),
    "scsi": ("scsi", 12 * GiB, "SCSI-DATA-3"),
    "usb": ("usb", 6 * GiB, "USB-STICK-4"),
}
BY_PATH = {
    "nvme": "pci-0000:00:10.0-nvme-1",
    "sata1": "pci-0000:00:1f.2-ata-1.0",
    "sata2": "pci-0000:00:1f.2-ata-2.0",
    "cdrom": "pci-0000:00:1f.2-ata-3.0",
    "scsi": "pci-0000:00:11.0-scsi-0:0:1:0",
    "usb": "pci-0000:00:12.0-usb-0:1:1.0-scsi-0:0:0:0",
}
HINT = "pci-0000:00:1f.2-ata-2"  # udev's ID_PATH_ATA_COMPAT name of the second SATA disk
STEPS = ("default", "group", "hint")
EXPECTED_TARGET = {"default": "nvme", "group": "sata1", "hint": "sata2"}


def _run_script(xfer: Path) -> str:
    py = sys.executable
    lines = [
        f"cd {REPO}",
        f"export PYTHONPATH={REPO}",
        "X=/run/xfer",
        # usb-storage and the SCSI scans probe asynchronously: wait for the six disks
        "n=0",
        "while [ \"$(ls /sys/block | grep -cE '^(nvme|sd|sr)')\" -lt 6 ] && [ $n -lt 240 ]; do",
        "  sleep 0.25; n=$((n + 1))",
        "done",
        "ls /sys/block > $X/block.txt",
        f"{py} -m agent disks --json > $X/disks.json 2> $X/disks.err",
        "step() {",
        "  name=$1; shift",
        f'  {py} -m agent install --payload $X/$name-payload.json --json "$@"'
        " > $X/$name.json 2> $X/$name.err",
        "  echo $? > $X/$name.rc",
        "  sync",
        "  touch $X/$name.done",
        "  while [ ! -e $X/$name.go ]; do sleep 0.2; done",
        "}",
        "step default",
        "step group",
        f"step hint --hint by_path={HINT}",
        "echo all-steps-ran",
    ]
    return "\n".join(lines) + "\n"


def _wait_file(vm: VM, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if vm.proc is not None and vm.proc.poll() is not None:
            raise VMError(f"the rescue VM ended before {path.name}\n{vm.console()[-3000:]}")
        if time.monotonic() > deadline:
            raise VMError(f"no {path.name} within {timeout:.0f}s\n{vm.console()[-3000:]}")
        time.sleep(0.2)


def _disk_files(tmp: Path) -> dict[str, Path]:
    files = {}
    for key, (_bus, size, _serial) in DISKS.items():
        files[key] = tmp / f"{key}.raw"
        with open(files[key], "wb") as f:
            f.truncate(size)
    return files


def _check_report(report: dict) -> dict[str, dict]:
    """The disks --json of the mixed VM, checked; returns the disks by our key."""
    by_serial = {d["serial"]: d for d in report["disks"] if d["serial"]}
    disks = {key: by_serial.get(serial) for key, (_b, _s, serial) in DISKS.items()}
    missing = [key for key, disk in disks.items() if disk is None]
    assert not missing, f"no disk with the serial of {missing}: {json.dumps(report, indent=1)}"
    transports = {key: d["transport"] for key, d in disks.items()}
    assert transports == {
        "nvme": "nvme",
        "sata1": "sata",
        "sata2": "sata",
        "cdrom": "sata",
        "scsi": "scsi",
        "usb": "usb",
    }
    for key, disk in disks.items():
        assert disk["by_path"] == f"/dev/disk/by-path/{BY_PATH[key]}", (key, disk["by_path"])
    eligible = {key: (d["eligible"], d["reason"]) for key, d in disks.items()}
    for key in ("nvme", "sata1", "sata2", "scsi"):
        assert eligible[key] == (True, "eligible"), (key, eligible[key])
    assert eligible["cdrom"] == (False, "optical drive")
    assert not eligible["usb"][0] and eligible["usb"][1].startswith("USB-attached")
    assert disks["nvme"]["name"] == "nvme0n1" and disks["cdrom"]["name"] == "sr0"
    assert disks["sata1"]["wwn"] == f"{WWN:#x}" and disks["scsi"]["wwn"] == f"{WWN + 2:#x}"
    assert disks["sata2"]["wwn"] is None and disks["sata2"]["wwid"].startswith("t10.ATA")
    groups = [(g["id"], g["technology"], g["size"], g["disks"]) for g in report["diskGroups"]]
    path = {key: d["path"] for key, d in disks.items()}
    assert groups == [
        (1, "NVMe", 8 * GiB, [path["nvme"]]),
        (2, "HDD", 10 * GiB, [path["sata1"], path["sata2"]]),
        (3, "HDD", 12 * GiB, [path["scsi"]]),
    ]
    assert report["chosen"] == path["nvme"]
    return disks


def _boot(start_vm, fixtures: dict, disk: Path, bus: str, firmware: str, tmp: Path) -> str:
    """Boot an installed backing file through a qcow2 overlay on ``bus``; its console."""
    overlay = tmp / f"boot-{bus}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw", str(overlay)],
        check=True,
        timeout=60,
    )
    vm = start_vm(
        name=f"boot-{bus}-{firmware}",
        memory_mb=512,
        firmware=firmware,
        drives=[Drive(overlay, fmt="qcow2", bus=bus, bootindex=0, serial="BOOT-1")],
    )
    vm.wait_for(r"^BYOI-TINY-DONE", BOOT_TIMEOUT)
    vm.wait_exit(60)
    return vm.console()


def test_mixed_hardware_disks_groups_and_targets(vm_fixtures, start_vm, http_dir, tmp_path):
    www, base_url = http_dir
    base_url = base_url.replace("127.0.0.1", "10.0.2.2")
    images = {name: vm_fixtures["images"][name] for name in ("uefi", "bios")}
    for image in images.values():
        src = Path(image["path"])
        (www / src.name).write_bytes(src.read_bytes())
    files = _disk_files(tmp_path)
    xfer = tmp_path / "xfer"
    xfer.mkdir()
    payloads = {
        "default": _payload(f"{base_url}/uefi.qcow2", images["uefi"], "byoi-nvme"),
        "group": _payload(f"{base_url}/bios.raw", images["bios"], "byoi-sata"),
        "hint": _payload(f"{base_url}/uefi.qcow2", images["uefi"], "byoi-hint"),
    }
    payloads["group"]["details"]["diskGroupId"] = 2
    for name, body in payloads.items():
        (xfer / f"{name}-payload.json").write_text(json.dumps(body))
    (xfer / "run.sh").write_text(_run_script(xfer))
    wwns = {"sata1": WWN, "scsi": WWN + 2}
    drives = [
        Drive(files[key], bus=bus, serial=serial, bootindex=None, wwn=wwns.get(key))
        for key, (bus, _size, serial) in DISKS.items()
    ]
    prints = {key: _fingerprint(f) for key, f in files.items()}
    t0 = time.monotonic()
    vm = start_vm(
        name="rescue-hw",
        memory_mb=4096,
        kernel=Path(vm_fixtures["kernel"]),
        initrd=Path(vm_fixtures["rescue_initrd"]),
        append="console=ttyS0 quiet panic=-1 usb-storage.delay_use=0",
        drives=drives,
        shares={"hostroot": (Path("/"), True), "xfer": (xfer, False)},
        network=True,
    )
    timings: dict[str, float] = {}
    changed: dict[str, set[str]] = {}
    for step in STEPS:
        _wait_file(vm, xfer / f"{step}.done", STEP_TIMEOUT)
        timings[step] = round(time.monotonic() - t0, 1)
        now = {key: _fingerprint(f) for key, f in files.items()}
        changed[step] = {key for key in files if now[key] != prints[key]}
        prints = now
        (xfer / f"{step}.go").touch()
    vm.wait_for(r"^BYOI-RESCUE-(DONE|ERROR)", 120)
    vm.wait_exit(60)
    timings["rescue_total"] = round(time.monotonic() - t0, 1)
    console = vm.console()
    assert "BYOI-RESCUE-ERROR" not in console, console[-3000:]
    assert markers(console, "BYOI-RESCUE-RC") == ["0"], console[-3000:]
    assert "all-steps-ran" in between(console, "BYOI-RESCUE-STDOUT-BEGIN", "BYOI-RESCUE-STDOUT-END")

    report = json.loads((xfer / "disks.json").read_text())
    print("MIXED-VM-DISKS-JSON " + json.dumps(report))
    disks = _check_report(report)
    for step in STEPS:
        result = json.loads((xfer / f"{step}.json").read_text().strip().splitlines()[-1])
        target = EXPECTED_TARGET[step]
        err = (xfer / f"{step}.err").read_text()
        assert result["status"] == "done", f"{step}: {result}\n{err}"
        assert result["disk"] == disks[target]["path"], (step, result["disk"])
        assert changed[step] == {target}, f"{step} wrote {changed[step]}, not only {target}"
    for key in ("nvme", "sata2"):  # GPT images: the backup GPT is at the end of the new disk
        verify = subprocess.run(
            ["sgdisk", "-v", str(files[key])], capture_output=True, text=True, timeout=60
        )
        assert "No problems found" in verify.stdout, (key, verify.stdout)

    t1 = time.monotonic()
    nvme_console = _boot(start_vm, vm_fixtures, files["nvme"], "nvme", "uefi", tmp_path)
    _check_tiny_os(nvme_console, "byoi-nvme", "uefi", "iso9660", 512)
    timings["boot_nvme_ovmf"] = round(time.monotonic() - t1, 1)
    t2 = time.monotonic()
    sata_console = _boot(start_vm, vm_fixtures, files["sata1"], "sata", "bios", tmp_path)
    _check_tiny_os(sata_console, "byoi-sata", "bios", "iso9660", 512)
    timings["boot_sata_seabios"] = round(time.monotonic() - t2, 1)
    print(f"VM-TIMINGS mixed-hardware: {timings}")

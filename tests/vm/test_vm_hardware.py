"""Real server hardware in one VM: two NVMe (one 4Kn), two SATA disks (AHCI), virtio-scsi, a USB
stick and a CD-ROM.

One rescue VM (booted like tests/vm/test_vm_install.py's: the host's root over 9p, the agent
from this tree, no udevd) carries every kind of disk. Inside it the test runs
``byoi-agent disks --json`` and then five installs in a row, pausing after each so that the
host can fingerprint every backing file: the install with no ``--disk`` must land on the 512-byte
NVMe (the default choice, disk group 1); ``diskGroupId`` 2 (the 4Kn NVMe) is refused, because the
rescue booted through SeaBIOS and legacy BIOS cannot boot a 4Kn disk (agent/firmware.py), with
no disk touched; with ``--firmware uefi`` it lands on the 4Kn NVMe; ``diskGroupId`` 3
on the first SATA disk of the two (natural name order), a ``by_path`` hint (udev's compat name,
derived from sysfs) on the other SATA disk, each on that disk ONLY (every other backing file
unchanged). Then the NVMe disk boots under OVMF, the 4Kn NVMe under OVMF and group 3's SATA disk
under SeaBIOS, each reading its config drive.

The guest kernel probes the AHCI ports asynchronously, so which SATA disk is ``sda`` varies from
boot to boot: the host reads group 3 from the VM's report and only then names the hint's port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qmp_harness import VM, Drive, VMConfig, VMError, between, build_command, markers
from test_vm_install import _check_tiny_os, _fingerprint, _payload, overlay_boot

from agent import messages as msg

pytestmark = [pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3
STEP_TIMEOUT = 400
BOOT_TIMEOUT = 240
WWN = 0x5000C500A1B2C3D1
# key: (bus, size, serial, sector); the order sets the AHCI ports (SATA 1, 2, the CD on 3)
DISKS = {
    "nvme": ("nvme", 8 * GiB, "NVME-OS-1", 512),
    "nvme4k": ("nvme", 9 * GiB, "NVME-4KN-2", 4096),
    "sata1": ("sata", 10 * GiB, "SATA-DATA-1", 512),
    "sata2": ("sata", 10 * GiB, "SATA-DATA-2", 512),
    "cdrom": ("cdrom", 4 * 1024**2, "CDROM-5", 512),
    "scsi": ("scsi", 12 * GiB, "SCSI-DATA-3", 512),
    "usb": ("usb", 6 * GiB, "USB-STICK-4", 512),
}
BY_PATH = {
    "nvme": "pci-0000:00:10.0-nvme-1",
    "nvme4k": "pci-0000:00:13.0-nvme-1",
    "sata1": "pci-0000:00:1f.2-ata-1.0",
    "sata2": "pci-0000:00:1f.2-ata-2.0",
    "cdrom": "pci-0000:00:1f.2-ata-3.0",
    "scsi": "pci-0000:00:11.0-scsi-0:0:1:0",
    "usb": "pci-0000:00:12.0-usb-0:1:1.0-scsi-0:0:0:0",
}
STEPS = ("default", "legacy4kn", "group2", "group3", "hint")
PLACED = ("default", "group2", "group3", "hint")  # the steps that install


def _run_script(xfer: Path) -> str:
    py = sys.executable
    lines = [
        f"cd {REPO}",
        f"export PYTHONPATH={REPO}",
        "X=/run/xfer",
        # usb-storage and the SCSI scans probe asynchronously: wait for the seven disks
        "n=0",
        "while [ \"$(ls /sys/block | grep -cE '^(nvme|sd|sr)')\" -lt 7 ] && [ $n -lt 240 ]; do",
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
        "step legacy4kn",
        "step group2 --firmware uefi",
        "step group3",
        # the host writes hint.arg (by_path=<port of the SATA disk group 3 did not take>)
        'step hint --hint "$(cat $X/hint.arg)"',
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
    for key, (_bus, size, _serial, _sector) in DISKS.items():
        files[key] = tmp / f"{key}.raw"
        with open(files[key], "wb") as f:
            f.truncate(size)
    return files


def _check_report(report: dict) -> dict[str, dict]:
    """The disks --json of the mixed VM, checked; returns the disks by our key."""
    by_serial = {d["serial"]: d for d in report["disks"] if d["serial"]}
    disks = {key: by_serial.get(serial) for key, (_b, _s, serial, _l) in DISKS.items()}
    missing = [key for key, disk in disks.items() if disk is None]
    assert not missing, f"no disk with the serial of {missing}: {json.dumps(report, indent=1)}"
    transports = {key: d["transport"] for key, d in disks.items()}
    assert transports == {
        "nvme": "nvme",
        "nvme4k": "nvme",
        "sata1": "sata",
        "sata2": "sata",
        "cdrom": "sata",
        "scsi": "scsi",
        "usb": "usb",
    }
    for key, disk in disks.items():
        assert disk["by_path"] == f"/dev/disk/by-path/{BY_PATH[key]}", (key, disk["by_path"])
    eligible = {key: (d["eligible"], d["reason"]) for key, d in disks.items()}
    for key in ("nvme", "nvme4k", "sata1", "sata2", "scsi"):
        assert eligible[key] == (True, "eligible"), (key, eligible[key])
    assert eligible["cdrom"] == (False, "optical drive")
    assert not eligible["usb"][0] and eligible["usb"][1].startswith("USB-attached")
    assert disks["cdrom"]["name"] == "sr0"
    assert disks["nvme4k"]["logical_sector_size"] == 4096
    assert disks["sata1"]["wwn"] == f"{WWN:#x}" and disks["scsi"]["wwn"] == f"{WWN + 2:#x}"
    assert disks["sata2"]["wwn"] is None and disks["sata2"]["wwid"].startswith("t10.ATA")
    groups = [(g["id"], g["technology"], g["size"], g["disks"]) for g in report["diskGroups"]]
    path = {key: d["path"] for key, d in disks.items()}
    assert groups == [
        (1, "NVMe", 8 * GiB, [path["nvme"]]),
        (2, "NVMe", 9 * GiB, [path["nvme4k"]]),
        (3, "HDD", 10 * GiB, sorted([path["sata1"], path["sata2"]])),  # sda before sdb
        (4, "HDD", 12 * GiB, [path["scsi"]]),
    ]
    assert report["chosen"] == path["nvme"]
    return disks


def _targets(disks: dict[str, dict]) -> dict[str, str]:
    """Where each step must land: group 3 takes the SATA disk the kernel named first."""
    group3, other = sorted(("sata1", "sata2"), key=lambda key: disks[key]["path"])
    return {"default": "nvme", "group2": "nvme4k", "group3": group3, "hint": other}


def _check_legacy_refusal(xfer: Path, disks: dict[str, dict], changed: set[str]) -> None:
    """The 4Kn group under a SeaBIOS-booted rescue: refused before the download, nothing written."""
    result = json.loads((xfer / "legacy4kn.json").read_text().strip().splitlines()[-1])
    device = disks["nvme4k"]["path"]
    assert result["status"] == "error", result
    assert result["step"] == "disk", result
    assert result["message"] == msg.legacy_boot_sector_size(device, 4096), result
    assert (xfer / "legacy4kn.rc").read_text().strip() == "1"
    assert not changed, f"the refused install wrote {changed}"


def _compat_hint(key: str) -> str:
    """udev's ID_PATH_ATA_COMPAT form of a SATA disk's path (``...-ata-2``, no ``.0``)."""
    assert BY_PATH[key].endswith(".0"), BY_PATH[key]
    return f"by_path={BY_PATH[key][: -len('.0')]}"


def _boot(disk: Path, bus: str, sector: int, firmware: str, start_vm, tmp: Path) -> str:
    """Boot an installed backing file through a qcow2 overlay on ``bus``; its console."""
    with overlay_boot(
        start_vm, disk, tmp, name=f"boot-{disk.stem}-{firmware}", firmware=firmware,
        bus=bus, sector=sector, bootindex=0, serial="BOOT-1",
    ) as vm:  # fmt: skip
        vm.wait_for(r"^BYOI-TINY-DONE", BOOT_TIMEOUT)
        vm.wait_exit(60)
    return vm.console()


def test_mixed_hardware_disks_groups_and_targets(vm_fixtures, start_vm, http_dir, tmp_path):
    www, base_url = http_dir
    base_url = base_url.replace("127.0.0.1", "10.0.2.2")
    images = {name: vm_fixtures["images"][name] for name in ("uefi", "uefi-4k", "bios")}
    for image in images.values():
        src = Path(image["path"])
        (www / src.name).write_bytes(src.read_bytes())
    files = _disk_files(tmp_path)
    xfer = tmp_path / "xfer"
    xfer.mkdir()
    payloads = {
        "default": _payload(f"{base_url}/uefi.qcow2", images["uefi"], "byoi-nvme"),
        "legacy4kn": _payload(f"{base_url}/uefi-4k.qcow2", images["uefi-4k"], "byoi-nvme-4kn"),
        "group2": _payload(f"{base_url}/uefi-4k.qcow2", images["uefi-4k"], "byoi-nvme-4kn"),
        "group3": _payload(f"{base_url}/bios.raw", images["bios"], "byoi-sata"),
        "hint": _payload(f"{base_url}/uefi.qcow2", images["uefi"], "byoi-hint"),
    }
    payloads["legacy4kn"]["details"]["diskGroupId"] = 2
    payloads["group2"]["details"]["diskGroupId"] = 2
    payloads["group3"]["details"]["diskGroupId"] = 3
    for name, body in payloads.items():
        (xfer / f"{name}-payload.json").write_text(json.dumps(body))
    (xfer / "run.sh").write_text(_run_script(xfer))
    wwns = {"sata1": WWN, "scsi": WWN + 2}
    drives = [
        Drive(files[key], bus=bus, serial=serial, sector=sector, bootindex=None, wwn=wwns.get(key))
        for key, (bus, _size, serial, sector) in DISKS.items()
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
    targets: dict[str, str] = {}
    for step in STEPS:
        _wait_file(vm, xfer / f"{step}.done", STEP_TIMEOUT)
        timings[step] = round(time.monotonic() - t0, 1)
        now = {key: _fingerprint(f) for key, f in files.items()}
        changed[step] = {key for key in files if now[key] != prints[key]}
        prints = now
        if step == "group3":
            targets = _targets(_check_report(json.loads((xfer / "disks.json").read_text())))
            (xfer / "hint.arg").write_text(_compat_hint(targets["hint"]))
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
    _check_legacy_refusal(xfer, disks, changed["legacy4kn"])
    for step in PLACED:
        result = json.loads((xfer / f"{step}.json").read_text().strip().splitlines()[-1])
        target = targets[step]
        err = (xfer / f"{step}.err").read_text()
        assert result["status"] == "done", f"{step}: {result}\n{err}"
        assert result["disk"] == disks[target]["path"], (step, result["disk"])
        assert changed[step] == {target}, f"{step} wrote {changed[step]}, not only {target}"
    for key in ("nvme", "nvme4k", targets["hint"]):  # GPT images: backup GPT at the new end
        verify = subprocess.run(
            ["sgdisk", "-v", str(files[key])], capture_output=True, text=True, timeout=60
        )
        assert "No problems found" in verify.stdout, (key, verify.stdout)

    boots = (  # (disk, bus, sector, firmware, hostname, boot mode, config drive fs)
        ("nvme", "nvme", 512, "uefi", "byoi-nvme", "uefi", "iso9660"),
        ("nvme4k", "nvme", 4096, "uefi", "byoi-nvme-4kn", "uefi", "vfat"),
        (targets["group3"], "sata", 512, "bios", "byoi-sata", "bios", "iso9660"),
    )
    for key, bus, sector, firmware, hostname, mode, fstype in boots:
        t1 = time.monotonic()
        console = _boot(files[key], bus, sector, firmware, start_vm, tmp_path)
        _check_tiny_os(console, hostname, mode, fstype, sector)
        timings[f"boot_{key}_{'ovmf' if firmware == 'uefi' else 'seabios'}"] = round(
            time.monotonic() - t1, 1
        )
    print(f"VM-TIMINGS mixed-hardware: {timings}")


def test_qemu_command_line_places_each_bus(tmp_path):
    """The pure command builder: one controller per bus at its fixed slot, AHCI ports in order."""
    drives = [
        Drive(tmp_path / "n.raw", bus="nvme", serial="N1", sector=4096),
        Drive(tmp_path / "a.raw", bus="sata", serial="A1", wwn=WWN),
        Drive(tmp_path / "c.iso", bus="cdrom", bootindex=None),
        Drive(tmp_path / "s.raw", bus="scsi", serial="S1"),
        Drive(tmp_path / "t.raw", bus="scsi", serial="S2"),
        Drive(tmp_path / "u.raw", bus="usb", serial="U1"),
    ]
    cfg = VMConfig(name="x", workdir=tmp_path, drives=drives)
    devices = [a for a in build_command(cfg, tmp_path / "q", tmp_path / "s") if "drive=" in a]
    assert devices == [
        "nvme,drive=disk0,id=nvme0,addr=0x10,serial=N1,logical_block_size=4096,"
        "physical_block_size=4096,bootindex=0",
        f"ide-hd,drive=disk1,id=ata1,bus=ide.0,serial=A1,wwn={WWN:#x},bootindex=0",
        "ide-cd,drive=disk2,id=ata2,bus=ide.1",
        "scsi-hd,drive=disk3,id=scsi3,bus=scsi0.0,scsi-id=1,lun=0,serial=S1,bootindex=0",
        "scsi-hd,drive=disk4,id=scsi4,bus=scsi0.0,scsi-id=2,lun=0,serial=S2,bootindex=0",
        "usb-storage,drive=disk5,id=usb5,bus=xhci.0,port=1,serial=U1,bootindex=0",
    ]
    joined = " ".join(build_command(cfg, tmp_path / "q", tmp_path / "s"))
    assert joined.count("virtio-scsi-pci,id=scsi0,addr=0x11") == 1
    assert joined.count("qemu-xhci,id=xhci,addr=0x12") == 1
    assert "media=cdrom" in joined

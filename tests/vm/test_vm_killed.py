"""A killed install does not boot: real firmware finds nothing on the disk it left.

The disk first holds a complete install of the image (an old, bootable system). A second
install of the same image onto it is frozen at its last point (``head``: the body, the read-back,
the config drive and the backup GPT are on the disk, only the first MiB is still zero) and
killed with SIGKILL, as systemd's stop timeout, the OOM killer or a power cut would. The disk's
backing file then boots through a qcow2 overlay under the firmware the image is made for:
SeaBIOS must report "not a bootable disk" and OVMF must fail its boot option and find no file
system, the image's own OS must not start, and the firmware must write nothing to the disk.

tests/test_crash.py kills the agent at more points on loop devices (no partition table left,
the next install succeeds); this proves the same disk is unbootable for firmware, which is what
keeps a half-written server from coming up with a half-written system.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_vm_install import DISK_SIZE, _payload, overlay_boot

pytestmark = [pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
NO_BOOT_TIMEOUT = 180
FIRMWARE_GIVES_UP = {  # what each firmware says when the disk has nothing to boot
    "bios": (r"Boot failed: not a bootable disk", "firmware"),
    "uefi": (r'BdsDxe: failed to load Boot\d+ "UEFI Misc Device"[^\n]*Not Found', "console"),
}


def _agent(tmp: Path, body: dict, dev: str, freeze: str | None = None) -> subprocess.Popen[str]:
    payload = tmp / f"payload-{freeze or 'full'}.json"
    payload.write_text(json.dumps(body))
    env = dict(os.environ)
    if freeze:
        env["BYOI_TEST_FREEZE_AT"] = freeze
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "install", "--payload", str(payload), "--disk", dev]
        + ["--workdir", str(tmp / "work"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _kill_at_head(tmp: Path, body: dict, dev: str) -> None:
    proc = _agent(tmp, body, dev, "head")
    assert proc.stderr is not None
    for line in proc.stderr:
        if "frozen at head" in line:
            break
    else:
        raise AssertionError(f"the install ended before the head: exit {proc.wait()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    work = tmp / "work"  # the killed agent cannot unmount its tmpfs
    for line in Path("/proc/mounts").read_text().splitlines():
        if line.split()[1].startswith(str(work)):
            subprocess.run(["umount", "-l", line.split()[1]], capture_output=True, timeout=60)


@pytest.mark.parametrize(
    ("image_name", "firmware"), [("bios", "bios"), ("uefi", "uefi")], ids=["seabios", "ovmf"]
)
def test_killed_install_does_not_boot(
    image_name, firmware, vm_fixtures, start_vm, http_dir, make_loop, tmp_path
):
    image = vm_fixtures["images"][image_name]
    www, base_url = http_dir
    src = Path(image["path"])
    shutil.copyfile(src, www / src.name)  # the fixtures may be on another filesystem
    body = _payload(f"{base_url}/{src.name}", image, f"byoi-killed-{image_name}")
    dev = make_loop(DISK_SIZE, name="disk.raw")
    disk = tmp_path / "disk.raw"

    full = _agent(tmp_path, body, dev)
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err  # the old system: a complete, bootable install
    _kill_at_head(tmp_path, body, dev)
    subprocess.run(["blockdev", "--flushbufs", dev], check=True, timeout=60)
    os.sync()

    with open(disk, "rb") as f:
        head = f.read(MiB)
        body_start = f.read(MiB)
    assert head == bytes(MiB), "the killed install left data in the first MiB"
    flat = tmp_path / "image.raw"  # the image's own second MiB: the body is on the disk
    subprocess.run(
        ["qemu-img", "convert", "-f", image["format"], "-O", "raw", str(src), str(flat)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with open(flat, "rb") as f:
        f.seek(MiB)
        assert body_start == f.read(MiB) and body_start != bytes(MiB)

    with overlay_boot(
        start_vm, disk, tmp_path, name=f"killed-{firmware}", firmware=firmware, bootindex=0
    ) as vm:
        pattern, source = FIRMWARE_GIVES_UP[firmware]
        vm.wait_for(pattern, NO_BOOT_TIMEOUT, source=source)
        if firmware == "uefi":  # the shell it falls back to maps the disk, and no file system
            vm.wait_for(r"Shell>", NO_BOOT_TIMEOUT)
            assert "FS0:" not in vm.console(), vm.console()[-3000:]
    console = vm.console()
    assert "Linux version" not in console and "BYOI-" not in console, console[-3000:]

"""Start QEMU, drive it over QMP and read its serial console: the test VMs of tests/vm.

A ``VM`` owns one QEMU process. It listens on a QMP unix socket before QEMU starts (so no
connect race), writes the serial console to a file that ``wait_for`` polls for markers, and
``stop`` always ends the process: QMP ``quit`` first, then SIGKILL. Use it as a context manager
so a failing test never leaves a VM behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU = "qemu-system-x86_64"


class VMError(AssertionError):
    """A VM did not do what the test waited for; the message carries the console tail."""


@dataclass
class Drive:
    """One disk. ``sector`` sets both logical and physical block sizes (virtio, nvme, scsi).

    ``bus``: ``virtio`` (virtio-blk), ``nvme``, ``sata`` (q35's AHCI at 00:1f.2, one port per
    disk in order), ``scsi`` (one virtio-scsi controller, SCSI id 1, 2, ...), ``usb``
    (usb-storage on one qemu-xhci, port 1, 2, ...), ``cdrom`` (ATAPI on the next AHCI port).
    Controllers sit at fixed PCI slots (``PCI_SLOTS``) so by-path names are known in advance.
    """

    path: Path
    fmt: str = "raw"
    sector: int = 512
    bootindex: int | None = 0
    readonly: bool = False
    bus: str = "virtio"
    serial: str | None = None
    wwn: int | None = None  # sata, scsi: the world wide name the disk reports


PCI_SLOTS = {"nvme": 0x10, "scsi": 0x11, "usb": 0x12}  # nvme: 0x10, 0x13, 0x14, ...


def _drive_device(d: Drive, i: int, used: dict[str, int]) -> list[str]:
    """The controller (first use) and device arguments of one drive."""
    n = used.get(d.bus, 0)
    used[d.bus] = n + 1
    args: list[str] = []
    geometry = f",logical_block_size={d.sector},physical_block_size={d.sector}"
    serial = f",serial={d.serial}" if d.serial else ""
    if d.wwn is not None and d.bus in ("sata", "scsi"):
        serial += f",wwn={d.wwn:#x}"
    if d.bus == "virtio":
        dev = f"virtio-blk-pci,drive=disk{i},id=vblk{i}" + (geometry if d.sector != 512 else "")
    elif d.bus == "nvme":
        slot = PCI_SLOTS["nvme"] if n == 0 else 0x12 + n
        dev = f"nvme,drive=disk{i},id=nvme{i},addr={slot:#x},serial={d.serial or f'NVME{i:04d}'}"
        dev += geometry if d.sector != 512 else ""
    elif d.bus in ("sata", "cdrom"):
        port = used.get("sata", 0) + used.get("cdrom", 0) - 1
        kind = "ide-hd" if d.bus == "sata" else "ide-cd"
        dev = f"{kind},drive=disk{i},id=ata{i},bus=ide.{port}{serial}"
    elif d.bus == "scsi":
        if n == 0:
            args += ["-device", f"virtio-scsi-pci,id=scsi0,addr={PCI_SLOTS['scsi']:#x}"]
        dev = f"scsi-hd,drive=disk{i},id=scsi{i},bus=scsi0.0,scsi-id={n + 1},lun=0{serial}"
        dev += geometry if d.sector != 512 else ""
    elif d.bus == "usb":
        if n == 0:
            args += ["-device", f"qemu-xhci,id=xhci,addr={PCI_SLOTS['usb']:#x}"]
        dev = f"usb-storage,drive=disk{i},id=usb{i},bus=xhci.0,port={n + 1}{serial}"
    else:
        raise ValueError(f"unknown drive bus {d.bus!r}")
    if d.bootindex is not None:
        dev += f",bootindex={d.bootindex}"
    return [*args, "-device", dev]


@dataclass
class VMConfig:
    name: str
    workdir: Path
    memory_mb: int = 512
    firmware: str = "bios"  # "bios" (SeaBIOS) or "uefi" (OVMF)
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    drives: list[Drive] = field(default_factory=list)
    shares: dict[str, tuple[Path, bool]] = field(default_factory=dict)  # tag -> (path, readonly)
    network: bool = False
    vars_file: Path | None = None  # OVMF NVRAM kept across VMs; made from the template if absent


def firmware_log(serial_log: Path) -> Path:
    """Where SeaBIOS's debug console goes, next to the serial log."""
    return serial_log.with_name(serial_log.name.replace(".serial.log", ".firmware.log"))


def build_command(cfg: VMConfig, qmp_socket: Path, serial_log: Path) -> list[str]:
    """The QEMU argument list for a config (pure, so it can be read and tested alone)."""
    args = [
        QEMU,
        "-name", cfg.name,
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(cfg.memory_mb),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-qmp", f"unix:{qmp_socket}",
        "-chardev", f"file,id=ser0,path={serial_log}",
        "-serial", "chardev:ser0",
    ]  # fmt: skip
    if cfg.firmware == "uefi":
        vars_copy = cfg.vars_file or cfg.workdir / f"{cfg.name}-OVMF_VARS.fd"
        if cfg.vars_file is None or not vars_copy.exists():
            shutil.copyfile(OVMF_VARS, vars_copy)
        args += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]  # fmt: skip
    else:  # SeaBIOS reports on its debug port ("Boot failed: not a bootable disk", ...)
        args += [
            "-chardev", f"file,id=fw0,path={firmware_log(serial_log)}",
            "-device", "isa-debugcon,iobase=0x402,chardev=fw0",
        ]  # fmt: skip
    if cfg.kernel:
        args += ["-kernel", str(cfg.kernel), "-append", cfg.append]
        if cfg.initrd:
            args += ["-initrd", str(cfg.initrd)]
    used: dict[str, int] = {}
    for i, d in enumerate(cfg.drives):
        opts = f"file={d.path},format={d.fmt},if=none,id=disk{i},cache=writeback"
        if d.readonly or d.bus == "cdrom":
            opts += ",readonly=on"
        if d.bus == "cdrom":
            opts += ",media=cdrom"
        args += ["-drive", opts, *_drive_device(d, i, used)]
    for tag, (path, ro) in cfg.shares.items():
        spec = f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
        if ro:
            spec += ",readonly=on"
        args += ["-virtfs", spec]
    if cfg.network:
        args += ["-nic", "user,model=virtio-net-pci"]
    else:
        args += ["-nic", "none"]
    return args


class VM:
    def __init__(self, cfg: VMConfig) -> None:
        self.cfg = cfg
        self.qmp_socket = cfg.workdir / f"{cfg.name}.qmp"
        self.serial_log = cfg.workdir / f"{cfg.name}.serial.log"
        self.stderr_log = cfg.workdir / f"{cfg.name}.qemu.log"
        self.proc: subprocess.Popen | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.started = 0.0

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.qmp_socket.unlink(missing_ok=True)
        self.serial_log.write_bytes(b"")
        firmware_log(self.serial_log).unlink(missing_ok=True)
        cmd = build_command(self.cfg, self.qmp_socket, self.serial_log)
        qmp = QEMUMonitorProtocol(str(self.qmp_socket), server=True)
        with open(self.stderr_log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.started = time.monotonic()
        try:
            qmp.accept(timeout=30)
        except Exception as exc:
            self.stop()
            raise VMError(f"QEMU did not connect to QMP: {exc}\n{self.qemu_log()}") from exc
        self.qmp = qmp

    def command(self, cmd: str, **args: Any) -> Any:
        """One QMP command; its ``return`` value (a QMP error raises)."""
        if self.qmp is None:
            raise VMError("QMP is not connected")
        return self.qmp.cmd(cmd, **args)

    def status(self) -> str:
        return self.command("query-status")["status"]

    def console(self) -> str:
        return self.serial_log.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")

    def firmware(self) -> str:
        """SeaBIOS's debug console so far ("" under OVMF, which reports on the serial)."""
        try:
            return firmware_log(self.serial_log).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_log(self) -> str:
        try:
            return self.stderr_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 60) -> str:
        return "\n".join(self.console().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float, source: str = "console") -> re.Match[str]:
        """Wait until the console (or ``source="firmware"``: SeaBIOS's debug console) matches
        a regex; fail with the console tail on timeout."""
        rx = re.compile(pattern, re.M)
        read = self.firmware if source == "firmware" else self.console
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(read())
            if match:
                return match
            if self.proc is not None and self.proc.poll() is not None:
                match = rx.search(read())
                if match:
                    return match
                raise VMError(
                    f"{self.cfg.name}: QEMU exited ({self.proc.returncode}) before {pattern!r}\n"
                    f"--- console tail ---\n{self._tail()}\n--- qemu ---\n{self.qemu_log()}"
                )
            if time.monotonic() > deadline:
                raise VMError(
                    f"{self.cfg.name}: no {pattern!r} within {timeout:.0f}s\n"
                    f"--- console tail ---\n{self._tail()}"
                )
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the guest to power itself off (QEMU exits with -no-reboot)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise VMError(
                f"{self.cfg.name}: still running after {timeout:.0f}s\n{self._tail()}"
            ) from exc

    def stop(self) -> None:
        """Always ends QEMU: QMP quit, then SIGKILL of this process only."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):  # QEMU may already be gone
                if self.proc is not None and self.proc.poll() is None:
                    self.qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.qmp_socket.unlink(missing_ok=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def between(text: str, begin: str, end: str) -> str:
    """The console text between two marker lines (the last such block)."""
    start = text.rfind(begin + "\n")
    if start < 0:
        raise VMError(f"no {begin} on the console")
    start += len(begin) + 1
    stop = text.find(end, start)
    if stop < 0:
        raise VMError(f"no {end} after {begin} on the console")
    return text[start:stop]


def markers(text: str, name: str) -> list[str]:
    """Values of ``NAME=value`` marker lines, in order."""
    return re.findall(rf"^{re.escape(name)}=(.*)$", text, re.M)

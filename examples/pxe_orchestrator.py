#!/usr/bin/env python3
"""The whole BYOI flow on one machine: PXE-boot the rescue, install over HTTP, boot the disk.

    python examples/pxe_orchestrator.py --firmware uefi|bios [--workdir DIR] [--json]

1. builds the rescue (rescue/build.py) and the sample images (vm-fixtures/build.py), cached;
2. serves the boot files, the image, the API token and a callback endpoint over HTTP on
   127.0.0.1 (the guest sees the host as 10.0.2.2 through QEMU's user-mode network);
3. starts a VM with an empty 6 GiB disk that network-boots: QEMU's DHCP hands out
   ``boot.ipxe`` on its built-in TFTP, the NIC's iPXE ROM (SeaBIOS or OVMF) runs it and chains
   to this server's iPXE script, which loads the kernel and the initramfs over HTTP;
4. waits for the rescue's announcement on the callback endpoint, then starts the install with
   an OVHcloud payload through the agent's API (reached through a QEMU hostfwd port) and follows
   /install/status (and the status callbacks) to the end;
5. stops the rescue VM and starts the machine again from its disk alone (UEFI: with the same
   OVMF variable store and no boot index, so the firmware follows the BootOrder the agent wrote
   for ``efiBootloaderPath``) and checks on the serial console that the installed OS came up
   and read its config drive (hostname, SSH key, user data script run).

Each stage is printed with its duration; exit 0 when the installed OS proved it read its
config drive, 1 otherwise. ``--json`` prints a summary document as the last stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[1]
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
GUEST_HOST = "10.0.2.2"  # the host, seen from QEMU's user-mode network
AGENT_PORT = 8080
DISK_SIZE = 6 * 1024**3  # sparse; the agent ignores disks under 4 GiB
DECOY_SIZE = 5 * 1024**3  # smaller: the default choice would take it
TARGET_SERIAL = "BYOI-TARGET"
RESCUE_MEMORY_MB = 4608  # the agent keeps 3 GiB free besides the image, plus the rescue's root
HOSTNAME = "pxe-demo"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByoiPxeDemoKeyOnlyForTheFlow byoi@pxe-demo"
USER_DATA = "#!/bin/sh\necho BYOI-UD-OUT $((6 * 7)) $(uname -s)\n"
USER_DATA_OUT = "BYOI-UD-OUT 42 Linux"
EFI_LOADER = "/EFI/BOOT/BOOTX64.EFI"
EFI_LABEL = "byoi"  # agent/bootloader.create_boot_entry's default label


class FlowError(Exception):
    """A stage did not do what it should; the message says which and why."""


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the orchestrator's HTTP side: boot files, image, token, callbacks --------------------------


class BootServer:
    """Static files from ``root``, the API and callback tokens (GET /token, /callback-token)
    and callbacks (POST /cb, which must carry the callback token)."""

    def __init__(self, root: Path, token: str, callback_token: str) -> None:
        self.root, self.token, self.callback_token = root, token, callback_token
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.rejected = 0
        self.served: list[str] = []  # paths of successful GETs: proof of what the VM fetched
        handler = functools.partial(self._Handler, self, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        """The URL of ``path`` as the guest sees it."""
        return f"http://{GUEST_HOST}:{self.port}/{path.lstrip('/')}"

    def __enter__(self) -> BootServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    class _Handler(SimpleHTTPRequestHandler):
        def __init__(self, server: BootServer, *args: Any, **kw: Any) -> None:
            self.boot = server
            super().__init__(*args, **kw)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            tokens = {"/token": self.boot.token, "/callback-token": self.boot.callback_token}
            if self.path in tokens:
                body = (tokens[self.path] + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.boot.served.append(self.path)
                return
            super().do_GET()
            if (self.boot.root / self.path.lstrip("/")).is_file():
                self.boot.served.append(self.path)

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path != "/cb":
                self.send_error(404)
                return
            # callbacks carry their own credential, never the API token
            if self.headers.get("Authorization", "") != f"Bearer {self.boot.callback_token}":
                self.boot.rejected += 1
                self.send_error(401)
                return
            try:
                event = json.loads(raw)
            except ValueError:
                self.send_error(400)
                return
            self.boot.events.put(event)
            self.send_response(204)
            self.end_headers()


# --- QEMU -------------------------------------------------------------------------------------


class Machine:
    """One QEMU process with a QMP socket and its serial console in a file."""

    def __init__(self, name: str, workdir: Path, args: list[str]) -> None:
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.serial = workdir / f"{name}.serial.log"
        self.stderr = workdir / f"{name}.qemu.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QEMUMonitorProtocol | None = None

    def start(self) -> Machine:
        self.qmp_path.unlink(missing_ok=True)
        self.serial.write_bytes(b"")
        qmp = QEMUMonitorProtocol(str(self.qmp_path), server=True)
        cmd = [
            "qemu-system-x86_64", "-name", self.name, "-machine", "q35,accel=tcg", "-cpu", "max",
            "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
            "-qmp", f"unix:{self.qmp_path}",
            "-chardev", f"file,id=ser0,path={self.serial}", "-serial", "chardev:ser0",
            *self.args,
        ]  # fmt: skip
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            qmp.accept(timeout=30)
        except Exception as exc:
            self.stop()
            raise FlowError(f"{self.name}: QEMU did not start: {self.stderr.read_text()}") from exc
        self.qmp = qmp
        return self

    def console(self) -> str:
        return self.serial.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(self.console())
            if match:
                return match
            if not self.alive():
                raise FlowError(f"{self.name}: QEMU ended before {pattern!r}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise FlowError(f"{self.name}: no {pattern!r} in {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.3)

    def stop(self) -> None:
        """QMP quit (QEMU flushes its block caches to the disk file), then SIGKILL if needed."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                if self.alive():
                    self.qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.qmp_path.unlink(missing_ok=True)


def firmware_args(firmware: str, vars_file: Path) -> list[str]:
    if firmware == "bios":
        return []  # SeaBIOS is QEMU's default
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
    ]  # fmt: skip


def ipxe_script(server: BootServer, cmdline: str) -> str:
    """Kernel and initramfs over HTTP (TFTP in emulation is far too slow for ~60 MB).

    ``initrd=rescue`` on the command line lets the kernel's EFI stub load the initramfs from
    iPXE's virtual file system under UEFI; under BIOS the kernel ignores it.
    """
    return (
        "#!ipxe\n"
        "echo BYOI-IPXE loading the rescue over HTTP\n"
        f"kernel {server.url('vmlinuz')} initrd=rescue {cmdline}\n"
        f"initrd --name rescue {server.url('rescue.cpio.zst')}\n"
        "boot\n"
    )


# --- the flow ---------------------------------------------------------------------------------


class Stages:
    """Prints each stage with its duration and keeps them for the summary."""

    def __init__(self, quiet: bool = False) -> None:
        self.times: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.quiet = quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        start = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = round(time.monotonic() - start, 1)
        self.say(f"{name}: done in {self.times[name]:.1f} s")


def payload(image_url: str, image: dict[str, Any], firmware: str) -> dict[str, Any]:
    meta = [
        {"key": "imageURL", "value": image_url},
        {"key": "imageType", "value": image["format"]},
        {"key": "imageCheckSum", "value": image["sha256"]},
        {"key": "imageCheckSumType", "value": "sha256"},
        {"key": "sshKey", "value": SSH_KEY},
        {"key": "configDriveUserData", "value": USER_DATA},
    ]
    if firmware == "uefi":
        meta.append({"key": "efiBootloaderPath", "value": EFI_LOADER})
    return {
        "templateName": "byoi_64",
        "details": {"customHostname": HOSTNAME},
        "userMetadata": meta,
    }


def wait_event(server: BootServer, kind: str, timeout: float, rescue: Machine) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = server.events.get(timeout=1)
        except queue.Empty:
            if not rescue.alive():
                raise FlowError(f"the rescue VM ended\n{rescue.tail()}") from None
            continue
        if event.get("event") == kind:
            return event
    raise FlowError(f"no {kind} callback within {timeout:.0f} s\n{rescue.tail()}")


def efi_vars_have_entry(vars_file: Path, label: str) -> bool:
    """The OVMF variable store holds a Boot#### load option with this description."""
    return label.encode("utf-16-le") + b"\0\0" in vars_file.read_bytes()


# --select: how the kernel command line names the target. The rescue VM then carries a second,
# smaller disk that the default choice would take (the smallest eligible one): the install
# must land on the named disk and leave the decoy untouched.
SELECTIONS = {
    "disk": "byoi.disk=/dev/vda",
    "hint": f"byoi.hint=serial={TARGET_SERIAL}",
}


def decoy_untouched(decoy: Path) -> bool:
    """The sparse decoy disk still holds no data at all."""
    fd = os.open(decoy, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:  # ENXIO: only a hole
        return True
    finally:
        os.close(fd)
    return False


def run_flow(
    firmware: str, workdir: Path, stages: Stages, timeout: float = 900, select: str | None = None
) -> dict[str, Any]:
    """The whole flow; returns the summary (raises FlowError with the reason on failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"firmware": firmware, "stages": stages.times, "select": select}
    with stages.stage("build rescue and sample images"):
        rescue = _load("rescue_build", REPO / "rescue" / "build.py").build()
        fixtures = _load("vm_fixtures_build", REPO / "vm-fixtures" / "build.py").build()
    summary["rescue_initrd_bytes"] = rescue["initrd_size"]
    image = fixtures["images"]["uefi" if firmware == "uefi" else "bios"]

    www = workdir / "www"
    tftp = workdir / "tftp"
    for d in (www, tftp):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    for src, name in (
        (rescue["kernel"], "vmlinuz"),
        (rescue["initrd"], "rescue.cpio.zst"),
        (image["path"], Path(image["path"]).name),
    ):
        os.link(src, www / name) if _same_fs(Path(src), www) else shutil.copy2(src, www / name)

    token = secrets.token_hex(32)
    disk = workdir / "disk.raw"
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    decoy = workdir / "decoy.raw"
    decoy.unlink(missing_ok=True)
    decoy_args: list[str] = []
    if select:
        with open(decoy, "wb") as f:
            f.truncate(DECOY_SIZE)
        decoy_args = [
            "-drive", f"file={decoy},format=raw,if=none,id=disk1,cache=writeback",
            "-device", "virtio-blk-pci,drive=disk1,serial=BYOI-DECOY",
        ]  # fmt: skip
    vars_file = workdir / "OVMF_VARS.fd"
    if firmware == "uefi":
        shutil.copyfile(OVMF_VARS, vars_file)
    host_port = free_port()

    with BootServer(www, token, secrets.token_hex(32)) as server:
        cmdline = (
            f"console=ttyS0 quiet panic=-1 byoi.listen=0.0.0.0:{AGENT_PORT} "
            f"byoi.token_url={server.url('token')} byoi.callback={server.url('cb')} "
            f"byoi.callback_token_url={server.url('callback-token')}"
        )
        if select:
            cmdline += " " + SELECTIONS[select]
        (www / "boot.ipxe").write_text(ipxe_script(server, cmdline))
        # What QEMU's DHCP names: a tiny script that leaves slow TFTP for HTTP at once.
        (tftp / "boot.ipxe").write_text(f"#!ipxe\nchain {server.url('boot.ipxe')}\n")
        netdev = (
            f"user,id=n0,tftp={tftp},bootfile=boot.ipxe,"
            f"hostfwd=tcp:127.0.0.1:{host_port}-:{AGENT_PORT}"
        )
        rescue_vm = Machine(
            f"rescue-{firmware}",
            workdir,
            [
                "-m", str(RESCUE_MEMORY_MB),
                *firmware_args(firmware, vars_file),
                "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=writeback",
                "-device", f"virtio-blk-pci,drive=disk0,serial={TARGET_SERIAL}",
                *decoy_args,
                "-netdev", netdev,
                "-device", "virtio-net-pci,netdev=n0,bootindex=0",
            ],
        )  # fmt: skip
        try:
            with stages.stage("network boot of the rescue (firmware, iPXE, kernel, init)"):
                rescue_vm.start()
                announce = wait_event(server, "announce", timeout, rescue_vm)
            summary["announce"] = {k: announce.get(k) for k in ("address", "port", "bootMode")}
            summary["announced_disks"] = [d["path"] for d in announce["disks"]["disks"]]
            stages.say(
                f"announced: {announce.get('address')}:{announce.get('port')} "
                f"({announce.get('bootMode')}), disks {summary['announced_disks']}, "
                f"chosen {announce['disks'].get('chosen')}"
            )
            if announce.get("bootMode") != firmware:
                raise FlowError(f"the rescue booted in {announce.get('bootMode')} mode")
            summary["install"] = install(
                server, host_port, token, image, firmware, stages, rescue_vm, timeout
            )
        finally:
            rescue_vm.stop()
        summary["callbacks_rejected"] = server.rejected
        if select:
            summary["decoy_untouched"] = decoy_untouched(decoy)
            if not summary["decoy_untouched"]:
                raise FlowError("the install wrote to the decoy disk")
        summary["served"] = sorted(set(server.served))

    with stages.stage("boot the installed disk"):
        console = boot_disk(workdir, disk, firmware, vars_file, timeout)
    summary["installed_os"] = check_installed(console, firmware, vars_file)
    return summary


def _same_fs(src: Path, dest_dir: Path) -> bool:
    return src.stat().st_dev == dest_dir.stat().st_dev


def install(
    server: BootServer,
    host_port: int,
    token: str,
    image: dict[str, Any],
    firmware: str,
    stages: Stages,
    rescue_vm: Machine,
    timeout: float,
) -> dict[str, Any]:
    """Start the install through the hostfwd port and follow it to the end."""
    body = payload(server.url(Path(image["path"]).name), image, firmware)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{host_port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    with client, stages.stage("install through the agent's API"):
        health = client.get("/health")
        health.raise_for_status()
        response = client.post("/install/start", json=body)
        if response.status_code != 202:
            raise FlowError(f"install refused ({response.status_code}): {response.text}")
        deadline = time.monotonic() + timeout
        shown: dict[str, str] = {}
        while True:
            status = client.get("/install/status").raise_for_status().json()
            for step in status.get("progress", []):
                if step["status"] != "todo" and shown.get(step["comment"]) != step["status"]:
                    shown[step["comment"]] = step["status"]
                    stages.say(f"  {step['status']:>5}: {step['comment']}")
            if status["status"] in ("done", "error"):
                break
            if time.monotonic() > deadline or not rescue_vm.alive():
                raise FlowError(f"install did not end: {status}\n{rescue_vm.tail()}")
            time.sleep(1)
        final_cb = wait_event(server, "step", 60, rescue_vm)
        while final_cb.get("status") not in ("done", "error"):
            final_cb = wait_event(server, "step", 60, rescue_vm)
    stages.say(f"result: {status['message']}")
    if status["status"] != "done":
        raise FlowError(f"install failed: {status['message']}\n{rescue_vm.tail()}")
    if final_cb.get("status") != "done":
        raise FlowError(f"the final callback says {final_cb.get('status')}")
    return {
        "message": status["message"],
        "disk": status.get("disk"),
        "warnings": status.get("warnings", []),
        "elapsedTime": status.get("elapsedTime"),
        "final_callback": final_cb.get("status"),
    }


def boot_disk(workdir: Path, disk: Path, firmware: str, vars_file: Path, timeout: float) -> str:
    """Power the machine on again from its disk alone (no NIC).

    Under UEFI the disk gets no boot index: QEMU would otherwise make OVMF rewrite BootOrder,
    and the point is that the firmware follows the entry the agent created.
    """
    drive = "virtio-blk-pci,drive=disk0" + (",bootindex=0" if firmware == "bios" else "")
    vm = Machine(
        f"installed-{firmware}",
        workdir,
        [
            "-m", "512",
            *firmware_args(firmware, vars_file),
            "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=writeback",
            "-device", drive,
            "-nic", "none",
        ],
    )  # fmt: skip
    try:
        vm.start()
        vm.wait_for(r"^BYOI-TINY-DONE", timeout)
        return vm.console()
    finally:
        vm.stop()


def _marker(console: str, name: str) -> list[str]:
    return re.findall(rf"^{re.escape(name)}=(.*)$", console, re.M)


def check_installed(console: str, firmware: str, vars_file: Path) -> dict[str, Any]:
    """The installed OS's own report: boot mode, config drive, hostname, user data, boot entry."""
    found = {
        "bootmode": _marker(console, "BYOI-BOOTMODE"),
        "configdrive": _marker(console, "BYOI-CONFIGDRIVE"),
        "hostname": _marker(console, "BYOI-HOSTNAME"),
        "user_data_ran": USER_DATA_OUT in console and "BYOI-USERDATA-RC=0" in console,
        "ssh_key_in_metadata": SSH_KEY in console,
        "gpt_warnings": "BYOI-GPT-WARNING" in console,
    }
    problems = []
    if found["bootmode"] != [firmware]:
        problems.append(f"boot mode {found['bootmode']}")
    if len(found["configdrive"]) != 1 or found["configdrive"][0] == "none":
        problems.append(f"config drive {found['configdrive']}")
    if found["hostname"] != [HOSTNAME]:
        problems.append(f"hostname {found['hostname']}")
    if not found["user_data_ran"]:
        problems.append("the user data script did not run")
    if not found["ssh_key_in_metadata"]:
        problems.append("the SSH key is not in the metadata")
    if found["gpt_warnings"]:
        problems.append("GPT warnings in the kernel log")
    if firmware == "uefi":
        # OVMF names the load option it starts on the console: the agent's entry, not the
        # firmware's own removable-media fallback for the disk.
        started = re.findall(r'BdsDxe: starting (Boot[0-9A-F]{4}) "([^"]*)"', console)
        found["efi_started"] = started
        found["efi_entry_in_nvram"] = efi_vars_have_entry(vars_file, EFI_LABEL)
        if not found["efi_entry_in_nvram"]:
            problems.append(f"no {EFI_LABEL!r} boot entry in the variable store")
        if not started or started[0][1] != EFI_LABEL:
            problems.append(f"the firmware started {started}, not the {EFI_LABEL!r} entry")
    if problems:
        raise FlowError("the installed OS: " + "; ".join(problems) + "\n" + console[-3000:])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--firmware", choices=("uefi", "bios"), default="uefi")
    parser.add_argument("--workdir", type=Path, default=REPO / "rescue" / "out" / "demo")
    parser.add_argument("--timeout", type=float, default=900, help="per stage, seconds")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--select",
        choices=sorted(SELECTIONS),
        help="name the target on the kernel command line (byoi.disk= or byoi.hint=) beside "
        "a smaller decoy disk the default choice would take",
    )
    args = parser.parse_args()
    stages = Stages()
    workdir = args.workdir / args.firmware
    try:
        summary = run_flow(args.firmware, workdir, stages, args.timeout, args.select)
    except (FlowError, httpx.HTTPError) as exc:
        stages.say(f"FAILED: {exc}")
        print(f"logs in {workdir}", file=sys.stderr)
        if args.json:
            print(
                json.dumps(
                    {
                        "firmware": args.firmware,
                        "ok": False,
                        "error": str(exc)[:4000],
                        "stages": stages.times,
                    }
                )
            )
        return 1
    summary["ok"] = True
    summary["total_seconds"] = round(time.monotonic() - stages.t0, 1)
    stages.say("the installed OS booted and read its config drive")
    for name, seconds in stages.times.items():
        print(f"  {seconds:7.1f} s  {name}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The real flow in QEMU: network boot of the rescue, install over the API, boot of the disk.

Each test runs examples/pxe_orchestrator.py as a program (as ``make demo-pxe`` does) and reads
its JSON summary: the rescue network-booted under the given firmware and announced itself with
its disks, the install succeeded (API and final callback agree), and the machine, powered on
again from its disk alone, booted the installed OS, which read its config drive. Under UEFI the
firmware must have started the boot entry the agent created for ``efiBootloaderPath``.

The unit tests at the end check the rescue's pieces that need no VM: the iPXE script, the
payload, the NVRAM check, and that the built initramfs holds what /init and the agent need.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ORCHESTRATOR = REPO / "examples" / "pxe_orchestrator.py"
FLOW_TIMEOUT = 1500  # seconds for the whole flow in software emulation


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


orchestrator = _load("pxe_orchestrator", ORCHESTRATOR)


def _run_flow(firmware: str, workdir: Path, select: str) -> dict:
    proc = subprocess.run(
        [
            sys.executable, str(ORCHESTRATOR), "--firmware", firmware,
            "--workdir", str(workdir), "--timeout", "600", "--json", "--select", select,
        ],
        capture_output=True,
        text=True,
        timeout=FLOW_TIMEOUT,
        cwd=REPO,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no summary (exit {proc.returncode})\n{proc.stderr[-5000:]}"
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["ok"], f"{summary}\n{proc.stderr[-5000:]}"
    return summary


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(FLOW_TIMEOUT + 60)
@pytest.mark.parametrize(("firmware", "select"), [("bios", "hint"), ("uefi", "disk")])
def test_pxe_flow(firmware: str, select: str, tmp_path: Path) -> None:
    """The whole production flow; the target named on the kernel command line (a serial hint
    under SeaBIOS, the device under OVMF) beside a smaller decoy disk that the default choice
    would take: the image lands on the named disk, the decoy holds no byte afterwards."""
    summary = _run_flow(firmware, tmp_path, select)
    assert summary["firmware"] == firmware
    assert summary["announce"]["bootMode"] == firmware
    assert summary["announce"]["port"] == orchestrator.AGENT_PORT
    assert summary["announce"]["address"].startswith("10.0.2.")
    assert summary["announced_disks"] == ["/dev/vda", "/dev/vdb"]
    assert summary["decoy_untouched"] is True
    install = summary["install"]
    assert install["disk"] == "/dev/vda"
    assert install["final_callback"] == "done"
    assert summary["callbacks_rejected"] == 0
    # the firmware's iPXE fetched the boot files over HTTP and init fetched the token
    for path in ("/boot.ipxe", "/vmlinuz", "/rescue.cpio.zst", "/token"):
        assert path in summary["served"], summary["served"]
    os_report = summary["installed_os"]
    assert os_report["bootmode"] == [firmware]
    assert os_report["hostname"] == [orchestrator.HOSTNAME]
    assert os_report["user_data_ran"] and os_report["ssh_key_in_metadata"]
    assert not os_report["gpt_warnings"]
    if firmware == "uefi":
        assert os_report["efi_entry_in_nvram"]
        assert os_report["efi_started"][0][1] == orchestrator.EFI_LABEL
        assert install["warnings"] == []
    stages = summary["stages"]
    for name in ("network boot", "install", "boot the installed disk"):
        assert any(s.startswith(name) for s in stages), stages


# --- the rescue image, without booting it ----------------------------------------------------


@pytest.fixture(scope="module")
def rescue_manifest() -> dict:
    return _load("rescue_build", REPO / "rescue" / "build.py").build()


@pytest.fixture(scope="module")
def rescue_tree(rescue_manifest: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initramfs unpacked, as the kernel would."""
    root = tmp_path_factory.mktemp("rescue-root")
    zstd = subprocess.Popen(["zstd", "-dc", rescue_manifest["initrd"]], stdout=subprocess.PIPE)
    subprocess.run(
        ["cpio", "-idm", "--quiet"], stdin=zstd.stdout, cwd=root, check=True, timeout=120
    )
    assert zstd.wait(timeout=60) == 0
    return root


@pytest.mark.vm
@pytest.mark.root
def test_rescue_rebuild_is_cached(rescue_manifest: dict) -> None:
    start = time.monotonic()
    again = _load("rescue_build2", REPO / "rescue" / "build.py").build()
    assert time.monotonic() - start < 30
    assert again == rescue_manifest
    # small, as promised: the anchors' ramdisks are around 100 MB compressed
    assert rescue_manifest["initrd_size"] < 60 * 1024 * 1024


@pytest.mark.vm
@pytest.mark.root
def test_rescue_holds_the_tools_and_runs_the_agent(rescue_tree: Path) -> None:
    for rel in (
        "init", "usr/bin/python3", "usr/bin/qemu-img", "usr/sbin/sgdisk", "usr/sbin/sfdisk",
        "usr/bin/efibootmgr", "usr/sbin/blkid", "usr/sbin/wipefs", "usr/bin/mcopy",
        "usr/sbin/mkfs.vfat", "usr/bin/busybox", "usr/local/bin/byoi-agent",
        "etc/byoi/udhcpc.sh", "opt/byoi/announce.py", "opt/byoi/agent/__main__.py",
        "opt/byoi/site/httpx", "opt/byoi/site/uvicorn", "lib/modules/byoi/virtio_net.ko",
        "lib/modules/byoi/virtio_blk.ko", "lib/modules/byoi/efivarfs.ko",
        # the disks of real servers: NVMe, SATA, SCSI/SAS, USB sticks and virtual CDs
        "lib/modules/byoi/nvme.ko", "lib/modules/byoi/ahci.ko", "lib/modules/byoi/sd_mod.ko",
        "lib/modules/byoi/virtio_scsi.ko", "lib/modules/byoi/mpt3sas.ko",
        "lib/modules/byoi/megaraid_sas.ko", "lib/modules/byoi/usb-storage.ko",
        "lib/modules/byoi/uas.ko", "lib/modules/byoi/xhci-pci.ko", "lib/modules/byoi/sr_mod.ko",
    ):  # fmt: skip
        assert (rescue_tree / rel).exists(), rel
    order = (rescue_tree / "lib/modules/byoi/order").read_text().split()
    assert order.index("virtio_pci.ko") < order.index("virtio_net.ko")
    for gone in ("usr/share/doc", "usr/share/man", "usr/lib/python3.11/test", "var/lib/apt"):
        assert not (rescue_tree / gone).exists(), gone
    assert not list(rescue_tree.rglob("__pycache__"))
    # The rescue's own Python runs the agent's CLI and imports the API and the pipeline.
    proc = subprocess.run(
        ["chroot", str(rescue_tree), "/bin/sh", "-c",
         "byoi-agent --help && PYTHONPATH=/opt/byoi:/opt/byoi/site python3 -c "
         "'import agent.api, agent.pipeline, agent.callbacks; print(\"imports ok\")'"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin", "LANG": "C.UTF-8"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout and "imports ok" in proc.stdout


# --- no VM ------------------------------------------------------------------------------------


def test_ipxe_script_loads_kernel_and_named_initrd() -> None:
    server = orchestrator.BootServer(REPO, "t" * 32, "c" * 32)
    try:
        script = orchestrator.ipxe_script(server, "console=ttyS0 byoi.listen=0.0.0.0:8080")
    finally:
        server.httpd.server_close()
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    base = f"http://10.0.2.2:{server.port}/"
    assert f"kernel {base}vmlinuz initrd=rescue console=ttyS0 byoi.listen=0.0.0.0:8080" in lines
    assert f"initrd --name rescue {base}rescue.cpio.zst" in lines
    assert lines[-1] == "boot"


def test_payload_asks_for_the_efi_entry_only_under_uefi() -> None:
    from agent.payload import parse_request

    image = {"format": "qcow2", "sha256": "0" * 64}
    uefi = parse_request(orchestrator.payload("http://10.0.2.2/x.qcow2", image, "uefi"))
    bios = parse_request(orchestrator.payload("http://10.0.2.2/x.qcow2", image, "bios"))
    assert uefi.efi_bootloader_path == orchestrator.EFI_LOADER
    assert bios.efi_bootloader_path is None


def test_efi_vars_entry_detection(tmp_path: Path) -> None:
    store = tmp_path / "vars.fd"
    store.write_bytes(b"\xff" * 64 + "UEFI Shell".encode("utf-16-le") + b"\0\0")
    assert not orchestrator.efi_vars_have_entry(store, "byoi")
    store.write_bytes(store.read_bytes() + "byoi".encode("utf-16-le") + b"\0\0")
    assert orchestrator.efi_vars_have_entry(store, "byoi")
    # a longer description that merely starts with the label is not the entry
    store.write_bytes(b"\xff" * 64 + "byoi-old".encode("utf-16-le") + b"\0\0")
    assert not orchestrator.efi_vars_have_entry(store, "byoi")

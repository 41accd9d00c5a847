"""Fixtures of the VM tests: the built fixtures (built on first use, cached) and a VM factory.

``pytest tests/vm`` alone works: the session fixture runs vm-fixtures/build.py (a no-op when its
outputs are up to date) and fails, not skips, when the build or QEMU is missing, so a machine
that cannot run the proof says so.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qmp_harness import OVMF_CODE, QEMU, VM, VMConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "vm-fixtures" / "build.py"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("vm_fixtures_build", BUILD_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def vm_fixtures() -> dict:
    """The manifest of vm-fixtures/out (kernel, initrds, sample images with sha256)."""
    for tool in (QEMU, "qemu-img", "sgdisk", "sfdisk", "mkfs.vfat", "mcopy", "apt-get", "cpio"):
        if shutil.which(tool) is None:
            pytest.fail(f"VM tests need {tool} on this machine")
    if not OVMF_CODE.exists():
        pytest.fail(f"VM tests need OVMF ({OVMF_CODE}, Debian package ovmf)")
    try:
        return _load_build_module().build()
    except Exception as exc:  # noqa: BLE001 - reported as the failure it is
        pytest.fail(f"building vm-fixtures failed: {exc}")


@pytest.fixture
def start_vm(tmp_path: Path) -> Iterator[Callable[..., VM]]:
    """Factory ``start_vm(name=..., **VMConfig fields) -> VM``; every VM is stopped at teardown."""
    vms: list[VM] = []

    def start(**kw: object) -> VM:
        vm = VM(VMConfig(workdir=tmp_path, **kw))  # type: ignore[arg-type]
        vms.append(vm)
        vm.start()
        return vm

    yield start
    for vm in vms:
        vm.stop()

"""Which firmware boots the disk, and the refusal of legacy boot on 4Kn disks (pure)."""

from __future__ import annotations

import pytest

from agent import firmware
from agent import messages as msg
from agent.messages import InstallError


def test_auto_follows_the_rescue_boot_mode(tmp_path) -> None:
    assert firmware.resolve("auto", tmp_path) == "bios"
    (tmp_path / "firmware" / "efi").mkdir(parents=True)
    assert firmware.resolve("auto", tmp_path) == "uefi"
    assert firmware.resolve("bios", tmp_path) == "bios"  # an explicit choice wins


def test_explicit_choice_ignores_the_rescue(tmp_path) -> None:
    assert firmware.resolve("uefi", tmp_path) == "uefi"
    with pytest.raises(ValueError, match="auto, uefi, bios"):
        firmware.resolve("csm", tmp_path)


@pytest.mark.parametrize(
    ("mode", "sector", "refused"),
    [("bios", 512, False), ("uefi", 512, False), ("uefi", 4096, False), ("bios", 4096, True)],
)
def test_legacy_boot_refused_on_4kn_only(mode: str, sector: int, refused: bool) -> None:
    if not refused:
        firmware.check_bootable(mode, "/dev/nvme0n1", sector)
        return
    with pytest.raises(InstallError) as caught:
        firmware.check_bootable(mode, "/dev/nvme0n1", sector)
    assert caught.value.message == msg.legacy_boot_sector_size("/dev/nvme0n1", sector)
    assert "--firmware uefi" in caught.value.message

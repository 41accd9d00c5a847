"""Which firmware will boot the installed disk, and whether it can boot that disk at all.

A server boots its disk with the firmware it booted the rescue system with: UEFI when the
rescue kernel came up through UEFI (``/sys/firmware/efi`` exists), legacy BIOS otherwise.
``--firmware uefi|bios`` overrides that guess for a server that PXE-boots in one mode and boots
its disks in the other.

Legacy BIOS does not boot from disks with 4096-byte logical sectors (4Kn). Measured with the
test VMs' SeaBIOS 1.16.2 (QEMU 7.2): a virtio-blk or virtio-scsi disk with 4096-byte blocks is
dropped ("block size 4096 is unsupported"); an NVMe namespace with 4096-byte blocks is handed
to int 13h with 4 KiB sectors, the MBR is loaded and its boot code (GRUB's boot.img, which
counts in 512-byte sectors) finds nothing to load. Server BIOSes and CSMs are no better, and
Microsoft requires UEFI for 4Kn. So the agent refuses a legacy install on a 4Kn disk before
anything is downloaded: the alternative is a server that does not boot.
"""

from __future__ import annotations

from pathlib import Path

from agent import messages as msg
from agent.messages import InstallError

CHOICES = ("auto", "uefi", "bios")


def booted_with_uefi(sys_root: Path = Path("/sys")) -> bool:
    """The rescue system came up through UEFI (its runtime services are visible)."""
    return (sys_root / "firmware" / "efi").is_dir()


def resolve(choice: str, sys_root: Path = Path("/sys")) -> str:
    """The firmware that will boot the disk: "uefi" or "bios" (``auto``: the rescue's own)."""
    if choice not in CHOICES:
        raise ValueError(f"firmware must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice != "auto":
        return choice
    return "uefi" if booted_with_uefi(sys_root) else "bios"


def check_bootable(firmware: str, device: str, logical_sector_size: int) -> None:
    """Refuse a disk that ``firmware`` cannot boot from (legacy BIOS and a 4Kn disk)."""
    if firmware == "bios" and logical_sector_size != 512:
        raise InstallError(msg.legacy_boot_sector_size(device, logical_sector_size))

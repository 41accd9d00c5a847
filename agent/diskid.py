"""What a disk says about itself: serial number, WWN, wwid and by-path name, from sysfs.

udev's properties are used when udevd populated them; most rescue ramdisks run no udevd, so
each value is also read where the kernel exposes it, per device kind, the way udev's own helpers
find it:

- serial: the block device's ``serial`` (virtio-blk), the controller's ``serial`` (NVMe), the
  USB device's ``serial`` (``usb_id``: sticks, card readers, BMC virtual media), the ATA
  IDENTIFY data libata exposes (``ata_id``: SATA disks and ATAPI drives), the SCSI unit serial
  number VPD page 0x80 (SAS, virtio-scsi, LSI);
- wwid: sysfs' VPD 0x83 designator string as the kernel prints it (``naa.``, ``eui.``,
  ``nvme.``, or a ``t10.`` vendor string, which is NOT a world wide name);
- wwn: only a real world wide name: a ``naa.`` designator (as ``0x...``, like udev's
  ``ID_WWN``), an NVMe ``eui.``, or the WWN words of the ATA IDENTIFY data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.bypath import Location
from agent.sysfs import listdir, read_attr, read_bytes


@dataclass(frozen=True)
class Identity:
    serial: str | None
    wwn: str | None
    wwid: str | None
    by_path: str | None
    by_path_aliases: tuple[str, ...] = ()


def ata_identify(location: Location) -> list[int] | None:
    """The 256 IDENTIFY (PACKET) DEVICE words of the ATA device behind a SCSI disk, or None.

    libata prints them as hex words in ``ataN/link*/dev*/ata_device/dev*/id``; the device is
    ``devN.T`` (T: the SCSI target, master/slave) or ``devN.B.0`` behind a port multiplier.
    """
    if location.ata_port is None or location.scsi_address is None:
        return None
    port = location.ata_port
    number = port.name.removeprefix("ata")
    _, bus, target, _ = location.scsi_address
    wanted = f"dev{number}.{bus}.0" if bus else f"dev{number}.{target}"
    candidates = []
    for link in listdir(port):
        for dev in listdir(port / link):
            if dev.startswith("dev"):
                candidates.append(port / link / dev / "ata_device" / dev / "id")
    matches = [c for c in candidates if c.parent.name == wanted]
    if not matches and len(candidates) != 1:
        return None
    text = read_attr((matches or candidates)[0])
    try:
        words = [int(w, 16) for w in (text or "").split()]
    except ValueError:
        return None
    return words if len(words) >= 256 else None


def _ata_string(words: list[int], first: int, last: int) -> str | None:
    raw = b"".join(w.to_bytes(2, "big") for w in words[first:last])
    return raw.decode("ascii", "replace").strip() or None


def _serial_from_vpd(sysdir: Path) -> str | None:
    page = read_bytes(sysdir / "device" / "vpd_pg80")
    if not page or len(page) < 4:
        return None
    return page[4 : 4 + page[3]].decode("ascii", "replace").strip() or None


def wwn_from_wwid(wwid: str | None) -> str | None:
    """The WWN in a sysfs wwid: ``naa.5000c500...`` -> ``0x5000c500...``; ``eui.`` kept."""
    if not wwid:
        return None
    low = wwid.strip().lower()
    if low.startswith("naa."):
        return "0x" + low[4:]
    if low.startswith("eui."):
        return low
    return None  # t10. vendor strings and nvme. composite ids are not world wide names


def _ata_wwn(words: list[int] | None) -> str | None:
    if not words or not words[87] & 0x0100:  # "world wide name supported"
        return None
    wwn = words[108:112]
    return "0x" + "".join(f"{w:04x}" for w in wwn) if any(wwn) else None


def _by_path(name: str, dev: Path, props: Mapping[str, str], location: Location) -> str | None:
    directory = dev / "disk" / "by-path"
    if props.get("ID_PATH"):
        return str(directory / props["ID_PATH"])
    for link in listdir(directory):
        if os.path.basename(os.path.realpath(directory / link)) == name:
            return str(directory / link)
    return str(directory / location.path_id) if location.path_id else None


def identity(
    name: str, sysdir: Path, dev: Path, props: Mapping[str, str], location: Location
) -> Identity:
    """Serial, WWN, wwid and by-path of disk ``name`` (udev first, then the kernel's files)."""
    device = sysdir / "device"
    words = ata_identify(location)
    wwid = read_attr(sysdir / "wwid") or read_attr(device / "wwid")
    serial = (
        props.get("ID_SERIAL_SHORT")
        or read_attr(sysdir / "serial")
        or read_attr(device / "serial")
        or (read_attr(location.usb_device / "serial") if location.usb_device else None)
        or (_ata_string(words, 10, 20) if words else None)
        or _serial_from_vpd(sysdir)
    )
    wwn = (
        props.get("ID_WWN_WITH_EXTENSION")
        or props.get("ID_WWN")
        or wwn_from_wwid(wwid)
        or _ata_wwn(words)
    )
    by_path = _by_path(name, dev, props, location)
    aliases = tuple(str(dev / "disk" / "by-path" / a) for a in location.aliases)
    return Identity(serial, wwn, wwid, by_path, aliases)

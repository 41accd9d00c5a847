"""Where a disk sits in the machine, from sysfs alone, the way udev's ``path_id`` names it.

A ``by_path`` hint must match in the rescue ramdisk, where no udevd runs and
``/dev/disk/by-path`` does not exist, so the name udev would give (``ID_PATH``) is derived here
from the device's sysfs ancestry, walking up from the block device like systemd's
``udev-builtin-path_id.c``:

  ``pci-0000:00:1f.2-ata-1.0``                      SATA behind AHCI, port 1 (compat: ``-ata-1``)
  ``pci-0000:00:05.0-nvme-1``                        NVMe namespace 1
  ``pci-0000:00:04.0-scsi-0:0:1:0``                  virtio-scsi / LSI / MegaRAID logical disk
  ``pci-0000:00:06.0-usb-0:1:1.0-scsi-0:0:0:0``     USB mass storage on port 1
  ``pci-0000:00:07.0``                               virtio-blk (compat: ``virtio-pci-...``)
  ``pci-0000:00:08.0-sas-phy2-lun-0``                SAS disk on phy 2 of an HBA

The same walk tells the transport (``nvme``, ``sata``, ``sas``, ``scsi``, ``usb``, ``virtio``)
and where the device's own identity lives (the USB device's ``serial``, libata's IDENTIFY data).
Transports udev names differently (iSCSI, FC, Hyper-V) get no path rather than a wrong one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.sysfs import ancestors, devtype, listdir, read_attr, subsystem


@dataclass(frozen=True)
class Location:
    """A disk's place: udev's ``ID_PATH``, its transport, the devices holding its identity."""

    path_id: str | None = None
    transport: str | None = None
    usb_device: Path | None = None  # the USB device (its ``serial`` is the stick's serial)
    ata_port: Path | None = None  # libata's ``ataN`` (IDENTIFY data under it)
    scsi_address: tuple[int, int, int, int] | None = None  # host:bus:target:lun
    aliases: tuple[str, ...] = field(default=(), compare=False)


@dataclass
class _Walk:
    sysfs: Path
    chain: list[Path]
    parts: list[str] = field(default_factory=list)
    transports: list[str] = field(default_factory=list)
    parent_ok: bool = False
    usb_device: Path | None = None
    ata_port: Path | None = None
    scsi_address: tuple[int, int, int, int] | None = None
    unsupported: bool = False

    def skip(self, i: int, sub: str) -> int:
        """Index of the outermost device of an unbroken run of ``sub`` devices from ``i``."""
        while i + 1 < len(self.chain) and subsystem(self.chain[i + 1]) == sub:
            i += 1
        return i

    def find(self, i: int, kind: str) -> int | None:
        """Index of the first device at or above ``i`` of devtype ``kind``."""
        for j in range(i, len(self.chain)):
            if devtype(self.chain[j]) == kind:
                return j
        return None


def locate(name: str, sysfs: Path) -> Location:
    """The ``Location`` of block device ``name`` (all None for virtual devices)."""
    try:
        node = (sysfs / "block" / name).resolve(strict=True)
    except OSError:
        return Location()
    walk = _Walk(sysfs, ancestors(node, sysfs.resolve()))
    chain = walk.chain
    i = 0
    while i < len(chain):
        i = _step(walk, i) + 1
    transport = "usb" if "usb" in walk.transports else next(iter(walk.transports), None)
    path_id = None
    if walk.parts and walk.parent_ok and walk.transports and not walk.unsupported:
        path_id = "-".join(reversed(walk.parts))
    return Location(
        path_id=path_id,
        transport=transport,
        usb_device=walk.usb_device,
        ata_port=walk.ata_port,
        scsi_address=walk.scsi_address,
        aliases=compat_aliases(path_id, transport),
    )


def _step(walk: _Walk, i: int) -> int:
    """Handle device ``chain[i]``; return the index of the last device it consumed."""
    dev = walk.chain[i]
    sub = subsystem(dev)
    if sub == "scsi":
        return _scsi(walk, i)
    if sub == "usb" and devtype(dev) in ("usb_interface", "usb_device"):
        port = dev.name.partition("-")[2]
        if not port:
            return i
        walk.parts.append(f"usb-0:{port}")
        walk.transports.append("usb")
        end = walk.skip(i, "usb")
        usb_dev = walk.find(i, "usb_device")
        walk.usb_device = walk.chain[usb_dev] if usb_dev is not None else None
        return end
    if sub == "nvme":
        nsid = read_attr(walk.chain[0] / "nsid")
        if nsid:
            walk.parts.append(f"nvme-{nsid}")
            walk.transports.append("nvme")
            walk.parent_ok = True
            return walk.skip(i, "nvme")
        return i
    if sub == "virtio":
        walk.transports.append("virtio")
        return walk.skip(i, "virtio")
    if sub in ("pci", "platform", "acpi", "xen"):
        walk.parts.append(f"{sub}-{dev.name}")
        walk.parent_ok = True
        if sub == "platform":
            walk.transports.append("platform")
        return walk.skip(i, sub)
    return i


_ADDRESS = re.compile(r"^(\d+):(\d+):(\d+):(\d+)$")


def _scsi(walk: _Walk, i: int) -> int:
    dev = walk.chain[i]
    address = _ADDRESS.match(dev.name)
    if devtype(dev) != "scsi_device" or not address:
        return i
    host, bus, target, lun = (int(x) for x in address.groups())
    walk.scsi_address = (host, bus, target, lun)
    where = str(dev)
    if any(mark in where for mark in ("/rport-", "/session", "/vmbus_", "/VMBUS")):
        walk.transports.append("scsi")
        walk.unsupported = True  # FC, iSCSI, Hyper-V: named from data we do not read here
        return i
    if "/end_device-" in where:
        walk.transports.append("sas")
        return _sas(walk, i, lun)
    if "/ata" in where:
        walk.transports.append("sata")
        return _ata(walk, i, bus, target)
    walk.transports.append("scsi")
    host_at = walk.find(i, "scsi_host")
    if host_at is None:
        return i
    hostdev = walk.chain[host_at]
    numbers = [int(n[4:]) for n in listdir(hostdev.parent) if re.fullmatch(r"host\d+", n)]
    base = min(numbers) if numbers else host
    walk.parts.append(f"scsi-{host - base}:{bus}:{target}:{lun}")
    return host_at


def _ata(walk: _Walk, i: int, bus: int, target: int) -> int:
    host_at = walk.find(i, "scsi_host")
    if host_at is None or host_at + 1 >= len(walk.chain):
        walk.unsupported = True
        return i
    port = walk.chain[host_at + 1]
    walk.ata_port = port
    port_no = read_attr(walk.sysfs / "class" / "ata_port" / port.name / "port_no")
    if port_no is None:
        walk.unsupported = True
        return i
    # systemd >= 250: master/slave by target id, port-multiplier links by bus
    walk.parts.append(f"ata-{port_no}.{bus}.0" if bus else f"ata-{port_no}.{target}")
    return i


def _sas(walk: _Walk, i: int, lun: int) -> int:
    target_at = walk.find(i, "scsi_target")
    if target_at is None or target_at + 2 >= len(walk.chain):
        walk.unsupported = True
        return i
    end_device, port = walk.chain[target_at + 1], walk.chain[target_at + 2]
    sas = walk.sysfs / "class"
    lun_part = f"lun-{lun}" if lun < 256 else f"lun-0x{lun & 0xFFFF:04x}{lun >> 16:04x}00000000"
    if read_attr(sas / "sas_port" / port.name / "num_phys") != "1":
        address = read_attr(sas / "sas_device" / end_device.name / "sas_address")
        if address is None:
            walk.unsupported = True
            return i
        walk.parts.append(f"sas-{address}-{lun_part}")
        return i
    phy = read_attr(sas / "sas_device" / end_device.name / "phy_identifier")
    if phy is None:
        walk.unsupported = True
        return i
    expander = read_attr(sas / "sas_device" / port.parent.name / "sas_address")
    via = f"exp{expander}-" if expander else ""
    walk.parts.append(f"sas-{via}phy{phy}-{lun_part}")
    return i


def compat_aliases(path_id: str | None, transport: str | None) -> tuple[str, ...]:
    """Other by-path names udev's rules also create for the same disk (older or legacy forms):
    ``...-ata-1`` for ``...-ata-1.0`` (``ID_PATH_ATA_COMPAT``) and ``virtio-pci-...`` for a
    virtio-blk disk's ``pci-...``."""
    if not path_id:
        return ()
    found = []
    compat = re.sub(r"-ata-(\d+)\.\d+(\.0)?$", r"-ata-\1", path_id)
    if compat != path_id:
        found.append(compat)
    if transport == "virtio" and path_id.startswith("pci-") and "-" not in path_id[4:]:
        found.append("virtio-" + path_id)
    return tuple(found)

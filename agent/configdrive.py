"""The OpenStack config drive (v2) that hands the request to cloud-init inside the image.

cloud-init (Linux), cloudbase-init (Windows) and nuageinit (FreeBSD) all read the same layout:
``openstack/<version>/meta_data.json``, ``user_data``, ``vendor_data.json`` on a filesystem
labelled ``config-2``. On 512-byte-sector disks it is ISO 9660 (Rock Ridge for Linux/BSD
names, Joliet for Windows), as Nova writes it. Linux cannot mount ISO 9660 on a disk with
4096-byte logical sectors, so there the same tree goes on a FAT filesystem labelled ``CONFIG-2``
whose logical sector size is the disk's (the kernel refuses a FAT sector smaller than the
device's).
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pycdlib

from agent import messages
from agent.messages import InstallError
from agent.payload import InstallRequest
from agent.tools import ToolError, run
from agent.units import CONFIG_DRIVE_MAX, MiB

log = logging.getLogger(__name__)

ISO_LABEL = "config-2"
FAT_LABEL = "CONFIG-2"
DMI_UUID = Path("/sys/class/dmi/id/product_uuid")
SYS_CLASS_NET = Path("/sys/class/net")
DEFAULT_HOSTNAME_PREFIX = "byoi"

# Every dated version cloud-init 22.x-24.x knows (it picks the newest one present), plus
# "latest", which cloudbase-init and nuageinit read. The files are tiny, so duplicating them is
# cheaper than the risk of a reader that only knows one particular date.
VERSIONS = (
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "latest",
)

# BIOS placeholders shared by many boards: not an identity, so a fresh UUID is better.
_BOGUS_UUIDS = {
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",
}


def system_uuid(path: Path | None = None) -> str | None:
    """The server's DMI product UUID, lower case, or None when unreadable or a placeholder.

    cloud-init's ConfigDrive ``check_instance_id`` compares the instance-id with this UUID on
    every boot: when they match it trusts its cached data instead of searching again.
    """
    try:
        text = (path or DMI_UUID).read_text(encoding="ascii", errors="replace").strip().lower()
        value = str(uuid.UUID(text))
    except (OSError, ValueError):
        return None
    return None if value in _BOGUS_UUIDS else value


def build_meta_data(request: InstallRequest, instance_uuid: str) -> dict:
    """``meta_data.json`` in Nova's shape (the keys the three readers use)."""
    hostname = request.hostname or f"{DEFAULT_HOSTNAME_PREFIX}-{instance_uuid[:8]}"
    names = [f"key-{i}" for i in range(len(request.ssh_keys))]
    return {
        "uuid": instance_uuid,
        "name": hostname,
        "hostname": hostname,
        "launch_index": 0,
        "availability_zone": "nova",
        "public_keys": dict(zip(names, request.ssh_keys, strict=True)),
        "keys": [
            {"name": n, "type": "ssh", "data": k}
            for n, k in zip(names, request.ssh_keys, strict=True)
        ],
        "meta": dict(request.metadata),
        "files": [],
        "devices": [],
    }


@dataclass(frozen=True)
class Nic:
    name: str
    mac: str
    mtu: int | None = None


def physical_nics(sys_class_net: Path = SYS_CLASS_NET) -> list[Nic]:
    """The server's physical NICs as the rescue system sees them (those backed by a device)."""
    nics = []
    for entry in sorted(sys_class_net.glob("*")):
        if not (entry / "device").exists():
            continue  # lo, bridges, tunnels, veth
        try:
            mac = (entry / "address").read_text().strip().lower()
            mtu_text = (entry / "mtu").read_text().strip()
        except OSError:
            continue
        if not mac or mac == "00:00:00:00:00:00":
            continue
        nics.append(Nic(entry.name, mac, int(mtu_text) if mtu_text.isdigit() else None))
    return nics


def build_network_data(nics: list[Nic]) -> dict | None:
    """``network_data.json``: DHCP (v4) on every physical NIC, matched by MAC address.

    The installed OS names its NICs differently from the rescue system, so links are keyed by
    MAC, which cloud-init maps to its own names. With no NIC known, no file is written: an empty
    ``{"links": []}`` would make cloud-init configure nothing instead of its DHCP fallback.
    """
    if not nics:
        return None
    links, networks = [], []
    for index, nic in enumerate(nics):
        link = {"id": f"nic{index}", "type": "phy", "ethernet_mac_address": nic.mac}
        if nic.mtu:
            link["mtu"] = nic.mtu
        links.append(link)
        networks.append(
            {
                "id": f"network{index}",
                "type": "ipv4_dhcp",
                "link": f"nic{index}",
                "network_id": str(uuid.uuid5(uuid.NAMESPACE_OID, nic.mac)),
            }
        )
    return {"links": links, "networks": networks, "services": []}


def build_tree(
    request: InstallRequest,
    *,
    instance_uuid: str | None = None,
    nics: list[Nic] | None = None,
) -> dict[str, bytes]:
    """Every file of the drive, relative path -> content.

    ``nics`` defaults to the server's physical NICs; ``network_data.json`` is written only when
    there are some (see ``build_network_data``). ``user_data`` exists only when the request
    has some.
    """
    iid = instance_uuid or system_uuid() or str(uuid.uuid4())
    meta = _json(build_meta_data(request, iid))
    vendor = _json({})
    network = build_network_data(physical_nics() if nics is None else nics)
    tree: dict[str, bytes] = {}
    for version in VERSIONS:
        base = f"openstack/{version}"
        tree[f"{base}/meta_data.json"] = meta
        tree[f"{base}/vendor_data.json"] = vendor
        if network is not None and version >= "2015-10-15":  # network_data's first version
            tree[f"{base}/network_data.json"] = _json(network)
        if request.user_data is not None:
            tree[f"{base}/user_data"] = request.user_data
    return tree


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# --- ISO 9660 -----------------------------------------------------------------------------------


def _iso_name(name: str, is_dir: bool, taken: set[str]) -> str:
    """A unique ISO 9660 level-3 name (d-characters only); readers use the RR/Joliet name."""
    stem, dot, ext = name.rpartition(".") if not is_dir and "." in name else (name, "", "")
    stem = re.sub(r"[^A-Z0-9_]", "_", stem.upper())[:24] or "_"
    ext = re.sub(r"[^A-Z0-9_]", "_", ext.upper())[:4]
    base, n = stem, 0
    while True:
        candidate = base if is_dir else f"{base}.{ext}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate if is_dir else candidate + ";1"
        n += 1
        base = f"{stem[:20]}_{n}"


def build_iso(tree: dict[str, bytes], out: Path) -> Path:
    """Write ``tree`` as ISO 9660 + Rock Ridge + Joliet labelled ``config-2`` (like Nova's)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=ISO_LABEL, joliet=3, rock_ridge="1.09")
    dirs: dict[str, str] = {"": ""}  # real dir -> ISO dir
    taken: dict[str, set[str]] = {"": set()}
    try:
        for rel in sorted(tree):
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                real = "/".join(parts[:depth])
                if real in dirs:
                    continue
                parent = "/".join(parts[: depth - 1])
                iso_dir = f"{dirs[parent]}/{_iso_name(parts[depth - 1], True, taken[parent])}"
                iso.add_directory(iso_dir, rr_name=parts[depth - 1], joliet_path="/" + real)
                dirs[real], taken[real] = iso_dir, set()
            parent = "/".join(parts[:-1])
            data = tree[rel]
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                f"{dirs[parent]}/{_iso_name(parts[-1], False, taken[parent])}",
                rr_name=parts[-1],
                joliet_path="/" + rel,
            )
        iso.write(str(out))
    except (pycdlib.pycdlibexception.PyCdlibException, OSError) as exc:
        raise InstallError(
            messages.CONFIGDRIVE_FAILED, f"building the ISO 9660 drive: {exc}"
        ) from exc
    finally:
        iso.close()
    return out


# --- FAT ----------------------------------------------------------------------------------------


def fat_size(tree: dict[str, bytes], sector_size: int) -> int:
    """Bytes for a FAT image holding ``tree``: each file and directory rounded up to a
    cluster (one sector here), plus room for the FATs and root directory, in whole MiB."""
    cluster = max(sector_size, 4096)
    dirs = {rel.rsplit("/", 1)[0] for rel in tree} | {"openstack"}
    data = sum(-(-max(len(v), 1) // cluster) * cluster for v in tree.values())
    need = data + len(dirs) * cluster + 64 * cluster + 256 * 1024
    return -(-need // MiB) * MiB


def build_fat(tree: dict[str, bytes], out: Path, *, sector_size: int = 4096) -> Path:
    """Write ``tree`` as a FAT filesystem labelled ``CONFIG-2`` with ``sector_size`` sectors
    (mkfs.fat and mtools: no mount needed)."""
    size = fat_size(tree, sector_size)
    if size > CONFIG_DRIVE_MAX:
        raise InstallError(messages.CONFIGDRIVE_FAILED, f"FAT drive would need {size} bytes")
    out.unlink(missing_ok=True)
    try:
        run(
            [
                "mkfs.fat",
                "-C",
                "-n",
                FAT_LABEL,
                "-S",
                str(sector_size),
                "-s",
                "1",
                str(out),
                str(size // 1024),
            ],
            timeout=60,
        )
        with tempfile.TemporaryDirectory(prefix="configdrive-") as tmp:
            root = Path(tmp)
            for rel, data in tree.items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            top = sorted({rel.split("/", 1)[0] for rel in tree})
            run(
                ["mcopy", "-s", "-Q", "-i", str(out), *(str(root / t) for t in top), "::/"],
                timeout=60,
            )
    except ToolError as exc:
        out.unlink(missing_ok=True)
        raise InstallError(
            messages.CONFIGDRIVE_FAILED, f"building the FAT drive: {exc.detail}"
        ) from exc
    return out


def build_drive(
    request: InstallRequest, out: Path, *, sector_size: int = 512, nics: list[Nic] | None = None
) -> Path:
    """Build the drive image file for a disk with ``sector_size``-byte logical sectors.

    Also what ``byoi-agent configdrive --payload FILE --output FILE`` runs.
    """
    if sector_size < 512 or sector_size & (sector_size - 1):
        raise InstallError(messages.CONFIGDRIVE_FAILED, f"unsupported sector size {sector_size}")
    tree = build_tree(request, nics=nics)
    if sector_size == 512:
        build_iso(tree, out)
    else:
        build_fat(tree, out, sector_size=sector_size)
    size = out.stat().st_size
    if size > CONFIG_DRIVE_MAX:
        out.unlink(missing_ok=True)
        raise InstallError(messages.CONFIGDRIVE_FAILED, f"drive is {size} bytes, over 64 MiB")
    log.info(
        "config drive built: %s (%d bytes, %s)",
        out,
        size,
        "ISO 9660" if sector_size == 512 else f"FAT, {sector_size}-byte sectors",
    )
    return out

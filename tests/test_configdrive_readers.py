"""The config drive, read by cloudbase-init (the cloud-init of Windows images).

cloud-init's reading is proven in test_configdrive.py; here cloudbase-init's own code (the PyPI
wheel, see tests/cloudbase_reader.py) reads the same drives: both through its service on a
copied-out drive, and through its whole Windows search on disk images (raw ISO in a GPT
partition, found by sniffing partitions and extracted with bsdtar; FAT found by label with
mtools).
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from cloudbase_reader import (
    RecordingNetworkOSUtils,
    discovered_service,
    fetch_cloudbaseinit,
    find_bsdtar,
    import_cloudbaseinit,
    mtools_dir,
    read_with_cloudbaseinit,
    run_network_plugin,
    service_for_dir,
)
from cloudinit_reader import extract_fat, extract_iso

from agent import configdrive
from agent.payload import parse_request

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "cloudbase-init"
UUID = "7b1f0c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b"
KEYS = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA one@example",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB two@example",
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAI three",
]
PS1 = "#ps1_sysnative\nNew-Item -Path C:\\ok.txt -ItemType File\n"
CLOUD_CONFIG = "#cloud-config\nset_hostname: win-1\nwrite_files:\n  - path: C:\\ok.txt\n"
META = {"admin_username": "operator", "admin_pass": "S3cret-pass", "role": "web"}
NICS = [
    configdrive.Nic("eno1", "0c:c4:7a:12:34:56", 9000),
    configdrive.Nic("eno2", "0c:c4:7a:12:34:57", None),
]


@pytest.fixture(scope="session")
def cbi():
    """cloudbase-init's modules, from its PyPI wheel (downloaded once into .cache/)."""
    return import_cloudbaseinit(fetch_cloudbaseinit(CACHE))


@pytest.fixture(scope="session")
def tools():
    return {"bsdtar": find_bsdtar(CACHE), "mtools": mtools_dir(CACHE)}


def request(*items: tuple[str, str], hostname: str | None = "win-1"):
    meta = [{"key": "imageURL", "value": "https://example.com/w.qcow2"}]
    meta += [{"key": "imageType", "value": "qcow2"}]
    meta += [{"key": k, "value": v} for k, v in items]
    body = {"templateName": "byoi_64", "userMetadata": meta}
    if hostname:
        body["details"] = {"customHostname": hostname}
    return parse_request(body)


CASES = {
    "plain-user-data-keys-meta": [
        ("configDriveUserData", PS1),
        ("sshKey", "\n".join(KEYS)),
        ("configDriveMetadata", json.dumps(META)),
    ],
    "base64-cloud-config": [
        ("configDriveUserData", base64.b64encode(CLOUD_CONFIG.encode()).decode())
    ],
    "nothing": [],
}


def build(tmp_path: Path, case: str, sector_size: int, nics: list) -> Path:
    out = tmp_path / f"drive-{sector_size}.img"
    return configdrive.build_drive(request(*CASES[case]), out, sector_size=sector_size, nics=nics)


def check(cbi, seen: dict, case: str, drive_meta: dict) -> None:
    items = dict(CASES[case])
    assert seen["instance_id"] == drive_meta["uuid"]
    assert seen["hostname"] == "win-1"
    assert seen["instance_data"]["v1"]["local-hostname"] == "win-1"
    assert seen["public_keys"] == (sorted(KEYS) if "sshKey" in items else [])
    if case == "base64-cloud-config":
        assert seen["user_data"] == CLOUD_CONFIG.encode()  # what its cloud-config plugin parses
    elif "configDriveUserData" in items:
        assert seen["user_data"] == PS1.encode()
        # UserDataPlugin picks its executor by the script's header: PowerShell, 64-bit.
        command = cbi.userdatautils.get_command(seen["user_data"])
        assert isinstance(command, cbi.execcmd.PowershellSysnative)
    else:
        assert seen["user_data"] is None
    if "configDriveMetadata" in items:
        assert seen["meta"] == META
        assert (seen["admin_username"], seen["admin_password"]) == ("operator", "S3cret-pass")
    else:
        assert seen["meta"] == {}
        assert (seen["admin_username"], seen["admin_password"]) == (None, None)
    assert seen["network_v1"] is None  # no legacy debian-interfaces network_config


@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cloudbaseinit_reads_the_copied_drive(
    cbi, tmp_path: Path, case: str, sector_size: int
) -> None:
    out = build(tmp_path, case, sector_size, nics=[])
    extract = extract_iso if sector_size == 512 else extract_fat
    tree = extract(out, tmp_path / "tree")
    seen = read_with_cloudbaseinit(cbi, service_for_dir(cbi, tree))
    check(cbi, seen, case, json.loads((tree / "openstack/latest/meta_data.json").read_text()))
    # No NIC known, no network_data.json: cloudbase-init leaves Windows' DHCP alone.
    assert seen["network_v2"] is None


@pytest.mark.parametrize(
    "header", ["#ps1_sysnative\n", "#ps1_x86\n", "rem cmd\r\n", "<powershell>"]
)
def test_base64_windows_scripts_are_decoded(cbi, tmp_path: Path, header: str) -> None:
    """A base64 Windows script lands decoded on the drive, so cloudbase-init runs it."""
    script = header + "echo ok\n"
    req = request(("configDriveUserData", base64.b64encode(script.encode()).decode()))
    tree = configdrive.build_tree(req, instance_uuid=UUID, nics=[])
    user_data = tree["openstack/latest/user_data"]
    assert cbi.userdatautils.get_command(user_data) is not None, user_data[:40]


def test_missing_user_data_is_what_the_plugin_expects(cbi, tmp_path: Path) -> None:
    """UserDataPlugin treats NotExistingMetadataException as 'no user data', nothing else."""
    tree = extract_iso(build(tmp_path, "nothing", 512, nics=[]), tmp_path / "tree")
    with pytest.raises(cbi.base.NotExistingMetadataException):
        service_for_dir(cbi, tree).get_user_data()


def test_network_data_links_by_mac_with_dhcp(cbi, tmp_path: Path) -> None:
    tree = extract_iso(build(tmp_path, "nothing", 512, nics=NICS), tmp_path / "tree")
    service = service_for_dir(cbi, tree)
    details = read_with_cloudbaseinit(cbi, service)["network_v2"]
    physical = cbi.network.LINK_TYPE_PHYSICAL
    assert [(link.id, link.type, link.mac_address, link.mtu) for link in details.links] == [
        ("nic0", physical, "0c:c4:7a:12:34:56", 9000),
        ("nic1", physical, "0c:c4:7a:12:34:57", None),
    ]
    # ipv4_dhcp networks carry no address: cloudbase-init sets nothing static (Windows DHCP).
    assert details.networks == [] and details.services == []

    # What NetworkConfigPlugin then asks Windows to do, adapters found by MAC.
    osutils = RecordingNetworkOSUtils(
        cbi, {"0C:C4:7A:12:34:56": "Ethernet", "0C:C4:7A:12:34:57": "Ethernet 2"}
    )
    result = run_network_plugin(cbi, service, osutils)
    assert result == (cbi.networkconfig.plugin_base.PLUGIN_EXECUTION_DONE, False)
    assert osutils.calls == [
        ("rename", "Ethernet", "nic0"),
        ("mtu", "nic0", 9000),
        ("enable", "nic0", True),
        ("rename", "Ethernet 2", "nic1"),
        ("enable", "nic1", True),
    ]


def test_network_data_with_a_nic_windows_cannot_see(cbi, tmp_path: Path) -> None:
    """A NIC Windows has no driver for makes NetworkConfigPlugin fail (cloudbase-init logs it
    and retries it on the next boot); the adapters before it are already handled."""
    tree = extract_iso(build(tmp_path, "nothing", 512, nics=NICS), tmp_path / "tree")
    osutils = RecordingNetworkOSUtils(cbi, {"0c:c4:7a:12:34:56": "Ethernet"})
    with pytest.raises(cbi.exception.ItemNotFoundException, match="0c:c4:7a:12:34:57"):
        run_network_plugin(cbi, service_for_dir(cbi, tree), osutils)
    assert ("rename", "Ethernet", "nic0") in osutils.calls


def test_largest_drive_fits_the_iso_size_cloudbaseinit_reads(cbi) -> None:
    """On a raw disk/partition it sizes the ISO from the low 16 bits of the volume space size
    (``struct.unpack("<H")``): an ISO over 65535 blocks would be copied truncated."""
    assert cbi.windows.PEEK_SIZE == 2
    assert configdrive.CONFIG_DRIVE_MAX // 2048 <= 0xFFFF


def gpt_disk_with_iso(tmp_path: Path, iso: Path) -> Path:
    """A 512-byte-sector GPT disk image: a data partition, then the ISO in a Basic Data
    partition, as the agent lays out an installed disk."""
    disk = tmp_path / "disk.img"
    size_mib = 8 + -(-iso.stat().st_size // (1024 * 1024)) + 2
    with open(disk, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    subprocess.run(
        [
            "sgdisk",
            "-n",
            "1:2048:+4M",
            "-t",
            "1:8300",
            "-n",
            f"2:0:+{iso.stat().st_size // 512}",
            "-t",
            "2:0700",
            "-c",
            "2:config-2",
            str(disk),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(disk)], check=True, capture_output=True, text=True
        ).stdout
    )
    start = table["partitiontable"]["partitions"][1]["start"] * 512
    with open(disk, "r+b") as f:
        f.seek(start)
        f.write(iso.read_bytes())
    return disk


@pytest.mark.parametrize("case", ["plain-user-data-keys-meta", "nothing"])
def test_cloudbaseinit_finds_the_iso_partition_on_the_disk(
    cbi, tools, tmp_path: Path, case: str
) -> None:
    """Its Windows search, unchanged: not a raw ISO at the start of the disk, so it sniffs each
    partition for CD001, copies the ISO by its own volume size, and bsdtar extracts it."""
    iso = build(tmp_path, case, 512, nics=NICS)
    disk = gpt_disk_with_iso(tmp_path, iso)
    with discovered_service(cbi, [disk], **tools) as service:
        seen = read_with_cloudbaseinit(cbi, service)
        drive_meta = json.loads(
            (Path(service._metadata_path) / "openstack/latest/meta_data.json").read_text()
        )
    check(cbi, seen, case, drive_meta)
    assert [link.mac_address for link in seen["network_v2"].links] == [n.mac for n in NICS]


@pytest.mark.parametrize("case", ["plain-user-data-keys-meta", "base64-cloud-config"])
def test_cloudbaseinit_finds_the_fat_drive_by_label(cbi, tools, tmp_path: Path, case: str) -> None:
    """The 4Kn drive (FAT, 4096-byte sectors): mlabel must report CONFIG-2 and mcopy copy it, as
    cloudbase-init's hdd/vfat search does with mtools."""
    fat = build(tmp_path, case, 4096, nics=[])
    with discovered_service(cbi, [fat], **tools) as service:
        seen = read_with_cloudbaseinit(cbi, service)
        drive_meta = json.loads(
            (Path(service._metadata_path) / "openstack/latest/meta_data.json").read_text()
        )
    check(cbi, seen, case, drive_meta)
    assert seen["network_v2"] is None

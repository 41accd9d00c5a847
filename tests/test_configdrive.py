"""The config drive's content, read back by cloud-init's own ConfigDrive code."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from cloudinit_reader import (
    extract_fat,
    extract_iso,
    fetch_cloudinit,
    import_cloudinit,
    read_with_cloudinit,
)

from agent import configdrive, messages
from agent.messages import InstallError
from agent.payload import parse_request

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "cloud-init"
UUID = "5a3c1e0f-9d2b-4c6e-8f11-2b7d0a9e4c33"
KEYS = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA one@example\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB two"
CLOUD_CONFIG = "#cloud-config\npackages:\n  - htop\nruncmd:\n  - [touch, /tmp/ok]\n"


@pytest.fixture(scope="session")
def cloudinit():
    """cloud-init's modules, from Debian's package (downloaded once into .cache/)."""
    return import_cloudinit(fetch_cloudinit(CACHE))


def install_start(*items: tuple[str, str], hostname: str | None = "web-1"):
    meta = [{"key": "imageURL", "value": "https://example.com/i.qcow2"}]
    meta += [{"key": "imageType", "value": "qcow2"}]
    meta += [{"key": k, "value": v} for k, v in items]
    body = {"templateName": "byoi_64", "userMetadata": meta}
    if hostname:
        body["details"] = {"customHostname": hostname}
    return parse_request(body)


def blkid(path: Path) -> dict[str, str]:
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# --- the tree -----------------------------------------------------------------------------------


def test_tree_layout_and_meta_data() -> None:
    req = install_start(
        ("sshKey", KEYS),
        ("configDriveUserData", CLOUD_CONFIG),
        ("configDriveMetadata", json.dumps({"role": "web", "tier": "1"})),
    )
    tree = configdrive.build_tree(req, instance_uuid=UUID, nics=[])
    for version in ("2012-08-10", "2017-02-22", "latest"):
        assert f"openstack/{version}/meta_data.json" in tree
        assert tree[f"openstack/{version}/user_data"] == CLOUD_CONFIG.encode()
        assert json.loads(tree[f"openstack/{version}/vendor_data.json"]) == {}
    # No NIC known: no network_data.json (an empty one would make cloud-init configure no NIC).
    assert not any(p.endswith("network_data.json") for p in tree)
    md = json.loads(tree["openstack/latest/meta_data.json"])
    assert md["uuid"] == UUID
    assert md["hostname"] == md["name"] == "web-1"
    assert md["public_keys"] == {"key-0": KEYS.splitlines()[0], "key-1": KEYS.splitlines()[1]}
    assert md["keys"][1] == {"name": "key-1", "type": "ssh", "data": KEYS.splitlines()[1]}
    assert md["meta"] == {"role": "web", "tier": "1"}
    assert md["launch_index"] == 0 and md["files"] == []


def test_without_user_data_or_hostname_there_is_no_user_data_file() -> None:
    tree = configdrive.build_tree(install_start(hostname=None), instance_uuid=UUID)
    assert not any(p.endswith("user_data") for p in tree)
    md = json.loads(tree["openstack/latest/meta_data.json"])
    assert md["hostname"] == "byoi-5a3c1e0f"
    assert md["public_keys"] == {} and md["meta"] == {}


def test_system_uuid(tmp_path: Path) -> None:
    f = tmp_path / "product_uuid"
    f.write_text("4C4C4544-0042-3510-8052-B4C04F4D4E32\n")
    assert configdrive.system_uuid(f) == "4c4c4544-0042-3510-8052-b4c04f4d4e32"
    f.write_text("03000200-0400-0500-0006-000700080009\n")
    assert configdrive.system_uuid(f) is None
    f.write_text("Not Settable\n")
    assert configdrive.system_uuid(f) is None
    assert configdrive.system_uuid(tmp_path / "missing") is None


def test_iso_names_stay_unique() -> None:
    taken: set[str] = set()
    names = [configdrive._iso_name(n, False, taken) for n in ("a-b.json", "a_b.json", "A.B.json")]
    assert len(set(names)) == 3
    assert all(n.endswith(";1") for n in names)


def test_unsupported_sector_size(tmp_path: Path) -> None:
    with pytest.raises(InstallError) as err:
        configdrive.build_drive(install_start(), tmp_path / "d", sector_size=1000)
    assert err.value.message == messages.CONFIGDRIVE_FAILED
    assert "1000" in err.value.detail


# --- the drives, read by cloud-init ------------------------------------------------------------

CASES = {
    "plain-user-data": [("configDriveUserData", CLOUD_CONFIG), ("sshKey", KEYS)],
    "base64-user-data": [
        ("configDriveUserData", base64.b64encode(CLOUD_CONFIG.encode()).decode()),
        ("configDriveMetadata", '{"role": "db"}'),
    ],
    "one-line-user-data": [("configDriveUserData", CLOUD_CONFIG.replace("\n", "\\n"))],
    "indexed-metadata": [
        ("configDriveMetadata0Key", "role"),
        ("configDriveMetadata0Value", "cache"),
        ("configDriveMetadata1Key", "zone"),
        ("configDriveMetadata1Value", "rbx"),
    ],
    "nothing": [],
}
EXPECTED_META = {
    "plain-user-data": {},
    "base64-user-data": {"role": "db"},
    "one-line-user-data": {},
    "indexed-metadata": {"role": "cache", "zone": "rbx"},
    "nothing": {},
}


@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cloudinit_reads_the_drive(cloudinit, tmp_path: Path, case: str, sector_size: int) -> None:
    req = install_start(*CASES[case])
    out = configdrive.build_drive(req, tmp_path / "drive.img", sector_size=sector_size, nics=[])
    assert out.stat().st_size <= configdrive.CONFIG_DRIVE_MAX
    probe = blkid(out)
    if sector_size == 512:
        assert (probe["LABEL"], probe["TYPE"]) == ("config-2", "iso9660")
        tree = extract_iso(out, tmp_path / "tree")
    else:
        assert (probe["LABEL"], probe["TYPE"]) == ("CONFIG-2", "vfat")
        # The FAT's own sector size must be the disk's, or Linux refuses to mount it.
        assert int.from_bytes(out.read_bytes()[11:13], "little") == sector_size
        tree = extract_fat(out, tmp_path / "tree")

    seen = read_with_cloudinit(cloudinit, tree, tmp_path / "ci")
    assert seen["version"] == 2
    assert seen["hostname"] == "web-1"
    assert seen["meta"] == EXPECTED_META[case]
    expected_keys = KEYS.splitlines() if ("sshKey", KEYS) in CASES[case] else []
    assert seen["ssh_keys"] == expected_keys
    if "user-data" in case:
        assert seen["userdata"] == CLOUD_CONFIG.encode()
    else:
        assert not seen["userdata"]
        assert not (tree / "openstack" / "latest" / "user_data").exists()
    # cloud-init keeps the DMI UUID (or a fresh one) as instance-id; no network config of
    # ours, so it falls back to DHCP on the first connected NIC.
    assert (
        seen["instance_id"]
        == json.loads((tree / "openstack/latest/meta_data.json").read_text())["uuid"]
    )
    assert seen["network_config"] is None


def test_instance_id_is_the_dmi_uuid(cloudinit, tmp_path: Path, monkeypatch) -> None:
    dmi = tmp_path / "product_uuid"
    dmi.write_text(UUID.upper() + "\n")
    monkeypatch.setattr(configdrive, "DMI_UUID", dmi)
    out = configdrive.build_drive(install_start(), tmp_path / "drive.iso")
    seen = read_with_cloudinit(cloudinit, extract_iso(out, tmp_path / "tree"), tmp_path / "ci")
    assert seen["instance_id"] == UUID
    # cloud-init's own boot-time check ("is the cached instance still this machine?")
    assert seen["instance_id"].lower() == dmi.read_text().strip().lower()


def test_network_data_dhcp_on_every_physical_nic(cloudinit, tmp_path: Path) -> None:
    """The server's own NICs (matched by MAC) get DHCP from cloud-init's network config."""
    nics = configdrive.physical_nics()
    if not nics:
        pytest.skip("this machine has no physical NIC in /sys/class/net")
    fake = tmp_path / "net"
    (fake / "eth9" / "device").mkdir(parents=True)
    (fake / "eth9" / "address").write_text(nics[0].mac.upper() + "\n")
    (fake / "eth9" / "mtu").write_text("9000\n")
    (fake / "lo").mkdir()
    (fake / "lo" / "address").write_text("00:00:00:00:00:00\n")
    assert configdrive.physical_nics(fake) == [configdrive.Nic("eth9", nics[0].mac, 9000)]
    tree = configdrive.build_tree(install_start(), instance_uuid=UUID, nics=nics[:1])
    assert "openstack/2012-08-10/network_data.json" not in tree
    assert "openstack/latest/network_data.json" in tree
    out = configdrive.build_drive(install_start(), tmp_path / "drive.iso", nics=nics[:1])
    seen = read_with_cloudinit(cloudinit, extract_iso(out, tmp_path / "tree"), tmp_path / "ci")
    config = seen["network_config"]
    assert config["version"] == 1
    physical = [c for c in config["config"] if c["type"] == "physical"]
    assert [c["mac_address"] for c in physical] == [nics[0].mac]
    assert physical[0]["subnets"] == [{"type": "dhcp4"}]


def test_empty_network_data_would_leave_nics_unconfigured(cloudinit) -> None:
    """Why no network_data.json is written without NICs: cloud-init applies this empty config as is
    (a non-empty dict, not 'disabled'), instead of its DHCP fallback."""
    converted = cloudinit.openstack.convert_net_json(
        {"links": [], "networks": [], "services": []}, known_macs={}
    )
    assert converted == {"version": 1, "config": []}
    net = __import__("cloudinit.net", fromlist=["is_disabled_cfg"])
    assert bool(converted) and not net.is_disabled_cfg(converted)


def test_large_user_data_fits(cloudinit, tmp_path: Path) -> None:
    data = "#!/bin/sh\n" + "echo 0123456789abcdef\n" * 2900  # ~62 KiB, under the limit
    req = install_start(("configDriveUserData", data))
    for ss in (512, 4096):
        out = configdrive.build_drive(req, tmp_path / f"d{ss}", sector_size=ss)
        assert out.stat().st_size <= 2 * 1024 * 1024
        extract = extract_iso if ss == 512 else extract_fat
        tree = extract(out, tmp_path / f"t{ss}")
        seen = read_with_cloudinit(cloudinit, tree, tmp_path / f"ci{ss}")
        assert seen["userdata"] == data.encode()

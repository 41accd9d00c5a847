"""Request parsing and validation: both OVHcloud shapes, every refusal before any I/O."""

from __future__ import annotations

import base64
import json

import pytest

from agent import messages as msg
from agent.messages import InstallError
from agent.payload import parse_request
from agent.redact import redact_url, scrub

SHA256 = "a" * 64


def install_start(**meta: object) -> dict:
    items = [{"key": k, "value": v} for k, v in meta.items()]
    return {"templateName": "byoi_64", "details": {"customHostname": "h1"}, "userMetadata": items}


def base(**extra: object) -> dict:
    return install_start(imageURL="https://example.test/img.qcow2", imageType="qcow2", **extra)


def refused(body: object) -> str:
    with pytest.raises(InstallError) as info:
        parse_request(body)
    return info.value.message


def test_install_start_shape_full() -> None:
    body = base(
        imageCheckSum=SHA256.upper(),
        imageCheckSumType="sha256",
        httpHeaders0Key="Authorization",
        httpHeaders0Value="Basic dXNlcjpwYXNz",
        httpHeaders1Key="X-Trace",
        httpHeaders1Value="1",
        configDriveMetadata0Key="role",
        configDriveMetadata0Value="web",
        sshKey="ssh-ed25519 AAAA one\nssh-rsa BBBB two",
        efiBootloaderPath="\\EFI\\debian\\grubx64.efi",
    )
    req = parse_request(body)
    assert req.image_url == "https://example.test/img.qcow2"
    assert req.image_type == "qcow2"
    assert req.checksum == SHA256 and req.checksum_type == "sha256"
    assert req.http_headers == {"Authorization": "Basic dXNlcjpwYXNz", "X-Trace": "1"}
    assert req.metadata == {"role": "web"}
    assert req.hostname == "h1"
    assert req.ssh_keys == ("ssh-ed25519 AAAA one", "ssh-rsa BBBB two")
    assert req.efi_bootloader_path == "\\EFI\\debian\\grubx64.efi"
    assert req.warnings == ()


def test_reinstall_shape() -> None:
    body = {
        "operatingSystem": "byoi_64",
        "customizations": {
            "hostname": "h2",
            "imageURL": "http://10.0.2.2:8080/x.raw",
            "imageType": "raw",
            "imageCheckSum": "0" * 32,
            "imageCheckSumType": "md5",
            "httpHeaders": {"Authorization": "Basic abcd1234"},
            "configDriveUserData": "#!/bin/sh\necho hi\n",
            "configDriveMetadata": {"k": "v", "n": 3},
            "sshKey": "ssh-ed25519 AAAA k",
        },
    }
    req = parse_request(body)
    assert (req.image_type, req.checksum_type, req.hostname) == ("raw", "md5", "h2")
    assert req.metadata == {"k": "v", "n": "3"}
    assert req.user_data == b"#!/bin/sh\necho hi\n"
    assert req.http_headers == {"Authorization": "Basic abcd1234"}


def test_metadata_as_json_string_and_indexed_merge() -> None:
    req = parse_request(
        base(
            configDriveMetadata=json.dumps({"a": "1"}),
            configDriveMetadata0Key="b",
            configDriveMetadata0Value="2",
        )
    )
    assert req.metadata == {"a": "1", "b": "2"}


@pytest.mark.parametrize(
    ("user_data", "expected"),
    [
        ("#cloud-config\nhostname: x\n", b"#cloud-config\nhostname: x\n"),
        (
            base64.b64encode(b"#cloud-config\nruncmd: [ls]\n").decode(),
            b"#cloud-config\nruncmd: [ls]\n",
        ),
        (base64.b64encode(b"#!/bin/bash\necho ok\n").decode(), b"#!/bin/bash\necho ok\n"),
        ("#cloud-config\\nruncmd:\\n  - echo a\\n", b"#cloud-config\nruncmd:\n  - echo a\n"),
        (
            base64.b64encode(b"#ps1_sysnative\nWrite-Host ok\n").decode(),
            b"#ps1_sysnative\nWrite-Host ok\n",
        ),
        # base64-looking but not user data once decoded: kept as is
        ("aGVsbG8gd29ybGQ=", b"aGVsbG8gd29ybGQ="),
    ],
)
def test_user_data_forms(user_data: str, expected: bytes) -> None:
    assert parse_request(base(configDriveUserData=user_data)).user_data == expected


def test_unknown_keys_are_warnings() -> None:
    body = base(futureKey="x")
    body["somethingNew"] = 1
    req = parse_request(body)
    assert any("futureKey" in w for w in req.warnings)
    assert any("somethingNew" in w for w in req.warnings)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (install_start(imageURL="https://x/y", imageType="vmdk"), msg.BAD_FORMAT),
        (base(imageCheckSum=SHA256), msg.CHECKSUM_PAIR),
        (base(imageCheckSumType="sha256"), msg.CHECKSUM_PAIR),
        (base(imageCheckSum=SHA256, imageCheckSumType="crc32"), msg.BAD_CHECKSUM_TYPE),
        (
            base(imageCheckSum="abc", imageCheckSumType="sha256"),
            msg.bad_checksum_value("sha256", 64),
        ),
        (base(imageCheckSum="z" * 32, imageCheckSumType="md5"), msg.bad_checksum_value("md5", 32)),
        (install_start(imageURL="ftp://x/y", imageType="raw"), msg.BAD_URL_SCHEME),
        (install_start(imageURL="file:///etc/passwd", imageType="raw"), msg.BAD_URL_SCHEME),
        (install_start(imageType="raw"), msg.MISSING_IMAGE_URL),
        (install_start(imageURL="https://x/y"), msg.MISSING_IMAGE_TYPE),
        (base(configDriveUserData="#!/bin/sh\n" + "x" * 65536), msg.USER_DATA_TOO_LARGE),
        (
            base(httpHeaders0Key="X-Evil", httpHeaders0Value="a\r\nHost: b"),
            msg.bad_header("X-Evil"),
        ),
        ({"templateName": "debian12_64", "userMetadata": []}, msg.UNKNOWN_TEMPLATE),
        (
            {"templateName": "byoi_64", "details": {"softRaidDevices": 2}, "userMetadata": []},
            msg.SOFTWARE_RAID,
        ),
        ([1, 2], msg.bad_request("the request must be a JSON object")),
    ],
)
def test_refusals(body: object, message: str) -> None:
    assert refused(body) == message


def test_header_name_with_newline_refused() -> None:
    message = refused(base(httpHeaders0Key="X-A\nB", httpHeaders0Value="v"))
    assert "\n" not in message and "refused" in message


def test_secrets_never_in_messages() -> None:
    url = "https://user:s3cr3tpw@example.test/img.qcow2"
    assert redact_url(url) == "https://user:***@example.test/img.qcow2"
    req = parse_request(
        install_start(
            imageURL=url,
            imageType="qcow2",
            httpHeaders0Key="Authorization",
            httpHeaders0Value="Basic Zm9vOmJhcg==",
        )
    )
    assert "s3cr3tpw" not in req.redacted_url
    assert msg.download_failed(req.redacted_url) == (
        "Could not download image located: https://user:***@example.test/img.qcow2 ."
    )
    # anything echoing the secrets back is scrubbed
    assert "Zm9vOmJhcg==" not in scrub("server said: bad creds Zm9vOmJhcg==")
    assert "s3cr3tpw" not in scrub("curl: user:s3cr3tpw failed")


def reinstall(**extra: object) -> dict:
    custom = {"imageURL": "https://example.test/img.raw", "imageType": "raw"}
    return {"operatingSystem": "byoi_64", "customizations": custom, **extra}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (base(), None),
        ({**base(), "details": {"diskGroupId": 2}}, 2),
        ({**base(), "details": {"diskGroupId": "3", "customHostname": "h"}}, 3),
        (reinstall(), None),
        (reinstall(storage=[{"diskGroupId": 2, "partitioning": {"layout": []}}]), 2),
        (reinstall(storage=[{"diskGroupId": 1}, {"diskGroupId": 1}]), 1),
        (reinstall(storage=[{"partitioning": {}}]), None),  # OVHcloud's default: group 1
        (reinstall(storage={"diskGroupId": 4}), 4),
    ],
)
def test_disk_group_id_in_both_shapes(body: dict, expected: int | None) -> None:
    req = parse_request(body)
    assert req.disk_group_id == expected
    assert not any("diskGroupId" in w for w in req.warnings)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({**base(), "details": {"diskGroupId": 0}}, "details.diskGroupId must be a whole number"),
        ({**base(), "details": {"diskGroupId": "two"}}, "details.diskGroupId must be"),
        ({**base(), "details": {"diskGroupId": True}}, "details.diskGroupId must be"),
        ({**base(), "details": {"diskGroupId": 1.5}}, "details.diskGroupId must be"),
        (reinstall(storage=[{"diskGroupId": -1}]), "storage[].diskGroupId must be"),
        (reinstall(storage=[{"diskGroupId": 1}, {"diskGroupId": 2}]), "several disk groups (1, 2)"),
    ],
)
def test_disk_group_id_refusals(body: dict, reason: str) -> None:
    message = refused(body)
    assert message.startswith("Bad request: ") and reason in message

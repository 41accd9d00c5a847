"""Parsing and validating an OVHcloud BYOI request.

Two body shapes exist in OVHcloud's API (install/start with ``userMetadata`` key/value pairs,
and reinstall with a ``customizations`` object); both are turned into one ``InstallRequest``.
Every check that can be made without the network or a disk is made here, so that a bad request
fails before anything is downloaded or written.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from agent import messages as msg
from agent.messages import InstallError
from agent.redact import redact_url, register_secret

USER_DATA_LIMIT = 64 * 1024
CHECKSUM_HEX_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}

_USER_METADATA_KEYS = {
    "imageURL",
    "imageType",
    "imageCheckSum",
    "imageCheckSumType",
    "configDriveUserData",
    "configDriveMetadata",
    "sshKey",
    "efiBootloaderPath",
}
_INDEXED = re.compile(r"^(httpHeaders|configDriveMetadata)(\d+)(Key|Value)$")
_CUSTOMIZATION_KEYS = _USER_METADATA_KEYS | {"hostname", "httpHeaders"}
_INSTALL_TOP_KEYS = {"templateName", "details", "userMetadata", "partitionSchemeName"}
_REINSTALL_TOP_KEYS = {"operatingSystem", "customizations", "properties", "storage"}
_DETAILS_KEYS = {"customHostname", "softRaidDevices", "noRaid", "diskGroupId", "language"}


@dataclass(frozen=True)
class InstallRequest:
    """One validated install request; the shape-independent input of the pipeline."""

    image_url: str
    image_type: str  # "qcow2" | "raw"
    checksum: str | None = None  # lower-case hex
    checksum_type: str | None = None  # "md5" | "sha1" | "sha256" | "sha512"
    http_headers: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None
    ssh_keys: tuple[str, ...] = ()
    user_data: bytes | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    efi_bootloader_path: str | None = None
    warnings: tuple[str, ...] = ()
    disk_group_id: int | None = None  # OVHcloud's diskGroupId: which disk group (1..n) to use

    @property
    def redacted_url(self) -> str:
        return redact_url(self.image_url)


def parse_request(body: Any) -> InstallRequest:
    """Validate a decoded JSON body of either shape; raise ``InstallError`` when it is bad."""
    if not isinstance(body, dict):
        raise InstallError(msg.bad_request("the request must be a JSON object"))
    warnings: list[str] = []
    if "customizations" in body or "operatingSystem" in body:
        fields, hostname = _from_reinstall(body, warnings)
    elif "userMetadata" in body or "templateName" in body:
        fields, hostname = _from_install_start(body, warnings)
    else:
        raise InstallError(
            msg.bad_request(
                "expected an install/start body (templateName, userMetadata) "
                "or a reinstall body (operatingSystem, customizations)"
            )
        )
    request = _build(fields, hostname, warnings)
    group = _disk_group_id(body)
    return dataclasses.replace(request, disk_group_id=group) if group is not None else request


def _group_value(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InstallError(msg.bad_request(f"{where} must be a whole number from 1"))
    return value


def _disk_group_id(body: dict) -> int | None:
    """``details.diskGroupId`` (install/start) or ``storage[].diskGroupId`` (reinstall).

    BYOI writes one disk, so the storage entries must not name two different groups. Absent,
    None: the default choice, which is disk group 1 (agent/diskgroups.py numbers it so).
    """
    details = body.get("details")
    if isinstance(details, dict) and details.get("diskGroupId") is not None:
        return _group_value(details["diskGroupId"], "details.diskGroupId")
    storage = body.get("storage")
    entries = storage if isinstance(storage, list) else [storage] if storage else []
    ids = {
        _group_value(entry["diskGroupId"], "storage[].diskGroupId")
        for entry in entries
        if isinstance(entry, dict) and entry.get("diskGroupId") is not None
    }
    if len(ids) > 1:
        raise InstallError(
            msg.bad_request(
                "storage names several disk groups "
                f"({', '.join(map(str, sorted(ids)))}); the image goes on one disk"
            )
        )
    return ids.pop() if ids else None


def _check_template(name: Any, warnings: list[str]) -> None:
    if name is None:
        warnings.append("no template name given; assuming byoi_64")
    elif not isinstance(name, str) or not name.startswith("byoi"):
        raise InstallError(msg.UNKNOWN_TEMPLATE)


def _from_install_start(body: dict, warnings: list[str]) -> tuple[dict[str, Any], str | None]:
    _check_template(body.get("templateName"), warnings)
    _warn_unknown(body, _INSTALL_TOP_KEYS, "", warnings)
    details = body.get("details") or {}
    if not isinstance(details, dict):
        raise InstallError(msg.bad_request("details must be an object"))
    _warn_unknown(details, _DETAILS_KEYS, "details.", warnings)
    _refuse_raid(details)
    items = body.get("userMetadata") or []
    if not isinstance(items, list):
        raise InstallError(msg.bad_request("userMetadata must be a list of key/value objects"))
    fields: dict[str, Any] = {}
    headers: dict[int, dict[str, str]] = {}
    meta: dict[int, dict[str, str]] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise InstallError(msg.bad_request("each userMetadata entry needs a string key"))
        key, value = item["key"], item.get("value")
        if value is not None and not isinstance(value, str):
            value = json.dumps(value) if isinstance(value, dict | list) else str(value)
        indexed = _INDEXED.match(key)
        if indexed:
            group, index, part = indexed.groups()
            target = headers if group == "httpHeaders" else meta
            target.setdefault(int(index), {})[part] = value or ""
        elif key in _USER_METADATA_KEYS:
            fields[key] = value
        else:
            warnings.append(f"unknown userMetadata key ignored: {key}")
    if headers:
        fields["httpHeaders"] = _pairs(headers, "httpHeaders")
    if meta:
        indexed_meta = _pairs(meta, "configDriveMetadata")
        if "configDriveMetadata" in fields:
            joined = _metadata_object(fields["configDriveMetadata"])
            joined.update(indexed_meta)
            indexed_meta = joined
        fields["configDriveMetadata"] = indexed_meta
    hostname = details.get("customHostname")
    return fields, hostname


def _from_reinstall(body: dict, warnings: list[str]) -> tuple[dict[str, Any], str | None]:
    _check_template(body.get("operatingSystem"), warnings)
    _warn_unknown(body, _REINSTALL_TOP_KEYS, "", warnings)
    custom = body.get("customizations") or {}
    if not isinstance(custom, dict):
        raise InstallError(msg.bad_request("customizations must be an object"))
    _warn_unknown(custom, _CUSTOMIZATION_KEYS, "customizations.", warnings)
    storage = body.get("storage")
    if storage:
        _refuse_raid_storage(storage)
    fields = {k: v for k, v in custom.items() if k in _CUSTOMIZATION_KEYS and k != "hostname"}
    return fields, custom.get("hostname")


def _warn_unknown(obj: dict, known: set[str], prefix: str, warnings: list[str]) -> None:
    for key in obj:
        if key not in known:
            warnings.append(f"unknown key ignored: {prefix}{key}")


def _refuse_raid(details: dict) -> None:
    devices = details.get("softRaidDevices")
    if isinstance(devices, int) and devices > 1:
        raise InstallError(msg.SOFTWARE_RAID)


def _refuse_raid_storage(storage: Any) -> None:
    groups = storage if isinstance(storage, list) else [storage]
    for group in groups:
        if not isinstance(group, dict):
            continue
        raid = group.get("raidLevel", group.get("raid"))
        if raid is None and isinstance(group.get("partitioning"), dict):
            raid = group["partitioning"].get("raidLevel")
        if raid not in (None, 0, "0", "none", ""):
            raise InstallError(msg.SOFTWARE_RAID)


def _pairs(indexed: dict[int, dict[str, str]], group: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for index in sorted(indexed):
        pair = indexed[index]
        if "Key" not in pair or not pair["Key"]:
            raise InstallError(msg.bad_request(f"{group}{index}Key is missing"))
        out[pair["Key"]] = pair.get("Value", "")
    return out


def _metadata_object(value: Any) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InstallError(
                msg.bad_request(f"configDriveMetadata is not a JSON object ({exc.msg})")
            ) from None
    if not isinstance(value, dict):
        raise InstallError(msg.bad_request("configDriveMetadata must be a JSON object"))
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def _build(fields: dict[str, Any], hostname: Any, warnings: list[str]) -> InstallRequest:
    url = fields.get("imageURL")
    if not url or not isinstance(url, str):
        raise InstallError(msg.MISSING_IMAGE_URL)
    _check_url(url)

    image_type = fields.get("imageType")
    if not image_type:
        raise InstallError(msg.MISSING_IMAGE_TYPE)
    if image_type not in msg.IMAGE_TYPES:
        raise InstallError(msg.BAD_FORMAT)

    checksum, checksum_type = fields.get("imageCheckSum"), fields.get("imageCheckSumType")
    if bool(checksum) != bool(checksum_type):
        raise InstallError(msg.CHECKSUM_PAIR)
    if checksum_type:
        checksum_type = str(checksum_type).lower()
        if checksum_type not in msg.CHECKSUM_TYPES:
            raise InstallError(msg.BAD_CHECKSUM_TYPE)
        checksum = str(checksum).strip().lower()
        length = CHECKSUM_HEX_LENGTHS[checksum_type]
        if len(checksum) != length or not re.fullmatch(r"[0-9a-f]+", checksum):
            raise InstallError(msg.bad_checksum_value(checksum_type, length))

    headers = fields.get("httpHeaders") or {}
    if not isinstance(headers, dict):
        raise InstallError(msg.bad_request("httpHeaders must be an object"))
    headers = {str(k): "" if v is None else str(v) for k, v in headers.items()}
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0") or not name.strip():
            raise InstallError(msg.bad_header(name.replace("\r", "\\r").replace("\n", "\\n")))
        register_secret(value)

    if hostname is not None and not isinstance(hostname, str):
        raise InstallError(msg.bad_request("hostname must be a string"))

    ssh_key = fields.get("sshKey") or ""
    if not isinstance(ssh_key, str):
        raise InstallError(msg.bad_request("sshKey must be a string"))
    keys = tuple(line.strip() for line in ssh_key.replace("\\n", "\n").splitlines() if line.strip())

    efi_path = fields.get("efiBootloaderPath") or None
    if efi_path is not None and not isinstance(efi_path, str):
        raise InstallError(msg.bad_request("efiBootloaderPath must be a string"))

    return InstallRequest(
        image_url=url,
        image_type=image_type,
        checksum=checksum or None,
        checksum_type=checksum_type or None,
        http_headers=headers,
        hostname=hostname or None,
        ssh_keys=keys,
        user_data=decode_user_data(fields.get("configDriveUserData")),
        metadata=_metadata_object(fields.get("configDriveMetadata")),
        efi_bootloader_path=efi_path,
        warnings=tuple(warnings),
    )


def _check_url(url: str) -> None:
    if any(c in url for c in "\r\n\0 "):
        raise InstallError(msg.bad_url("it contains whitespace or control characters"))
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise InstallError(msg.bad_url(str(exc))) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InstallError(msg.BAD_URL_SCHEME)
    if not parts.hostname:
        raise InstallError(msg.bad_url("it has no host"))
    if parts.password:
        register_secret(parts.password)


# What cloud-init (Linux, BSD) and cloudbase-init (Windows) recognise as user data.
_USER_DATA_HEADERS = (
    b"#cloud-config",
    b"#!",
    b"#include",
    b"#cloud-boothook",
    b"content-type: multipart",
    b"mime-version:",
    b"#ps1",  # also #ps1_sysnative, #ps1_x86
    b"rem cmd",
)


def _looks_like_user_data(data: bytes) -> bool:
    head = data.lstrip()[:200].lower()
    return head.startswith(_USER_DATA_HEADERS) or b"<powershell>" in head or b"<script>" in head


def decode_user_data(value: Any) -> bytes | None:
    """User data as the customer means it.

    Accepted: plain text; base64 of a ``#cloud-config``/script/MIME document (decoded; other
    base64-looking text is kept as is, since it may be a plain payload); the guide's one-line
    form with literal ``\\n`` for line breaks (expanded when the text has no real line break).
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InstallError(msg.bad_request("configDriveUserData must be a string"))
    data = value.encode("utf-8")
    compact = re.sub(rb"\s+", b"", data)
    if compact and re.fullmatch(rb"[A-Za-z0-9+/=_-]+", compact) and len(compact) >= 8:
        try:
            decoded = base64.b64decode(
                compact + b"=" * (-len(compact) % 4), altchars=None, validate=False
            )
        except (binascii.Error, ValueError):
            decoded = b""
        if decoded and _looks_like_user_data(decoded):
            data = decoded
    if b"\n" not in data and b"\\n" in data:
        data = data.replace(b"\\n", b"\n")
    if len(data) > USER_DATA_LIMIT:
        raise InstallError(msg.USER_DATA_TOO_LARGE)
    return data

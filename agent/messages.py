"""The one catalogue of result messages.

Orchestrators match OVHcloud's texts literally, so every message an install can end with is
built here and nowhere else. The table in SPEC.md is the contract; the helpers below only fill
in its placeholders. Messages of our own wording (busy disk, unsafe qcow2, ...) live here too so
that wording changes happen in one place.
"""

from __future__ import annotations

CHECKSUM_TYPES = ("md5", "sha1", "sha256", "sha512")
IMAGE_TYPES = ("qcow2", "raw")


class InstallError(Exception):
    """An install ends with exactly one result message.

    ``message`` is the public result text (safe to show: no secrets); ``detail`` is the reason
    for the log (stderr of a tool, an errno, ...), also redacted by whoever raises it.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


# --- OVHcloud's texts (SPEC.md "Result messages") ---------------------------------------------

BAD_FORMAT = "Bad format image, expected: qcow2, raw."
BAD_CHECKSUM_TYPE = "Bad checkSumType, expected: md5, sha1, sha256, sha512."
CHECKSUM_PAIR = "Please provide checkSum AND checkSumType or none of them"
GPT_MOVE_FAILED = "Can not move backup GPT data structures to the end of disk."
CONFIGDRIVE_FAILED = "Could not create configdrive on disk."


def too_big_for_memory(image_type: str) -> str:
    return f"Could not download, {image_type} image is too big to download in memory."


def download_failed(redacted_url: str) -> str:
    return f"Could not download image located: {redacted_url} ."


def bad_checksum(checksum_type: str, actual: str, expected: str) -> str:
    return f"Bad {checksum_type} for downloaded file, got: {actual} while expecting {expected}."


def format_mismatch(detected: str, expected: str) -> str:
    return f"image provided format is {detected} which does not match expected {expected} format"


def raw_without_partition_table(contents: str) -> str:
    return (
        "image provided format is not of type raw because no partition table was found. "
        f"It seems to contain: {contents}"
    )


def image_larger_than_disk(image_size: int, device: str, disk_size: int) -> str:
    return (
        f"image provided has a size of {image_size} bytes which is larger than "
        f"{device} of {disk_size} bytes"
    )


def cant_write(image_type: str) -> str:
    return f"Can't write {image_type} on disk."


# --- our own wording ----------------------------------------------------------------------------

INSTALL_RUNNING = "An install is already running on this server."
SOFTWARE_RAID = (
    "Software RAID is not supported by Bring Your Own Image; "
    "configure RAID in the image or use BYOLinux."
)
NO_ELIGIBLE_DISK = "No eligible disk found to install the image on."
MISSING_IMAGE_URL = "Missing imageURL."
MISSING_IMAGE_TYPE = "Missing imageType."
BAD_URL_SCHEME = "imageURL must be an http or https URL."
USER_DATA_TOO_LARGE = "configDriveUserData is larger than 64 KiB."
UNKNOWN_TEMPLATE = "Only the byoi templates are supported by this agent."


def bad_url(reason: str) -> str:
    return f"imageURL is not a valid URL: {reason}."


def bad_checksum_value(checksum_type: str, length: int) -> str:
    return (
        f"imageCheckSum is not a valid {checksum_type} checksum: "
        f"expected {length} hexadecimal characters."
    )


def bad_header(name: str) -> str:
    return f"HTTP header {name!r} is refused: names and values must not contain CR or LF."


def bad_request(reason: str) -> str:
    return f"Bad request: {reason}."


def unsafe_qcow2(reason: str) -> str:
    return f"image provided is an unsafe qcow2 image: {reason}."


def ambiguous_format(formats: list[str]) -> str:
    return (
        f"image provided matches several formats at once ({', '.join(formats)}); "
        "such a polyglot image would be read differently by different tools, so it is refused."
    )


def damaged_image(image_type: str, reason: str) -> str:
    return f"image provided is a damaged {image_type} image: {reason}."


def qcow2_without_partition_table(contents: str) -> str:
    return (
        "image provided is a qcow2 image whose virtual disk has no partition table "
        f"(neither MBR nor GPT). It seems to contain: {contents}"
    )


def disk_busy(device: str, reason: str) -> str:
    return f"Target disk {device} is busy: {reason}."


def disk_changed(device: str, reason: str) -> str:
    return f"Target disk {device} changed since it was chosen; nothing written: {reason}."


def interrupted(step: str) -> str:
    return f"Install interrupted by a signal during step {step or 'start'}."


def disk_not_eligible(device: str, reason: str) -> str:
    return f"Target disk {device} cannot be used: {reason}."


def no_disk_matches_hints(hints: str) -> str:
    return f"No disk matches the root device hints: {hints}."


def unknown_disk_group(group_id: int, known: str) -> str:
    return (
        f"Disk group {group_id} does not exist on this server (diskGroupId); disk groups: {known}."
    )


def sector_size_mismatch(image_sector: int, device: str, disk_sector: int) -> str:
    return (
        f"image provided has a partition table for {image_sector}-byte sectors, "
        f"but {device} has {disk_sector}-byte logical sectors"
    )


def mbr_on_large_sectors(device: str, disk_sector: int) -> str:
    return (
        "image provided has an MBR partition table, which records no sector size and is laid "
        f"out for 512-byte sectors: it cannot be installed on {device} with {disk_sector}-byte "
        "logical sectors (use a GPT image made for that sector size, booted through UEFI)"
    )


def legacy_boot_sector_size(device: str, disk_sector: int) -> str:
    return (
        f"{device} has {disk_sector}-byte logical sectors, which legacy BIOS firmware cannot "
        "boot from, and this server's rescue system booted in legacy BIOS mode: switch the "
        "server to UEFI boot (or, if it boots its disks through UEFI, install with --firmware uefi)"
    )


UNVERIFIED_DOWNLOAD = (
    "the image server sent neither Content-Length nor chunked encoding and no checksum was "
    "given: a download cut short could not be detected; give imageCheckSum to be sure."
)

EFI_ON_LEGACY = (
    "efiBootloaderPath ignored: the rescue system was not booted with UEFI, "
    "so no EFI boot entry can be created."
)


def efi_entry_failed(path: str) -> str:
    return f"Could not create an EFI boot entry for {path}."


def install_done(device: str) -> str:
    return f"Image installed on {device}."


def internal_error(step: str, kind: str) -> str:
    return f"Install failed during step {step or 'start'}: internal error ({kind})."


# --- HTTP API (agent/api.py) ----------------------------------------------------------------------

API_UNAUTHORIZED = "Missing or invalid bearer token."
API_BODY_TIMEOUT = "The request body was not received in time."
API_INTERNAL_ERROR = "Internal error in the agent; see its log."


def api_body_too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes."


def bad_hint(hint: str, reason: str) -> str:
    return f"Bad root device hint {hint!r}: {reason}."


def token_file_refused(path: str, reason: str) -> str:
    return (
        f"{path}: {reason}; a token is one word of at least 16 characters, visible ASCII only "
        "(e.g. `openssl rand -hex 32`)."
    )


CALLBACK_CREDENTIAL_REUSED = (
    "The callback token must differ from the API token: callbacks never carry the API token."
)
CALLBACK_CREDENTIAL_WITHOUT_URL = "--callback-token-file needs --callback-url."

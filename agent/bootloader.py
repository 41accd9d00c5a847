"""``efiBootloaderPath``: an EFI boot entry for the image's own loader, first in BootOrder.

Only possible when the rescue system itself booted through UEFI (the firmware's variables are
reachable through efivarfs); on a legacy-booted rescue the request is answered with a warning.
"""

from __future__ import annotations

import json

from agent.tools import run

ESP_TYPE_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def find_esp(sfdisk_json: dict) -> int | None:
    """The partition number of the EFI system partition in ``sfdisk --json`` output."""
    table = sfdisk_json.get("partitiontable", {})
    for index, part in enumerate(table.get("partitions", []), start=1):
        ptype = str(part.get("type", "")).upper()
        if ptype in (ESP_TYPE_GUID, "EF"):
            node = part.get("node", "")
            digits = "".join(ch for ch in node[len(node.rstrip("0123456789")) :])
            return int(digits) if digits else index
    return None


def loader_path(path: str) -> str:
    """efibootmgr wants backslashes, relative to the ESP root."""
    return "\\" + path.replace("/", "\\").lstrip("\\")


def create_boot_entry(disk: str, path: str, label: str = "byoi") -> int:
    """Create the entry (efibootmgr puts a new entry first in BootOrder); return the ESP part."""
    table = json.loads(run(["sfdisk", "--json", disk], timeout=30).stdout)
    part = find_esp(table)
    if part is None:
        raise RuntimeError(f"no EFI system partition on {disk}")
    run(
        [
            "efibootmgr",
            "--create",
            "--disk",
            disk,
            "--part",
            str(part),
            "--label",
            label,
            "--loader",
            loader_path(path),
        ],
        timeout=60,
    )
    return part

"""The one reader of partition tables: ``Table`` and ``Partition``, from a disk or from bytes.

Disks are read through ``sfdisk --json`` (what the kernel and boot loaders will see), images
from their first bytes (agent/gpt.py); both give the same model, partitions numbered the same
way (the entry's slot + 1, which is what Linux names ``sda3`` / ``nvme0n1p3``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent import gpt
from agent.tools import run

EXTENDED_TYPES = {"5", "f", "85"}


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str  # lower-case GUID (GPT) or hex byte without 0x (MBR)
    name: str = ""

    @property
    def end(self) -> int:
        return self.start + self.size - 1


@dataclass(frozen=True)
class Table:
    label: Literal["gpt", "dos"]
    sector_size: int
    partitions: tuple[Partition, ...]
    first_lba: int | None = None  # GPT only
    last_lba: int | None = None  # GPT only

    def layout(self) -> list[tuple[int, int, int]]:
        """(number, start, size) of each partition: what must survive a table edit."""
        return [(p.number, p.start, p.size) for p in self.partitions]


_NUMBER = re.compile(r"(\d+)$")


def partition_number(node: str) -> int:
    """The partition number at the end of a node name (``/dev/nvme0n1p12`` -> 12)."""
    found = _NUMBER.search(node)
    if not found:
        raise ValueError(f"no partition number in {node!r}")
    return int(found.group(1))


def parse_sfdisk_json(text: str) -> Table:
    """``sfdisk --json`` output -> ``Table``."""
    pt = json.loads(text)["partitiontable"]
    parts = [
        Partition(
            number=partition_number(p["node"]),
            start=int(p["start"]),
            size=int(p["size"]),
            type=str(p.get("type", "")).lower(),
            name=str(p.get("name", "")),
        )
        for p in pt.get("partitions", [])
    ]
    return Table(
        label="gpt" if pt["label"] == "gpt" else "dos",
        sector_size=int(pt.get("sectorsize", 512)),
        partitions=tuple(sorted(parts, key=lambda q: q.number)),
        first_lba=pt.get("firstlba"),
        last_lba=pt.get("lastlba"),
    )


def read_table(path: str | Path) -> Table:
    """The partition table of a disk (or image file), as sfdisk sees it; ToolError if none."""
    return parse_sfdisk_json(run(["sfdisk", "--json", str(path)], timeout=60).stdout)


def pttype(path: str | Path) -> str:
    """libblkid's PTTYPE of ``path`` (``gpt``, ``dos``, ``PMBR``...; "" when none)."""
    proc = run(["blkid", "-p", "-s", "PTTYPE", "-o", "value", str(path)], check=False, timeout=60)
    return proc.stdout.strip().lower() if proc.returncode == 0 else ""


def probe_label(path: str | Path, offset: int, size: int) -> tuple[str, str]:
    """(LABEL, TYPE) of the filesystem at byte ``offset`` of ``path``, as cloud-init's blkid
    lookup would see it on the partition device; ("", "") when none."""
    proc = run(
        ["blkid", "-p", "-O", str(offset), "-S", str(size), "-o", "export", str(path)],
        check=False,
        timeout=60,
    )
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return values.get("LABEL", ""), values.get("TYPE", "")


def from_gpt(image: gpt.ImageGpt) -> Table:
    parts = tuple(
        Partition(e.slot + 1, e.first, e.last - e.first + 1, str(e.type_guid), e.name)
        for e in image.entries
    )
    h = image.header
    return Table("gpt", image.sector_size, parts, h.first_usable, h.last_usable)


def from_mbr(entries: list[gpt.MbrEntry], sector_size: int) -> Table:
    parts = tuple(Partition(e.slot + 1, e.start, e.size, f"{e.type:x}") for e in entries)
    return Table("dos", sector_size, parts)

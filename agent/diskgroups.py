"""Disk groups, as OVHcloud's API names them (``diskGroupId``): eligible disks grouped the way a
hardware inventory lists a server ("2 x NVMe 512 GB, 2 x HDD 4 TB").

A group is the eligible disks of one technology (NVMe, SSD, HDD), one size and one model. BYOI
writes the image to ONE disk, "the first disk of the target disk group": the first in natural
name order (nvme0n1 before nvme1n1).

Numbering, deterministic and documented (``number_groups``):
  1. the group holding the disk the default choice takes (so ``diskGroupId`` 1, OVHcloud's
     default, installs where no ``diskGroupId`` would);
  2. then by technology speed (NVMe, SSD, HDD), then size (smallest first), then the first
     disk's name (natural order).
Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import messages as msg
from agent.messages import InstallError

if TYPE_CHECKING:
    from agent.disks import Disk

TECHNOLOGIES = ("NVMe", "SSD", "HDD")  # fastest first


def technology(disk: Disk) -> str:
    """NVMe for NVMe namespaces; SSD for other non-rotational disks; HDD for the rest."""
    if disk.transport == "nvme" or disk.name.startswith("nvme"):
        return "NVMe"
    return "HDD" if disk.rotational else "SSD"


@dataclass(frozen=True)
class DiskGroup:
    """One group: its number, what its disks share, and the disks in natural name order."""

    id: int
    technology: str
    size: int
    model: str | None
    disks: tuple[Disk, ...]

    @property
    def first(self) -> Disk:
        return self.disks[0]

    def describe(self) -> str:
        model = f" {self.model}" if self.model else ""
        return f"{len(self.disks)} x {self.technology} {self.size // 1024**3} GiB{model}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "technology": self.technology,
            "size": self.size,
            "model": self.model,
            "count": len(self.disks),
            "disks": [d.path for d in self.disks],
        }


def number_groups(
    disks: Iterable[Disk], default: Disk | None, natural_key: Callable[[str], Any]
) -> list[DiskGroup]:
    """The eligible disks grouped and numbered 1..n (see the module docstring for the order)."""
    buckets: dict[tuple[str, int, str], list[Disk]] = {}
    for disk in disks:
        if disk.eligible:
            model = " ".join((disk.model or "").split())
            buckets.setdefault((technology(disk), disk.size, model), []).append(disk)
    members = [sorted(group, key=lambda d: natural_key(d.name)) for group in buckets.values()]

    def order(group: list[Disk]) -> tuple[Any, ...]:
        first = group[0]
        holds_default = default is not None and any(d.name == default.name for d in group)
        return (
            not holds_default,
            TECHNOLOGIES.index(technology(first)),
            first.size,
            natural_key(first.name),
        )

    return [
        DiskGroup(n, technology(g[0]), g[0].size, g[0].model, tuple(g))
        for n, g in enumerate(sorted(members, key=order), start=1)
    ]


def pick_group(groups: list[DiskGroup], group_id: int) -> DiskGroup:
    """Group ``group_id``, or a refusal naming the groups that exist."""
    for group in groups:
        if group.id == group_id:
            return group
    known = "; ".join(f"{g.id}: {g.describe()}" for g in groups) or "none (no eligible disk)"
    raise InstallError(msg.unknown_disk_group(group_id, known))

"""What format an image file really is, named as qemu-img names it.

Detection is OpenStack's: oslo.utils' ``format_inspector`` (written for glance and nova after
CVE-2024-32498 / CVE-2024-44082) runs every known inspector over the file's first bytes, in
this process and without qemu. A file that matches two formats at once (an ISO 9660 with a
qcow2 header in its system area, a qcow2 with an MBR signature) is a polyglot: whichever way it
is read, some tool would read it the other way, so it is refused. The one legitimate double
match is an ISO-hybrid image (an ISO 9660 that also carries an MBR or GPT, as installer images
do): qemu itself sees such a file as raw, so declared ``raw`` it is treated as a raw disk image
(its partition table is then checked like any other); declared ``qcow2`` it is an ``iso``.

The library's names are mapped to qemu-img's (``vhd`` is ``vpc``; ``gpt``, which the library
reports for any MBR-signed sector 0, is ``raw`` to qemu; a qcow header of version 1 is qemu's
``qcow``, not ``qcow2``) so that the SPEC's ``<detected>`` is what qemu-img would print.
Formats the library does not know (parallels, bochs, cloop, dmg) come out as ``raw``; declared
raw they are still refused, for having no partition table.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from oslo_utils.imageutils import format_inspector as fi

# The inspectors log what they refuse (at warning and error level); the refusal is reported in
# the install's own message, so their lines would only be noise before it.
logging.getLogger(fi.__name__).setLevel(logging.CRITICAL)

# Every inspector has decided within this many bytes: the largest is VMDK's text descriptor
# (at most 1 MiB, captured from the first chunk), then ISO 9660's descriptor at 32 KiB.
_CHUNK = 1 << 20
_DETECT_BYTES = 2 * _CHUNK

# oslo's qcow2 safety checks, in our words (SPEC: backing file, external data file, unknown
# incompatible features).
_QCOW2_CHECKS = {
    "backing_file": "it has a backing file",
    "data_file": "it has an external data file",
    "unknown_features": "it uses unknown incompatible features or an unsupported version",
}


@dataclass(frozen=True)
class Detection:
    """The format of an image file, from its content alone.

    ``name`` is qemu-img's name for it (``raw`` when nothing specific matched); ``matches``
    what every inspector that matched found, in qemu's names except ``gpt`` (the library's
    name for an MBR-signed sector 0, which qemu calls raw): ``("gpt", "iso")`` for an
    ISO-hybrid; ``problems`` why the library's safety checks refuse it (filled for qcow2
    only: the only non-raw format the agent accepts); ``polyglot`` when the matches are two
    formats that cannot both be true.
    """

    name: str
    matches: tuple[str, ...]
    problems: tuple[str, ...] = ()

    @property
    def polyglot(self) -> bool:
        return len(self.matches) > 1 and not self.iso_hybrid

    @property
    def described(self) -> list[str]:
        """The matches in qemu's names, for a message (an MBR-signed sector 0 said so)."""
        return [{"gpt": "raw (MBR signature)"}.get(m, m) for m in self.matches]

    @property
    def iso_hybrid(self) -> bool:
        return set(self.matches) == {"iso", "gpt"}

    def as_declared(self, declared: str) -> str:
        """The name to compare with the declared type: an ISO-hybrid is raw when declared
        raw (qemu reads it as raw), ``iso`` otherwise."""
        if self.iso_hybrid and declared == "raw":
            return "raw"
        return self.name


def match_name(inspector: fi.FileInspector) -> str:
    """qemu-img's name for what one oslo inspector matched (``gpt`` kept as is)."""
    if inspector.NAME == "qcow2":
        header = inspector.region("header").data
        (version,) = struct.unpack_from(">I", header, 4)
        return "qcow" if version == 1 else "qcow2"
    return {"vhd": "vpc"}.get(inspector.NAME, inspector.NAME)


def _safety_problems(inspector: fi.FileInspector) -> tuple[str, ...]:
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        return tuple(_QCOW2_CHECKS.get(name, f"{name} check failed") for name in exc.failures)
    except fi.ImageFormatError as exc:
        return (f"its header cannot be read ({exc})",)
    return ()


def detect(path: Path) -> Detection:
    """Run every oslo.utils inspector over the file's first ``_DETECT_BYTES``.

    Reads at most 2 MiB, whatever the file's size: identification needs no more, and the
    agent accepts only raw and qcow2, whose integrity is checked with qemu-img afterwards.
    """
    with open(path, "rb") as f:
        wrapper = fi.InspectWrapper(f)
        for _ in range(_DETECT_BYTES // _CHUNK):
            if not wrapper.read(_CHUNK):
                break
        wrapper.close()
    found = [i for i in wrapper.formats or [] if i.NAME != "raw"]
    matches = tuple(sorted(match_name(i) for i in found))
    specific = [m for m in matches if m != "gpt"]
    name = specific[0] if specific else "raw"
    problems: tuple[str, ...] = ()
    if matches == ("qcow2",):
        problems = _safety_problems(found[0])
    return Detection(name, matches, problems)

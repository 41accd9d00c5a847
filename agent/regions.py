"""Byte ranges of a disk: (offset, length) pairs, merged and cut (pure)."""

from __future__ import annotations

from collections.abc import Sequence

Region = tuple[int, int]  # (offset, length) in bytes


def merge(regions: Sequence[Region], limit: int, align: int = 512) -> list[Region]:
    """Regions clipped to [0, limit), widened to ``align``, sorted and merged."""
    spans = []
    for start, length in regions:
        begin, end = max(0, start), min(limit, start + length)
        begin -= begin % align
        end = min(limit, end + -end % align)
        if end > begin:
            spans.append([begin, end])
    merged: list[list[int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(b, e - b) for b, e in merged]


def subtract(regions: Sequence[Region], window: Region) -> list[Region]:
    """``regions`` minus the ``window`` (offset, length)."""
    w_begin, w_end = window[0], window[0] + window[1]
    out = []
    for start, length in regions:
        end = start + length
        if end <= w_begin or start >= w_end:
            out.append((start, length))
            continue
        if start < w_begin:
            out.append((start, w_begin - start))
        if end > w_end:
            out.append((w_end, end - w_end))
    return out

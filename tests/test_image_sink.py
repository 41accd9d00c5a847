"""The download's sink on its own: blocks gathered, written and hashed from memory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.image_sink import Sink, TooBig

MiB = 1024 * 1024


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at, i = [], 0, 0
    while at < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[at : at + n])
        at, i = at + n, i + 1
    return out


def _sink(dest: Path, **kw: object) -> Sink:
    args: dict[str, object] = {"hash_block": MiB, "progress_interval": 0.0}
    args.update(kw)
    return Sink(dest, "sha256", None, args.pop("on_progress", None), **args)  # type: ignore[arg-type]


def test_odd_chunks_across_blocks_land_whole_and_hashed(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB - 5) + bytes(3 * MiB + 5) + os.urandom(777) + bytes(1000)
    dest = tmp_path / "img"
    seen: list[int] = []

    def progress(done: int, _total: int | None) -> None:
        # what is reported is in the file: a reader of the growing file relies on it
        assert done <= dest.stat().st_size
        seen.append(done)

    sink = _sink(dest, on_progress=progress)
    try:
        for chunk in _chunks(data, [1, 300_000, 2 * MiB + 3, 65536]):
            sink.take(chunk)
        digest = sink.finish()
    finally:
        sink.close()
    assert digest == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
    assert seen[-1] == len(data) and seen == sorted(seen)
    # the three all-zero blocks are holes
    assert dest.stat().st_blocks * 512 <= len(data) - 2 * MiB


def test_restart_drops_what_was_taken_and_hashed(tmp_path: Path) -> None:
    first, second = os.urandom(5 * MiB + 10), os.urandom(2 * MiB + 99)
    dest = tmp_path / "img"
    sink = _sink(dest)
    try:
        for chunk in _chunks(first, [700_000]):
            sink.take(chunk)
        sink.restart()
        for chunk in _chunks(second, [123_457]):
            sink.take(chunk)
        digest = sink.finish()
    finally:
        sink.close()
    assert digest == hashlib.sha256(second).hexdigest()
    assert dest.read_bytes() == second


def test_no_checksum_still_writes_everything(tmp_path: Path) -> None:
    data = os.urandom(MiB + 5)
    dest = tmp_path / "img"
    sink = Sink(dest, None, None, None, hash_block=MiB, progress_interval=0.0)
    try:
        for chunk in _chunks(data, [4096]):
            sink.take(chunk)
        assert sink.finish() is None
    finally:
        sink.close()
    assert dest.read_bytes() == data


def test_budget_counts_bytes_not_yet_written(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "img", "md5", 3 * MiB, None, hash_block=4 * MiB, progress_interval=0.0)
    try:
        sink.take(bytes(2 * MiB))
        with pytest.raises(TooBig):
            sink.take(b"x" * (MiB + 1))
    finally:
        sink.close()

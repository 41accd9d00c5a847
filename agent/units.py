"""Sizes and on-disk constants shared by several modules (one definition each)."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

GPT_SIGNATURE = b"EFI PART"
# The config drive's partition: at most this big, 1 MiB aligned, at the end of the usable disk.
CONFIG_DRIVE_MAX = 64 * MiB
# The disk's head: MBR, primary GPT, boot code before the first partition. Written last.
HEAD_SIZE = MiB

"""The install pipeline: the steps of SPEC.md in order, each reported in the status model.

Order matters for safety: everything that can refuse the request without touching the disk
(validation, memory, disk choice and busy checks, download, checksum, format and size checks)
runs before the first byte is written. The disk is re-checked for business right before the
wipe, since minutes may have passed during the download; it is pinned by identity when chosen
and held with ``O_EXCL`` from the wipe to the config drive (agent/claim.py), so a renamed or
swapped device node is refused instead of written.

A SIGTERM, SIGINT or SIGHUP (when the install runs in the main thread, as the CLI's does) ends
the install like any failure: one result message, the download area unmounted and removed, the
image writer killed. A write cut short leaves no partition table behind (nothing half-written
can boot); the short steps after it (GPT move, config drive) finish before the signal is acted
on, since a partition tool killed half-way leaves a broken table.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from agent import (
    blockdev,
    bootloader,
    claim,
    configdrive,
    disks,
    download,
    inspect,
    memory,
    partition,
)
from agent import messages as msg
from agent.checksum import verify
from agent.messages import InstallError
from agent.payload import InstallRequest
from agent.status import InstallStatus
from agent.workspace import clean_stale, download_area
from agent.writer import write_image

log = logging.getLogger(__name__)

INSTALL_LOCK = threading.Lock()
DEFAULT_WORKDIR = Path("/run/byoi-agent")


@dataclass
class InstallOptions:
    disk: str | None = None
    hints: dict[str, str] = field(default_factory=dict)
    workdir: Path = DEFAULT_WORKDIR
    download_settings: download.DownloadSettings | None = None


def download_settings(ca_bundle: str | None = None) -> download.DownloadSettings | None:
    """The download settings for the command line's options (None: the defaults)."""
    if ca_bundle is None:
        return None
    return download.DownloadSettings(ca_bundle=ca_bundle)


class Interrupted(Exception):
    """A termination signal arrived during the install."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """Termination signals turned into ``Interrupted``, raised once, at a safe point.

    Only the first signal counts (a second one must not cut the cleanup of the first), and
    inside ``deferred()`` it is held until the block ends.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self.raised = False
        self.deferring = 0

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        log.warning("received %s: stopping the install", signal.Signals(signum).name)
        if not self.deferring:
            self._raise()

    def _raise(self) -> None:
        if self.received is not None and not self.raised:
            self.raised = True
            raise Interrupted(self.received)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        self._raise()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are the main thread's business (the API server handles them)
            return
        previous = {s: signal.signal(s, self.handler) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_install(request: InstallRequest, options: InstallOptions, status: InstallStatus) -> bool:
    """Run one install; True on success. The status holds the result message either way."""
    if not INSTALL_LOCK.acquire(blocking=False):
        raise InstallError(msg.INSTALL_RUNNING)
    try:
        return _run_locked(request, options, status)
    finally:
        INSTALL_LOCK.release()


class _Steps:
    """Runs one step at a time, turning its InstallError into the step's error state."""

    def __init__(self, status: InstallStatus) -> None:
        self.status = status
        self.current = ""

    def __call__(self, key: str) -> _Steps:
        self.current = key
        return self

    def __enter__(self) -> None:
        self.status.start(self.current)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            self.status.done(self.current)
        elif isinstance(exc, InstallError):
            if exc.detail:
                log.error("%s failed: %s", self.current, exc.detail)
            self.status.fail(self.current, exc.message)
        return False  # the error goes on up: it ends the install


def _run_locked(request: InstallRequest, options: InstallOptions, status: InstallStatus) -> bool:
    step = _Steps(status)
    status.begin()
    signals = _Signals()
    try:
        with signals.installed():
            _install(request, options, status, step, signals)
    except InstallError:
        return False
    except (Interrupted, KeyboardInterrupt) as exc:
        log.warning("install interrupted during step %s (%s)", step.current, exc)
        status.fail(step.current or "validate", msg.interrupted(step.current))
        return False
    except Exception as exc:  # an unforeseen failure still ends with one clear message
        log.exception("unexpected failure in step %s", step.current)
        status.fail(step.current or "validate", _unexpected_message(step.current, request, exc))
        return False
    return True


def _unexpected_message(step: str, request: InstallRequest, exc: Exception) -> str:
    if step == "download":
        return msg.download_failed(request.redacted_url)
    if step == "write":
        return msg.cant_write(request.image_type)
    if step == "gpt":
        return msg.GPT_MOVE_FAILED
    if step == "configdrive":
        return msg.CONFIGDRIVE_FAILED
    return msg.internal_error(step, type(exc).__name__)


def _install(
    request: InstallRequest,
    options: InstallOptions,
    status: InstallStatus,
    step: _Steps,
    signals: _Signals,
) -> None:
    with step("validate"):
        for warning in request.warnings:
            status.warn(warning)

    with step("memory"):
        # A killed agent's tmpfs still holds its image: free that RAM before measuring it.
        clean_stale(options.workdir.resolve())
        budget = memory.image_budget()
        if budget <= 0:
            raise InstallError(msg.too_big_for_memory(request.image_type))

    with step("disk"):
        target = disks.select_target(options.disk, options.hints)
        disks.check_not_busy(target)
        pinned = claim.pin(target.path, target.major, target.minor, target.size)
        status.set_disk(target.path)
        log.info("target disk: %s (%s)", target.path, target.reason)

    with download_area(options.workdir, budget) as area:
        image_path = area / "image"
        with step("download"):
            result = download.download(
                request.image_url,
                image_path,
                headers=request.http_headers,
                image_type=request.image_type,
                checksum_type=request.checksum_type,
                memory_budget=budget,
                on_progress=status.update_progress,
                settings=options.download_settings,
            )

        with step("checksum"):
            if request.checksum_type and request.checksum:
                verify(request.checksum_type, result.digest or "", request.checksum)
            elif not result.length_verified:
                status.warn(msg.UNVERIFIED_DOWNLOAD)

        with step("inspect"):
            info = inspect.inspect_image(image_path, request.image_type)
            inspect.check_fits_disk(info, target.path, target.size)
            inspect.check_sector_size(info, target.path, target.logical_sector_size)
            drive = area / "configdrive.img"
            try:
                configdrive.build_drive(request, drive, sector_size=target.logical_sector_size)
            except InstallError:
                raise
            except Exception as exc:
                raise InstallError(msg.CONFIGDRIVE_FAILED, f"building the drive: {exc}") from None
            partition.check_room(
                image_path, info.format, info.virtual_size, target, drive, scratch=area
            )

        with contextlib.ExitStack() as held:
            with step("write"):
                disks.check_not_busy(target)
                fd = held.enter_context(claim.hold(pinned))
                _write(request, target, image_path, info, status)
            with step("gpt"), signals.deferred():
                claim.check_same(pinned, fd)
                if partition.table_type(target.path) == "gpt":
                    partition.relocate_backup_gpt(target)
            with step("configdrive"), signals.deferred():
                claim.check_same(pinned, fd)
                partition.add_config_drive(target, drive)

    with step("bootloader"):
        if request.efi_bootloader_path:
            _boot_entry(request.efi_bootloader_path, target.path, status)

    status.finish(msg.install_done(target.path))


def _write(
    request: InstallRequest,
    target: disks.Disk,
    image_path: Path,
    info: inspect.ImageInfo,
    status: InstallStatus,
) -> None:
    """Wipe, write and verify; a failure or an interrupt after the wipe clears the disk's
    tables, so that a partial image never looks like an installed system."""
    try:
        blockdev.wipe_stale_metadata(target)
        write_image(
            image_path,
            info.format,
            target.path,
            request.image_type,
            info.virtual_size,
            on_progress=status.update_progress,
        )
    except BaseException as exc:
        try:
            blockdev.invalidate(target.path)
        except Exception as cleanup:  # noqa: BLE001 - the original failure is what matters
            log.error("could not clear %s after a failed write: %s", target.path, cleanup)
        if isinstance(exc, (InstallError, Interrupted, KeyboardInterrupt)):
            raise
        raise InstallError(msg.cant_write(request.image_type), str(exc)) from None
    image_path.unlink()
    _reread(target.path)


def _reread(path: str) -> None:
    try:
        blockdev.reread_partition_table(path)
    except Exception as exc:  # the kernel's view is a convenience; the disk is already right
        log.warning("could not re-read the partition table of %s: %s", path, exc)


def _boot_entry(path: str, disk: str, status: InstallStatus) -> None:
    if not bootloader.booted_with_uefi():
        status.warn(msg.EFI_ON_LEGACY)
        return
    try:
        bootloader.create_boot_entry(disk, path)
    except Exception as exc:
        detail = getattr(exc, "detail", str(exc))
        raise InstallError(msg.efi_entry_failed(path), detail) from None

"""The install pipeline: the steps of SPEC.md in order, each reported in the status model.

Order matters for safety: everything that can refuse the request without touching the disk
(validation, memory, disk choice and busy checks, download, checksum, format and size checks)
runs before the first byte is written. The disk is re-checked for business right before the
wipe, since minutes may have passed during the download.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agent import blockdev, bootloader, configdrive, disks, download, inspect, memory, partition
from agent import messages as msg
from agent.checksum import verify
from agent.messages import InstallError
from agent.payload import InstallRequest
from agent.status import InstallStatus
from agent.workspace import download_area
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
            return False
        if isinstance(exc, InstallError):
            if exc.detail:
                log.error("%s failed: %s", self.current, exc.detail)
            self.status.fail(self.current, exc.message)
            return False
        return False


def _run_locked(request: InstallRequest, options: InstallOptions, status: InstallStatus) -> bool:
    step = _Steps(status)
    status.begin()
    try:
        _install(request, options, status, step)
    except InstallError:
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
    request: InstallRequest, options: InstallOptions, status: InstallStatus, step: _Steps
) -> None:
    with step("validate"):
        for warning in request.warnings:
            status.warn(warning)

    with step("memory"):
        budget = memory.image_budget()
        if budget <= 0:
            raise InstallError(msg.too_big_for_memory(request.image_type))

    with step("disk"):
        target = disks.select_target(options.disk, options.hints)
        disks.check_not_busy(target)
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

        with step("inspect"):
            info = inspect.inspect_image(image_path, request.image_type)
            inspect.check_fits_disk(info, target.path, target.size)
            inspect.check_sector_size(info, target.path, target.logical_sector_size)

        with step("write"):
            disks.check_not_busy(target)
            try:
                blockdev.wipe_stale_metadata(target)
            except InstallError:
                raise
            except Exception as exc:
                raise InstallError(msg.cant_write(request.image_type), str(exc)) from None
            write_image(
                image_path,
                info.format,
                target.path,
                request.image_type,
                info.virtual_size,
                on_progress=status.update_progress,
            )
            image_path.unlink()
            _reread(target.path)

        with step("gpt"):
            if partition.table_type(target.path) == "gpt":
                partition.relocate_backup_gpt(target)

        with step("configdrive"):
            drive = area / "configdrive.img"
            try:
                configdrive.build_drive(request, drive, sector_size=target.logical_sector_size)
            except InstallError:
                raise
            except Exception as exc:
                raise InstallError(msg.CONFIGDRIVE_FAILED, f"building the drive: {exc}") from None
            partition.add_config_drive(target, drive)

    with step("bootloader"):
        if request.efi_bootloader_path:
            _boot_entry(request.efi_bootloader_path, target.path, status)

    status.finish(msg.install_done(target.path))


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

"""The install pipeline: the steps of SPEC.md in order, each reported in the status model.

Order matters for safety: everything that can refuse the request without touching the disk
(validation, memory, disk choice and busy checks, download, checksum, format and size checks,
and the whole disk layout with the config drive: the "prepare" step) runs before the first byte
is written. The disk is flock-ed from its choice to the end of the install (one install per disk
across processes), pinned by identity when chosen and held with ``O_EXCL`` for the write phase
(agent/claim.py), so a renamed or swapped device node is refused instead of written.

The write phase puts the disk's first MiB on last (agent/layout.py): until the final write the
disk has no partition table, so a kill at any moment, even SIGKILL, leaves nothing bootable.

A SIGTERM, SIGINT or SIGHUP (when the install runs in the main thread, as the CLI's does), or
``request_stop`` (from the API server's thread), ends the install like any failure: one result
message, the download area unmounted and removed, the image writer killed, the disk's tables
cleared. Only the final table write is not cut (``deferred``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from agent import (
    blockdev,
    bootloader,
    claim,
    disks,
    download,
    firmware,
    layout,
    memory,
    writer,
)
from agent import messages as msg
from agent.checksum import verify
from agent.messages import InstallError
from agent.payload import InstallRequest
from agent.regions import Region
from agent.status import InstallStatus
from agent.workspace import clean_stale, download_area, release

if TYPE_CHECKING:
    from agent import inspect, streamcopy

# What only the steps after the download need (oslo.utils' format inspector, pycdlib: about a
# tenth of a second of imports): imported in the background while the image downloads.
LATER_MODULES = ("agent.inspect", "agent.configdrive", "agent.streamcopy")

log = logging.getLogger(__name__)

INSTALL_LOCK = threading.Lock()
DEFAULT_WORKDIR = Path("/run/byoi-agent")


@dataclass
class InstallOptions:
    disk: str | None = None
    hints: dict[str, str] = field(default_factory=dict)
    workdir: Path = DEFAULT_WORKDIR
    download_settings: download.DownloadSettings | None = None
    verify: str = "sample"  # full | sample | none (agent/writer.py)
    stream: bool = False  # write while downloading (agent/streamcopy.py)
    firmware: str = "auto"  # what boots the disk: auto | uefi | bios (agent/firmware.py)


def download_settings(
    ca_bundle: str | None = None,
    *,
    max_rate: float | None = None,
    outage_tolerance: float | None = None,
) -> download.DownloadSettings | None:
    """The download settings for the command line's options (None: the defaults)."""
    given = {"ca_bundle": ca_bundle, "max_rate": max_rate, "outage_tolerance": outage_tolerance}
    chosen = {k: v for k, v in given.items() if v is not None}
    return download.DownloadSettings(**chosen) if chosen else None


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

    def request(self, signum: int) -> None:
        """From another thread (the API server's signal handling): stop at the next check."""
        if self.received is None:
            self.received = signum
            log.warning("stop requested (%s): stopping the install", signal.Signals(signum).name)

    def check(self) -> None:
        """A safe point: raise ``Interrupted`` if a stop was requested and is not deferred."""
        if not self.deferring:
            self._raise()

    def watching(self, progress: Callable[[int, int | None], None]) -> Callable[..., None]:
        """``progress`` that is also a safe point (downloads and writes report often)."""

        def report(done: int, total: int | None) -> None:
            progress(done, total)
            self.check()

        return report

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


_ACTIVE: list[_Signals] = []  # the running install's stop switch (one install per process)


def run_install(request: InstallRequest, options: InstallOptions, status: InstallStatus) -> bool:
    """Run one install; True on success. The status holds the result message either way."""
    if not INSTALL_LOCK.acquire(blocking=False):
        raise InstallError(msg.INSTALL_RUNNING)
    try:
        return _run_locked(request, options, status)
    finally:
        INSTALL_LOCK.release()


def request_stop(signum: int = signal.SIGTERM) -> bool:
    """Ask the running install, in whatever thread, to end at its next safe point with the
    interrupted message (a download or write reports progress often; the final table write is
    not cut). True when an install was running. Its writer is killed and the disk left with
    no partition table (agent/layout.py: the head is written last)."""
    for signals in list(_ACTIVE):
        signals.request(signum)
        return True
    return False


class _Steps:
    """Runs one step at a time, turning its InstallError into the step's error state."""

    def __init__(self, status: InstallStatus, signals: _Signals) -> None:
        self.status = status
        self.signals = signals
        self.current = ""

    def __call__(self, key: str) -> _Steps:
        self.current = key
        return self

    def __enter__(self) -> None:
        self.signals.check()  # between steps: a safe point
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
    signals = _Signals()
    step = _Steps(status, signals)
    status.begin()
    _ACTIVE.append(signals)
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
    finally:
        _ACTIVE.remove(signals)
    return True


def _unexpected_message(step: str, request: InstallRequest, exc: Exception) -> str:
    if step == "download":
        return msg.download_failed(request.redacted_url)
    if step in ("write", "verify"):
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

    with contextlib.ExitStack() as stack:
        with step("disk"):
            target = disks.select_target(options.disk, options.hints, group=request.disk_group_id)
            firmware.check_bootable(
                firmware.resolve(options.firmware), target.path, target.logical_sector_size
            )
            disks.check_not_busy(target)
            pinned = claim.pin(target.path, target.major, target.minor, target.size)
            stack.enter_context(claim.locked(target.path))
            # the old disk's metadata, read before anything (a streaming write) touches it
            stale = blockdev.stale_regions(target.path)
            status.set_disk(target.path)
            log.info("target disk: %s (%s)", target.path, target.reason)

        area = stack.enter_context(download_area(options.workdir, budget))
        job = _WriteJob(request, options, target, pinned, area / "image")
        if options.stream:
            job.start_stream(stack, area)
        with job.clearing():
            _fetch(request, options, status, step, signals, job, budget)
            with step("inspect"):
                from agent import inspect

                info = inspect.inspect_image(job.image, request.image_type)
                inspect.check_fits_disk(info, target.path, target.size)
                inspect.check_sector_size(info, target.path, target.logical_sector_size)
            with step("prepare"):
                drive, plan = _prepare(request, target, job.image, info, area, stale)
            job.run(info, plan, drive, status, step, signals)

    with step("bootloader"):
        if request.efi_bootloader_path:
            _boot_entry(request.efi_bootloader_path, target.path, status)

    status.finish(msg.install_done(target.path))


def preload(names: tuple[str, ...]) -> threading.Thread:
    """Import ``names`` in a daemon thread (the import lock makes a step that needs one of them
    wait for it); a failure is left for that step to meet and report."""

    def run() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:
                log.debug("preloading %s failed: %s", name, exc)

    thread = threading.Thread(target=run, name="preload", daemon=True)
    thread.start()
    return thread


def _fetch(
    request: InstallRequest,
    options: InstallOptions,
    status: InstallStatus,
    step: _Steps,
    signals: _Signals,
    job: _WriteJob,
    budget: int,
) -> None:
    """Download and checksum the image into the download area (the stream copy, if any,
    follows the download)."""
    progress = status.update_progress
    if job.stream is not None:
        stream_progress = job.stream.progress

        def progress(done: int, total: int | None) -> None:
            status.update_progress(done, total)
            stream_progress(done, total)

    with step("download"):
        preload(LATER_MODULES)
        result = download.download(
            request.image_url,
            job.image,
            headers=request.http_headers,
            image_type=request.image_type,
            checksum_type=request.checksum_type,
            memory_budget=budget,
            on_progress=signals.watching(progress),
            settings=options.download_settings,
            on_idle=signals.check,
        )
        if job.stream is not None:
            job.stream.progress(result.size, result.size)
            job.stream.downloaded()
    with step("checksum"):
        if request.checksum_type and request.checksum:
            verify(request.checksum_type, result.digest or "", request.checksum)
        elif not result.length_verified:
            status.warn(msg.UNVERIFIED_DOWNLOAD)


def _prepare(
    request: InstallRequest,
    target: disks.Disk,
    image_path: Path,
    info: inspect.ImageInfo,
    area: Path,
    stale: list[Region],
) -> tuple[Path, layout.DiskPlan]:
    """Build the config drive and plan the whole disk: every refusal before the first write."""
    from agent import configdrive

    drive = area / "configdrive.img"
    try:
        configdrive.build_drive(request, drive, sector_size=target.logical_sector_size)
    except InstallError:
        raise
    except Exception as exc:
        raise InstallError(msg.CONFIGDRIVE_FAILED, f"building the drive: {exc}") from None
    try:
        plan = layout.plan(
            image_path, info.format, info.virtual_size, target, drive, stale, area, info.head
        )
    except layout.PlanError as exc:
        message = msg.CONFIGDRIVE_FAILED if exc.kind == "configdrive" else msg.GPT_MOVE_FAILED
        raise InstallError(message, f"{target.path}: nothing written: {exc}") from None
    return drive, plan


@dataclass(frozen=True)
class _Written:
    """What the write phase puts on the disk: the inspected image, its plan, the drive."""

    info: inspect.ImageInfo
    plan: layout.DiskPlan
    drive: Path


@dataclass
class _WriteJob:
    """The write phase, on the held disk, in the order that keeps it safe (agent/layout.py):
    the head is zeroed first and rewritten last, so the disk boots nothing until it is done.
    Any failure after the first write clears the disk's first and last MiB again."""

    request: InstallRequest
    options: InstallOptions
    target: disks.Disk
    pinned: claim.Pin
    image: Path
    touched: bool = False
    fd: int | None = None  # the O_EXCL claim, once taken
    stream: streamcopy.StreamCopy | None = None

    def start_stream(self, stack: contextlib.ExitStack, area: Path) -> None:
        """--stream: hold the disk now and let the body follow the download."""
        disks.check_not_busy(self.target)
        self.fd = stack.enter_context(claim.hold(self.pinned))
        from agent import streamcopy

        self.stream = streamcopy.StreamCopy(
            self.image, self.request.image_type, self.target.path, self.target.size, area
        )
        stack.callback(self.stream.stop)

    @contextlib.contextmanager
    def clearing(self) -> Iterator[None]:
        """Whatever fails after the disk was first written leaves it with no table."""
        try:
            yield
        except BaseException as exc:
            if self.stream is not None:
                self.stream.stop()
            if self.touched or (self.stream is not None and self.stream.touched):
                self._clear()
            if isinstance(exc, (InstallError, Interrupted, KeyboardInterrupt)):
                raise
            if self.touched:
                raise InstallError(msg.cant_write(self.request.image_type), repr(exc)) from None
            raise

    def run(
        self,
        info: inspect.ImageInfo,
        plan: layout.DiskPlan,
        drive: Path,
        status: InstallStatus,
        step: _Steps,
        signals: _Signals,
    ) -> None:
        with contextlib.ExitStack() as held:
            self._steps(held, _Written(info, plan, drive), status, step, signals)

    def _steps(
        self,
        held: contextlib.ExitStack,
        what: _Written,
        status: InstallStatus,
        step: _Steps,
        signals: _Signals,
    ) -> None:
        info, plan, drive = what.info, what.plan, what.drive
        path, kind = self.target.path, self.request.image_type
        progress = signals.watching(status.update_progress)
        with step("write"):
            fd = self._hold(held)
            self.touched = True
            # a stream still writing its last window would put back what the zeroing clears
            # (the image's own backup GPT): it ends first
            streamed = self.stream is not None and self.stream.wait(progress)
            # the stream's first write made the head durably zero: the rest can wait for the
            # body's flush; without a stream, the head must be zero on the disk before the body
            durable = not streamed
            _io(lambda: blockdev.zero(path, plan.zero_first, durable=durable), msg.cant_write(kind))
            if not streamed:
                writer.checkpoint("body")
                writer.copy_body(self.image, info.format, path, plan, kind, progress)
            body_flush = writer.BodyFlush(path, kind)
            if self.options.verify == "none":
                body_flush.wait()
        with step("verify"):
            try:
                writer.verify_body(
                    self.image,
                    info.format,
                    path,
                    plan,
                    kind,
                    self.options.verify,
                    progress,
                    extents=info.data_extents,
                )
            finally:
                body_flush.wait(check=False)  # nothing is cleared or written while it runs
            body_flush.wait()
        held.callback(release(self.image).join)  # its RAM is the rescue system's again
        with step("configdrive"):
            claim.check_same(self.pinned, fd)
            _io(lambda: writer.write_drive(path, plan, drive), msg.CONFIGDRIVE_FAILED)
            writer.checkpoint("tables")
        table_failed = msg.GPT_MOVE_FAILED if plan.label == "gpt" else msg.CONFIGDRIVE_FAILED
        with step("gpt"), signals.deferred():
            claim.check_same(self.pinned, fd)
            _io(lambda: writer.write_tail(path, plan), table_failed)
            _io(lambda: writer.write_head(path, plan), table_failed)
            _reread(path)
            problems = writer.result_problems(path, plan)
            if problems:
                raise InstallError(table_failed, f"{path}: " + "; ".join(problems))

    def _hold(self, held: contextlib.ExitStack) -> int:
        if self.fd is not None:
            claim.check_same(self.pinned, self.fd)
            return self.fd
        disks.check_not_busy(self.target)
        self.fd = held.enter_context(claim.hold(self.pinned))
        return self.fd

    def _clear(self) -> None:
        try:
            blockdev.invalidate(self.target.path)
        except Exception as cleanup:  # noqa: BLE001 - the original failure is what matters
            log.error("could not clear %s after a failed write: %s", self.target.path, cleanup)


def _io(action: Callable[[], object], message: str) -> None:
    """A device write: an OSError becomes the step's documented message."""
    try:
        action()
    except OSError as exc:
        raise InstallError(message, str(exc)) from None


def _reread(path: str) -> None:
    try:
        blockdev.reread_partition_table(path)
    except Exception as exc:  # the kernel's view is a convenience; the disk is already right
        log.warning("could not re-read the partition table of %s: %s", path, exc)


def _boot_entry(path: str, disk: str, status: InstallStatus) -> None:
    if not firmware.booted_with_uefi():
        status.warn(msg.EFI_ON_LEGACY)
        return
    try:
        bootloader.create_boot_entry(disk, path)
    except Exception as exc:
        detail = getattr(exc, "detail", str(exc))
        raise InstallError(msg.efi_entry_failed(path), detail) from None

"""cloudbase-init's own ConfigDrive reader (Windows' cloud-init), for checking our drives.

The ``cloudbase-init`` wheel is fetched from PyPI with ``pip download --no-deps`` into a cache
directory and unzipped there (its Windows-only dependencies, pywin32/wmi/pymi, are never
installed). Its imports need ``oslo.config``, ``oslo.log`` and ``netaddr`` in the venv.

Only one module cannot be imported on Linux: ``cloudbaseinit.utils.windows.disk`` (raw disk
access through ``ctypes.windll``). It is replaced by ``ImageDisk``, which honours the same
contract (sector-aligned ``seek``/``read``, ``partitions()``) on a disk image file, so that
cloudbase-init's own search (``WindowsConfigDriveManager``: ISO magic and size sniffing, copy,
extraction with ``bsdtar``; VFAT label check and copy with mtools) runs unchanged on our images.
The Windows enumeration calls it makes (physical disks, volumes, CD-ROM drives) are answered by
``ImageOSUtils``, a ``PosixUtils`` that lists the image files it is given.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

VERSION = "1.1.9"
PACKAGE = "cloudbaseinit"


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def fetch_cloudbaseinit(cache: Path) -> Path:
    """Download and unzip the cloudbase-init wheel once; return the directory to import from."""
    site = cache / f"cloudbase-init-{VERSION}"
    if (site / PACKAGE / "metadata" / "services" / "configdrive.py").is_file():
        return site
    download = cache / "download"
    download.mkdir(parents=True, exist_ok=True)
    proc = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(download),
            f"cloudbase-init=={VERSION}",
        ]
    )
    wheels = sorted(download.glob(f"cloudbase_init-{VERSION}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download cloudbase-init failed: {proc.stderr.strip()[-800:]}")
    partial = cache / "unpacking"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(partial)
    shutil.rmtree(site, ignore_errors=True)
    partial.rename(site)
    return site


def _apt_download(names: list[str], cwd: Path) -> None:
    proc = _run(["apt-get", "download", *names], cwd=cwd)
    if proc.returncode != 0:
        update = _run(["apt-get", "update"])  # a fresh CI container has empty package lists
        proc = _run(["apt-get", "download", *names], cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(
                f"apt-get download {' '.join(names)} failed: {proc.stderr.strip()} "
                f"(apt-get update: {update.stderr.strip()[-500:]})"
            )


def find_bsdtar(cache: Path) -> Path:
    """``bsdtar``: what cloudbase-init extracts ISO drives with (libarchive, as on Windows).

    The system's when installed (apt ``libarchive-tools``); otherwise Debian's
    ``libarchive-tools`` and ``libarchive13`` are unpacked into the cache with ``dpkg -x`` and run
    through a wrapper that points the loader at the unpacked library.
    """
    system = shutil.which("bsdtar")
    if system:
        return Path(system)
    wrapper = cache / "bsdtar"
    if wrapper.is_file():
        return wrapper
    debs = cache / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    _apt_download(["libarchive-tools", "libarchive13"], debs)
    root = cache / "bsdtar-root"
    shutil.rmtree(root, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        proc = _run(["dpkg", "-x", str(deb), str(root)])
        if proc.returncode != 0:
            raise RuntimeError(f"dpkg -x {deb.name} failed: {proc.stderr.strip()}")
    libs = ":".join(str(p.parent) for p in root.glob("usr/lib/*/libarchive.so.13"))
    wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{libs}" exec "{root}/usr/bin/bsdtar" "$@"\n')
    wrapper.chmod(0o755)
    proc = _run([str(wrapper), "--version"])
    if proc.returncode != 0:
        wrapper.unlink()
        raise RuntimeError(f"unpacked bsdtar does not run: {proc.stderr.strip()}")
    return wrapper


def mtools_dir(cache: Path) -> Path:
    """cloudbase-init runs ``<mtools_path>/mlabel.exe`` and ``mcopy.exe``; mtools dispatches on
    its program name, so these are wrappers calling the real tools."""
    tools = cache / "mtools"
    tools.mkdir(parents=True, exist_ok=True)
    for name in ("mlabel", "mcopy"):
        exe = tools / f"{name}.exe"
        exe.write_text(f'#!/bin/sh\nexec {name} "$@"\n')
        exe.chmod(0o755)
    return tools


class ImageDisk:
    """``cloudbaseinit.utils.windows.disk.Disk`` (and ``Partition``) on an image file.

    Keeps the contract the config-drive search relies on: ``seek`` rounds down to a sector and
    returns the offset it went to, ``read(size, skip)`` reads whole sectors and slices, ``fixed``
    and ``size`` are known once opened, and ``partitions()`` lists the partition table's entries
    (read with ``sfdisk --json``) as devices of their own.
    """

    def __init__(
        self, path: str, offset: int = 0, length: int | None = None, sector_size: int = 512
    ) -> None:
        self._path = path
        self._offset = offset
        self._length = length
        self._sector_size = sector_size
        self._file: Any = None
        self.fixed: bool | None = None

    def __repr__(self) -> str:
        return f"<ImageDisk {self._path}@{self._offset}>"

    def __enter__(self) -> ImageDisk:
        self._file = open(self._path, "rb")  # noqa: SIM115 (closed in __exit__)
        if self._length is None:
            self._length = Path(self._path).stat().st_size - self._offset
        self.fixed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self._file = None

    @property
    def size(self) -> int:
        return self._length or 0

    def seek(self, offset: int) -> int:
        safe = offset // self._sector_size * self._sector_size
        self._file.seek(self._offset + safe)
        return safe

    def read(self, size: int, skip: int = 0) -> bytes:
        total = size + skip
        safe = -(-total // self._sector_size) * self._sector_size
        return self._file.read(safe)[skip:total]

    def partitions(self) -> list[ImageDisk]:
        proc = _run(["sfdisk", "--json", self._path])
        if proc.returncode != 0:
            return []  # Windows reports no partition on a disk without a table
        table = json.loads(proc.stdout)["partitiontable"]
        unit = table.get("sectorsize", self._sector_size)
        return [
            ImageDisk(self._path, p["start"] * unit, p["size"] * unit, self._sector_size)
            for p in table.get("partitions", [])
        ]


def import_cloudbaseinit(site: Path) -> SimpleNamespace:
    """Import cloudbase-init's config-drive service, search and network plugin from ``site``."""
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    # The only Windows-only import on this path: `from ctypes import windll` in disk.py.
    windows_pkg = importlib.import_module("cloudbaseinit.utils.windows")
    disk = types.ModuleType("cloudbaseinit.utils.windows.disk")
    disk.Disk = ImageDisk  # type: ignore[attr-defined]
    sys.modules[disk.__name__] = disk
    windows_pkg.disk = disk  # type: ignore[attr-defined]
    try:
        modules = {
            name.rsplit(".", 1)[-1]: importlib.import_module(f"cloudbaseinit.{name}")
            for name in (
                "conf",
                "exception",
                "metadata.services.base",
                "metadata.services.baseconfigdrive",
                "metadata.services.configdrive",
                "metadata.services.osconfigdrive.windows",
                "models.network",
                "osutils.factory",
                "osutils.posix",
                "plugins.common.networkconfig",
                "plugins.common.execcmd",
                "plugins.common.userdatautils",
            )
        }
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"cloudbase-init needs {exc.name!r}: pip install oslo.config oslo.log netaddr"
        ) from exc
    return SimpleNamespace(**modules)


def _os_utils(cbi: SimpleNamespace, disks: list[str]) -> Any:
    class ImageOSUtils(cbi.posix.PosixUtils):
        """The Windows inventory calls of the config-drive search, for image files."""

        def get_cdrom_drives(self) -> list[str]:
            return []

        def get_physical_disks(self) -> list[str]:
            return list(disks)

        def get_volumes(self) -> list[str]:
            return []  # mounted volumes: this kernel mounts neither ISO 9660 nor FAT

    return ImageOSUtils()


@contextlib.contextmanager
def discovered_service(
    cbi: SimpleNamespace, disks: list[Path], *, bsdtar: Path, mtools: Path
) -> Iterator[Any]:
    """A ``ConfigDriveService`` whose ``load()`` searched ``disks`` (image files standing for
    \\\\.\\PHYSICALDRIVEn) the way cloudbase-init does on Windows: every type (iso, vfat) at
    every location (cdrom, hdd, partition), in its order. Yields the loaded service, or fails
    when nothing was found."""
    conf = cbi.conf.CONF
    conf.set_override("bsdtar_path", str(bsdtar))
    conf.set_override("mtools_path", str(mtools))
    manager = cbi.windows.WindowsConfigDriveManager.__new__(cbi.windows.WindowsConfigDriveManager)
    cbi.windows.base.BaseConfigDriveManager.__init__(manager)  # mkdtemp target_path
    manager._osutils = _os_utils(cbi, [str(d) for d in disks])
    factory = cbi.baseconfigdrive.factory
    real_factory = factory.get_config_drive_manager
    factory.get_config_drive_manager = lambda: manager  # sys.platform is not win32 here
    service = cbi.configdrive.ConfigDriveService()
    try:
        if not service.load():
            raise AssertionError(f"cloudbase-init found no config drive on {disks}")
        yield service
    finally:
        factory.get_config_drive_manager = real_factory
        shutil.rmtree(manager.target_path, ignore_errors=True)
        conf.clear_override("bsdtar_path")
        conf.clear_override("mtools_path")


def service_for_dir(cbi: SimpleNamespace, tree_dir: Path) -> Any:
    """A ``ConfigDriveService`` reading a drive already copied to ``tree_dir``: what ``load()``
    leaves behind (``_metadata_path`` is the copied drive's root)."""
    service = cbi.configdrive.ConfigDriveService()
    service._metadata_path = str(tree_dir)
    return service


def read_with_cloudbaseinit(cbi: SimpleNamespace, service: Any) -> dict[str, Any]:
    """What cloudbase-init's plugins get from the service (the calls they make)."""
    not_there = cbi.base.NotExistingMetadataException
    try:
        user_data = service.get_decoded_user_data()
    except not_there:
        user_data = None
    return {
        "instance_id": service.get_instance_id(),
        "hostname": service.get_host_name(),
        "public_keys": sorted(service.get_public_keys()),
        "user_data": user_data,
        "admin_username": service.get_admin_username(),
        "admin_password": service.get_admin_password(),
        "meta": service._get_meta_data().get("meta"),
        "network_v2": service.get_network_details_v2(),
        "network_v1": service.get_network_details(),
        "instance_data": service.get_instance_data(),
    }


class RecordingNetworkOSUtils:
    """The Windows network calls NetworkConfigPlugin makes, recorded instead of applied.

    ``adapters`` maps MAC -> Windows adapter name, as ``get_adapter_addresses`` would; an unknown
    MAC raises like cloudbase-init's WindowsUtils does.
    """

    def __init__(self, cbi: SimpleNamespace, adapters: dict[str, str]) -> None:
        self._cbi = cbi
        self.adapters = adapters
        self.calls: list[tuple] = []

    def get_network_adapter_name_by_mac_address(self, mac: str) -> str:
        for known, name in self.adapters.items():
            if known.lower() == mac.lower():
                return name
        raise self._cbi.exception.ItemNotFoundException(
            f'Network interface with MAC address "{mac}" not found'
        )

    def rename_network_adapter(self, old: str, new: str) -> None:
        self.calls.append(("rename", old, new))

    def set_network_adapter_mtu(self, name: str, mtu: int) -> None:
        self.calls.append(("mtu", name, mtu))

    def enable_network_adapter(self, name: str, enabled: bool) -> None:
        self.calls.append(("enable", name, enabled))

    def set_static_network_config(self, *args: object) -> bool:
        self.calls.append(("static", *args))
        return False


def run_network_plugin(cbi: SimpleNamespace, service: Any, osutils: Any) -> tuple:
    """cloudbase-init's NetworkConfigPlugin.execute on ``service``, with ``osutils`` standing for
    Windows; returns the plugin's result."""
    factory = cbi.factory
    real = factory.get_os_utils
    factory.get_os_utils = lambda: osutils
    try:
        return cbi.networkconfig.NetworkConfigPlugin().execute(service, {})
    finally:
        factory.get_os_utils = real

"""cloud-init's own ConfigDrive reader, for checking the drives we write.

The Debian ``cloud-init`` package is fetched with ``apt-get download`` into a cache directory,
unpacked with ``dpkg -x`` (nothing is installed on this system) and imported from there. Its
imports need PyYAML, requests and configobj in the venv.

Drives are read back without mounting (this kernel cannot): ISO 9660 with pycdlib by Rock Ridge
names (what Linux shows), FAT with mtools at a byte offset.
"""

from __future__ import annotations

import importlib
import io
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pycdlib

DIST_PACKAGES = Path("usr/lib/python3/dist-packages")


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def fetch_cloudinit(cache: Path) -> Path:
    """Download and unpack Debian's cloud-init once; return its dist-packages directory."""
    root = cache / "root"
    packages = root / DIST_PACKAGES
    if (packages / "cloudinit" / "sources" / "helpers" / "openstack.py").is_file():
        return packages
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("cloud-init_*.deb"):
        old.unlink()
    proc = _run(["apt-get", "download", "cloud-init"], cwd=cache)
    if proc.returncode != 0:
        # A fresh CI container has empty package lists.
        update = _run(["apt-get", "update"])
        proc = _run(["apt-get", "download", "cloud-init"], cwd=cache)
        if proc.returncode != 0:
            raise RuntimeError(
                f"apt-get download cloud-init failed: {proc.stderr.strip()} "
                f"(apt-get update: {update.stderr.strip()[-500:]})"
            )
    debs = sorted(cache.glob("cloud-init_*.deb"))
    if not debs:
        raise RuntimeError("apt-get download cloud-init produced no .deb")
    shutil.rmtree(root, ignore_errors=True)
    proc = _run(["dpkg", "-x", str(debs[-1]), str(root)])
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg -x failed: {proc.stderr.strip()}")
    return packages


def import_cloudinit(packages: Path) -> SimpleNamespace:
    """Import cloud-init's openstack helper and ConfigDrive datasource from ``packages``."""
    if str(packages) not in sys.path:
        sys.path.insert(0, str(packages))
    try:
        openstack: ModuleType = importlib.import_module("cloudinit.sources.helpers.openstack")
        datasource = importlib.import_module("cloudinit.sources.DataSourceConfigDrive")
        helpers = importlib.import_module("cloudinit.helpers")
        sources = importlib.import_module("cloudinit.sources")
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"cloud-init needs {exc.name!r}: pip install pyyaml requests configobj into .venv"
        ) from exc
    return SimpleNamespace(
        openstack=openstack, datasource=datasource, helpers=helpers, sources=sources
    )


def extract_iso(
    source: Path | str, dest: Path, *, offset: int = 0, size: int | None = None
) -> Path:
    """Copy every file of an ISO 9660 image (at ``offset`` in ``source``) to ``dest`` by its
    Rock Ridge name; also check that Joliet (Windows' view) has the same files."""
    with open(source, "rb") as f:
        f.seek(offset)
        data = f.read(size if size is not None else -1)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        rr_files = set()
        for dirpath, _dirs, files in iso.walk(rr_path="/"):
            for name in files:
                rr = f"{dirpath.rstrip('/')}/{name}"
                rr_files.add(rr)
                target = dest / rr.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, rr_path=rr)
                target.write_bytes(buf.getvalue())
        joliet_files = {
            f"{d.rstrip('/')}/{n}" for d, _s, fs in iso.walk(joliet_path="/") for n in fs
        }
        if joliet_files != rr_files:
            raise AssertionError(f"Joliet and Rock Ridge differ: {joliet_files ^ rr_files}")
        if iso.pvd.volume_identifier.rstrip(b" ") != b"config-2":
            raise AssertionError(f"ISO volume label is {iso.pvd.volume_identifier!r}")
    finally:
        iso.close()
    return dest


def extract_fat(source: Path | str, dest: Path, *, offset: int = 0) -> Path:
    """Copy the whole FAT filesystem at ``offset`` in ``source`` to ``dest`` with mtools."""
    dest.mkdir(parents=True, exist_ok=True)
    image = f"{source}@@{offset}" if offset else str(source)
    proc = _run(["mcopy", "-s", "-n", "-i", image, "::/", str(dest)])
    if proc.returncode != 0:
        raise AssertionError(f"mcopy failed: {proc.stderr.strip()}")
    return dest


def read_with_cloudinit(ci: SimpleNamespace, tree_dir: Path, work: Path) -> dict[str, Any]:
    """What cloud-init makes of a config-drive directory.

    ``read_v2`` is the reader itself; the full ``DataSourceConfigDrive`` (seeded with the
    directory) adds the instance-id, hostname, SSH key and network decisions it takes at boot.
    """
    reader = ci.openstack.ConfigDriveReader(str(tree_dir))
    raw = reader.read_v2()
    cloud = work / "cloud"
    seed = cloud / "seed" / "config_drive"
    seed.parent.mkdir(parents=True, exist_ok=True)
    if seed.exists():
        shutil.rmtree(seed)
    shutil.copytree(tree_dir, seed)
    paths = ci.helpers.Paths({"cloud_dir": str(cloud), "run_dir": str(work / "run")})
    ds = ci.datasource.DataSourceConfigDrive({}, None, paths)
    if not ds._get_data():
        raise AssertionError("DataSourceConfigDrive did not claim the drive")
    return {
        "raw": raw,
        "version": raw.get("version"),
        "instance_id": ds.get_instance_id(),
        "hostname": ds.get_hostname(metadata_only=True).hostname,
        "ssh_keys": ds.get_public_ssh_keys(),
        "userdata": ds.userdata_raw,
        "meta": ds.metadata.get("meta"),
        "network_config": ds.network_config,
        "source": ds.source,
    }

"""Shared fixtures: real loop devices and a real HTTP server on 127.0.0.1.

Every loop device a test attaches is detached at teardown, even when the test fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root for loop devices")


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: ``make_loop(size_bytes, sector_size=512, name="disk.img") -> "/dev/loopN"``."""
    attached: list[str] = []

    def make(size: int, sector_size: int = 512, name: str = "disk.img") -> str:
        backing = tmp_path / name
        with open(backing, "wb") as f:
            f.truncate(size)
        args = ["losetup", "-f", "--show"]
        if sector_size != 512:
            args += ["--sector-size", str(sector_size)]
        dev = _run(*args, str(backing)).strip()
        attached.append(dev)
        # a reused loop number may still carry another test's partitions (see release_loop)
        subprocess.run(["partx", "-d", dev], capture_output=True, timeout=60)
        return dev

    yield make
    for dev in attached:
        release_loop(dev)


@pytest.fixture
def loop(make_loop: Callable[..., str]) -> Callable[..., str]:
    """The same factory as ``make_loop``."""
    return make_loop


def release_loop(dev: str) -> None:
    """Detach a loop device, first dropping partitions that ``partx -a`` may have added (this
    kernel keeps them after ``losetup -d``) and the page cache of the device."""
    subprocess.run(["partx", "-d", dev], capture_output=True, timeout=60)
    subprocess.run(["blockdev", "--flushbufs", dev], capture_output=True, timeout=60)
    subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over real HTTP on 127.0.0.1: ``(directory, base_url)``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def https_dir(tmp_path: Path) -> Iterator[tuple[Path, str, Path]]:
    """A directory served over real HTTPS on 127.0.0.1, with a certificate signed by a test CA
    that the system does not trust: ``(directory, base_url, ca_file)``."""
    import ssl

    import trustme

    ca = trustme.CA()
    root = tmp_path / "www-tls"
    root.mkdir()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"https://127.0.0.1:{server.server_address[1]}", ca_file
    finally:
        server.shutdown()
        server.server_close()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None

"""Streaming write: qemu-img reads the image while it is still being downloaded.

``qemu-img convert`` cannot read a file that is still growing: past the downloaded bytes it
would read zeros (a preallocated file) or hit the end of the file. So the growing tmpfs file is
served to it as a read-only NBD export on a Unix socket, by a small server in this process, and
each read waits until the download has covered the bytes it asks for (``Growing``). The download
side calls ``advance`` as bytes land, ``finish`` at the end, ``fail`` when it gives up: blocked
reads then fail at once with EIO and qemu-img exits with an I/O error instead of hanging.

No maintained Python NBD server library exists, and nbdkit's python plugin would run the wait
in another process than the download; the protocol subset qemu's client needs is small: the
fixed newstyle handshake (NBD_OPT_GO / INFO / EXPORT_NAME / LIST / ABORT, every other option
refused as unsupported, so qemu falls back to simple replies), then NBD_CMD_READ and
NBD_CMD_DISC. Reads are answered with ``os.sendfile`` (no copy through Python). Waiting is a
condition variable woken by the download, not a poll loop: an idle export costs no CPU.

    growing = Growing(size)               # size: the Content-Length
    with export(image, size, growing, workdir) as nbd:
        # meanwhile the download calls growing.advance(n) / finish() / fail(reason)
        for off, length in windows(body):  # qcow2; a raw image is one window
            qemu-img convert -n -W -m 16 -t none --image-opts image_opts(nbd, fmt, off, length)
                     --target-image-opts driver=raw,offset=off,file.driver=host_device,...

A qcow2 goes in windows of one L2 table each (``windows``): one ``qemu-img convert`` of the
whole image first reads every L2 table, and the last ones sit near the end of the file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.tools import opt_value
from agent.units import MiB

log = logging.getLogger(__name__)

EXPORT_NAME = "image"

# --- protocol constants (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
# read-only; several connections see the same bytes (no write caches to keep coherent)
TRANSMISSION_FLAGS = (1 << 0) | (1 << 1) | (1 << 8)  # HAS_FLAGS | READ_ONLY | CAN_MULTI_CONN
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
MAX_REQUEST = 32 * MiB  # qemu's own NBD limit; announced as the maximum block size
BLOCK_SIZES = (1, 4096, MAX_REQUEST)  # minimum, preferred, maximum
_REQUEST = struct.Struct(">IHHQQI")


class StreamFailed(Exception):
    """A read cannot be answered: the download failed, or the export is closing."""


class Growing:
    """How many bytes of the image have landed in the file, shared by the download (writer)
    and the NBD server (readers). The final size is known up front (Content-Length).

    ``advance`` must only report bytes already written to the file (page cache is enough: the
    server reads the same file). Readers wake only when the bytes they wait for are covered, so
    a download advancing in small chunks does not wake every blocked read each time.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._have = 0
        self._failed: str | None = None
        self._cond = threading.Condition()
        self._wanted: list[int] = []  # the end offsets blocked readers wait for
        self.blocked = 0  # reads that had to wait for the download (shown in logs and tests)

    @property
    def have(self) -> int:
        """Bytes available from the start of the file."""
        return self._have

    def advance(self, nbytes_total: int) -> None:
        """The download has written the first ``nbytes_total`` bytes (monotonic: less is
        ignored, more than the size is capped)."""
        with self._cond:
            if nbytes_total <= self._have:
                return
            self._have = min(nbytes_total, self.size)
            if any(end <= self._have for end in self._wanted):
                self._cond.notify_all()

    def finish(self) -> None:
        """Every byte has arrived."""
        self.advance(self.size)

    def fail(self, reason: str) -> None:
        """The download failed: blocked and later reads fail at once."""
        with self._cond:
            self._failed = reason or "download failed"
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every blocked reader so it re-checks its stop condition."""
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, end: int, stopped: threading.Event, *, data_wins: bool = False) -> None:
        """Block until the first ``end`` bytes are there; raise StreamFailed when the download
        failed or ``stopped`` is set. A failure wins over data (the install is failing, a read
        need not be answered), unless ``data_wins``: then bytes already there are served."""
        with self._cond:
            if self._have >= end and (self._failed is None or data_wins):
                return
            self.blocked += 1
            self._wanted.append(end)
            try:
                self._cond.wait_for(
                    lambda: self._have >= end or self._failed is not None or stopped.is_set()
                )
            finally:
                self._wanted.remove(end)
            if self._have >= end and data_wins:
                return
            if self._failed is not None:
                raise StreamFailed(self._failed)
            if self._have < end:
                raise StreamFailed("export closed")


@dataclass(frozen=True)
class Export:
    """A running export: where qemu connects, and under which name."""

    socket: Path
    name: str = EXPORT_NAME

    @property
    def uri(self) -> str:
        """The NBD URI (``nbd+unix``), for tools that take a filename."""
        return f"nbd+unix:///{self.name}?socket={self.socket}"


def nbd_opts(nbd: Export, prefix: str = "file.") -> str:
    """The ``--image-opts`` keys of the NBD protocol node, under ``prefix`` (pure)."""
    p = prefix
    return (
        f"{p}driver=nbd,{p}server.type=unix,{p}server.path={opt_value(nbd.socket)},"
        f"{p}export={opt_value(nbd.name)}"
    )


def image_opts(nbd: Export, fmt: str, offset: int | None = None, size: int | None = None) -> str:
    """The ``--image-opts`` source string of the image ``fmt`` (raw, qcow2, ...) read through
    the export; with ``offset``/``size`` a raw window over the image's virtual disk, as the
    writer uses on plain files (pure)."""
    if offset is None and size is None:
        return f"driver={fmt},{nbd_opts(nbd)}"
    window = "driver=raw" + (f",offset={offset}" if offset is not None else "")
    window += f",size={size}" if size is not None else ""
    if fmt == "raw":
        return f"{window},{nbd_opts(nbd)}"
    return f"{window},file.driver={fmt},{nbd_opts(nbd, 'file.file.')}"


def source_args(
    nbd: Export, fmt: str, offset: int | None = None, size: int | None = None
) -> list[str]:
    """The source part of a qemu-img command line (``convert``, ``compare``, ``info``). The
    format is always explicit: ``--image-opts`` takes no ``-f``, and an NBD export would
    otherwise be probed."""
    return ["--image-opts", image_opts(nbd, fmt, offset, size)]


def l2_coverage(cluster_size: int = 65536) -> int:
    """The virtual bytes one qcow2 L2 table maps: ``cluster_size / 8`` entries of one cluster
    each (512 MiB for the default 64 KiB clusters). The natural window of a streamed qcow2."""
    return cluster_size * (cluster_size // 8)


def windows(region: tuple[int, int], step: int | None = None) -> list[tuple[int, int]]:
    """``region`` (offset, length) of the virtual disk cut at the multiples of ``step`` (one L2
    table's coverage by default, ``l2_coverage``): the windows to convert one after the other
    when streaming a qcow2 (pure).

    ``qemu-img convert`` first walks the block status of its whole source (to size its progress
    bar) before it writes a byte: on a qcow2 that reads every L2 table, and in an image written
    in disk order the last ones sit near the end of the file, so one convert of the whole image
    waits for nearly the whole download. The convert of one window reads only that window's L2
    table, which qemu-img allocated just before the window's first data cluster: window ``k``
    starts as soon as its part of the file has arrived and follows the download closely.
    Smaller windows gain nothing (they wait for the same L2 table) and cost a qemu-img start
    each; larger ones wait for later tables. A raw image needs no windows.
    """
    step = step or l2_coverage()
    start, length = region
    end = start + length
    cuts = [start, *range((start // step + 1) * step, end, step), end]
    return [(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("client closed the connection")
        got += k
    return bytes(buf)


def _option_reply(sock: socket.socket, opt: int, rep: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, rep, len(data)) + data)


def _info_replies(sock: socket.socket, opt: int, size: int, requested: tuple[int, ...]) -> None:
    """NBD_OPT_INFO / GO: the export's size and flags, its block sizes if asked, then ACK."""
    _option_reply(sock, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, TRANSMISSION_FLAGS))
    if INFO_BLOCK_SIZE in requested:
        _option_reply(sock, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, *BLOCK_SIZES))
    _option_reply(sock, opt, REP_ACK)


def parse_go(data: bytes) -> tuple[str, tuple[int, ...]] | None:
    """The export name and the info types asked for in an NBD_OPT_INFO / GO payload, or None
    when it is malformed (pure)."""
    if len(data) < 6:
        return None
    (nlen,) = struct.unpack_from(">I", data)
    if len(data) < 4 + nlen + 2:
        return None
    (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
    if len(data) != 4 + nlen + 2 + 2 * nreq:
        return None
    requested = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
    return data[4 : 4 + nlen].decode(errors="replace"), requested


def negotiate(sock: socket.socket, size: int, name: str) -> bool:
    """The fixed newstyle handshake; True when the client entered transmission, False when it
    aborted. Unknown options (STARTTLS, STRUCTURED_REPLY, META_CONTEXT) are refused."""
    sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (cflags,) = struct.unpack(">I", _recv_exact(sock, 4))
    while True:
        magic, opt, length = struct.unpack(">QII", _recv_exact(sock, 16))
        if magic != IHAVEOPT or length > 65536:
            raise ConnectionError("bad NBD option")
        data = _recv_exact(sock, length)
        if opt == OPT_EXPORT_NAME:
            if data.decode(errors="replace") != name:
                raise ConnectionError("unknown export")
            pad = b"" if cflags & FLAG_NO_ZEROES else bytes(124)
            sock.sendall(struct.pack(">QH", size, TRANSMISSION_FLAGS) + pad)
            return True
        if opt == OPT_ABORT:
            with contextlib.suppress(OSError):
                _option_reply(sock, opt, REP_ACK)
            return False
        if opt == OPT_LIST:
            encoded = name.encode()
            _option_reply(sock, opt, REP_SERVER, struct.pack(">I", len(encoded)) + encoded)
            _option_reply(sock, opt, REP_ACK)
        elif opt in (OPT_INFO, OPT_GO):
            parsed = parse_go(data)
            if parsed is None:
                _option_reply(sock, opt, REP_ERR_INVALID)
            elif parsed[0] not in ("", name):
                _option_reply(sock, opt, REP_ERR_UNKNOWN)
            else:
                _info_replies(sock, opt, size, parsed[1])
                if opt == OPT_GO:
                    return True
        else:
            _option_reply(sock, opt, REP_ERR_UNSUP)


def _reply(sock: socket.socket, handle: int, error: int = 0) -> None:
    sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle))


def _send_range(sock: socket.socket, fd: int, offset: int, length: int) -> None:
    """``length`` bytes of the file from ``offset`` onto the socket, in the kernel."""
    while length > 0:
        sent = os.sendfile(sock.fileno(), fd, offset, length)
        if sent == 0:
            raise ConnectionError("image file shorter than announced")
        offset += sent
        length -= sent


def transmit(
    sock: socket.socket, fd: int, size: int, growing: Growing, stopped: threading.Event
) -> None:
    """Answer requests in order until the client disconnects: reads wait for their bytes;
    a read the download cannot serve any more gets EIO; writes get EPERM."""
    while True:
        magic, _flags, cmd, handle, offset, length = _REQUEST.unpack(
            _recv_exact(sock, _REQUEST.size)
        )
        if magic != REQUEST_MAGIC:
            raise ConnectionError("bad NBD request")
        if cmd == CMD_DISC:
            return
        if cmd == CMD_WRITE:
            if length > MAX_REQUEST:
                raise ConnectionError("oversized NBD write")
            _recv_exact(sock, length)
            _reply(sock, handle, errno.EPERM)
        elif cmd != CMD_READ or length > MAX_REQUEST or offset + length > size:
            _reply(sock, handle, errno.EINVAL)
        else:
            try:
                growing.wait_for(offset + length, stopped)
            except StreamFailed as exc:
                log.debug("stream read at %d failed: %s", offset, exc)
                _reply(sock, handle, errno.EIO)
                continue
            sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle), socket.MSG_MORE)
            _send_range(sock, fd, offset, length)


class _Server:
    """The listening socket, its accept thread and one thread per connection."""

    def __init__(self, path: Path, size: int, growing: Growing, sock_path: Path) -> None:
        self.size = size
        self.growing = growing
        self.sock_path = sock_path
        self.stopped = threading.Event()
        self.fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.conns: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            self.listener.bind(str(sock_path))
            os.chmod(sock_path, 0o600)
            self.listener.listen(8)
        except OSError:
            self.listener.close()
            os.close(self.fd)
            raise
        self.acceptor = threading.Thread(target=self._accept, name="nbd-accept", daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # the listener was shut down
            with self.lock:
                if self.stopped.is_set():
                    conn.close()
                    return
                self.conns.add(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if negotiate(conn, self.size, EXPORT_NAME):
                transmit(conn, self.fd, self.size, self.growing, self.stopped)
        except (OSError, ConnectionError, struct.error) as exc:
            if not self.stopped.is_set():
                log.info("nbd connection ended: %s", exc)
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop accepting, fail blocked reads, end every connection, remove the socket."""
        self.stopped.set()
        self.growing.wake()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.acceptor.join()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            threads = list(self.threads)
        for thread in threads:
            thread.join()
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()


@contextlib.contextmanager
def export(path: Path, size: int, growing: Growing, workdir: Path) -> Iterator[Export]:
    """Serve ``path`` (``size`` bytes once complete) read-only over NBD on a Unix socket in
    ``workdir`` while the context runs; reads wait for ``growing``. On exit the server, its
    threads and its socket are gone, and a client still reading gets its connection closed."""
    sock_path = workdir / f"nbd-{os.getpid()}-{id(growing):x}.sock"
    server = _Server(path, size, growing, sock_path)
    try:
        yield Export(sock_path)
    finally:
        server.close()

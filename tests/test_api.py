"""The HTTP API over real sockets on 127.0.0.1 (uvicorn in a thread), with real clients (httpx,
raw sockets), a real TLS certificate (trustme), a real orchestrator for callbacks, and a full
install onto a loop device."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import uvicorn

from agent import messages as msg
from agent.api import (
    OPENAPI,
    ApiSettings,
    create_app,
    install_log_filters,
    load_token,
    parse_listen,
    server_config,
)
from agent.callbacks import CallbackSettings
from agent.payload import InstallRequest
from agent.redact import ScrubFilter
from agent.status import STEP_KEYS, InstallStatus

REPO = Path(__file__).resolve().parent.parent
TOKEN = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body(**meta: str) -> dict[str, Any]:
    values = {"imageURL": "http://127.0.0.1:9/img.qcow2", "imageType": "qcow2", **meta}
    return {
        "templateName": "byoi_64",
        "details": {"customHostname": "node-1"},
        "userMetadata": [{"key": k, "value": v} for k, v in values.items()],
    }


class GatedRunner:
    """Drives a real InstallStatus through every step; holds in "write" until released."""

    def __init__(self, fail_at: str = "", raise_at: str = "") -> None:
        self.gate = threading.Event()
        self.in_write = threading.Event()
        self.fail_at, self.raise_at = fail_at, raise_at
        self.requests: list[InstallRequest] = []

    def __call__(self, request: InstallRequest, options: Any, status: InstallStatus) -> bool:
        self.requests.append(request)
        status.begin()
        for key in STEP_KEYS:
            status.start(key)
            if key == "download":
                for i in range(1, 4):
                    status._rate_mark = (time.monotonic() - 1.0, 0)  # report every update
                    status.update_progress(i * 1000, 3000)
            if key == "write":
                status._rate_mark = (time.monotonic() - 1.0, 0)
                status.update_progress(1500, 3000)
                self.in_write.set()
                assert self.gate.wait(20), "test never released the install"
            if key == self.raise_at:
                raise RuntimeError("boom")
            if key == self.fail_at:
                status.fail(key, msg.GPT_MOVE_FAILED)
                return False
            status.done(key)
        status.finish(msg.install_done("/dev/test"))
        return True


@contextlib.contextmanager
def running(app: Any, settings: ApiSettings, **tls: Any) -> Iterator[str]:
    """uvicorn serving ``app`` on a free 127.0.0.1 port, in a thread; yields the base URL."""
    server = uvicorn.Server(server_config(app, settings, "127.0.0.1", 0, **tls))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    scheme = "https" if tls else "http"
    try:
        yield f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def settings(**overrides: Any) -> ApiSettings:
    values: dict[str, Any] = dict(token=TOKEN, workdir=Path("/nonexistent"))
    values.update(overrides)
    return ApiSettings(**values)


@pytest.fixture
def runner() -> Iterator[GatedRunner]:
    r = GatedRunner()
    yield r
    r.gate.set()


@pytest.fixture
def api(runner: GatedRunner) -> Iterator[tuple[str, Any]]:
    app = create_app(
        settings(), runner, options=object(), disks_report=lambda: {"disks": [], "chosen": None}
    )
    with running(app, settings()) as url:
        try:
            yield url, app
        finally:
            runner.gate.set()  # before the server stops: its shutdown waits for the install


def wait_status(
    url: str, final: tuple[str, ...] = ("done", "error"), timeout: float = 20, every: float = 0.02
) -> list[dict[str, Any]]:
    """Poll GET /install/status until a final state; return every snapshot seen."""
    seen = []
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers=AUTH) as client:
        while time.monotonic() < deadline:
            r = client.get("/install/status")
            assert r.status_code == 200
            seen.append(r.json())
            if seen[-1]["status"] in final:
                return seen
            time.sleep(every)
    raise AssertionError(f"install did not end: {seen[-1]}")


# --- authentication ---------------------------------------------------------------------------


def test_health_and_openapi_need_no_token(api: tuple[str, Any]) -> None:
    url, _ = api
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    served = httpx.get(f"{url}/openapi.json").json()
    assert served == OPENAPI
    # the committed document is the served one (regenerate: python -m agent.api)
    assert json.loads((REPO / "docs" / "openapi.json").read_text()) == served


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/install/status"), ("GET", "/disks"), ("POST", "/install/start")]
)
def test_401_without_the_token(
    api: tuple[str, Any], runner: GatedRunner, headers: dict, method: str, path: str
) -> None:
    url, _ = api
    r = httpx.request(method, f"{url}{path}", headers=headers, json=body())
    assert r.status_code == 401
    assert r.json() == {"message": msg.API_UNAUTHORIZED}
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in r.text
    assert not runner.requests


# --- /install/start ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (body(imageType="vmdk"), msg.BAD_FORMAT),
        (body(imageCheckSum="ab" * 16), msg.CHECKSUM_PAIR),
        (body(imageCheckSum="ab" * 16, imageCheckSumType="crc32"), msg.BAD_CHECKSUM_TYPE),
        (body(imageURL="ftp://example.com/x"), msg.BAD_URL_SCHEME),
        ({"templateName": "byoi_64", "userMetadata": []}, msg.MISSING_IMAGE_URL),
        ([1, 2], msg.bad_request("the request must be a JSON object")),
    ],
)
def test_400_with_the_result_message(
    api: tuple[str, Any], runner: GatedRunner, payload: Any, message: str
) -> None:
    url, _ = api
    r = httpx.post(f"{url}/install/start", headers=AUTH, json=payload)
    assert r.status_code == 400
    assert r.json() == {"message": message}
    assert not runner.requests


def test_bad_image_type_exact_message(api: tuple[str, Any]) -> None:
    url, _ = api
    reinstall = {
        "operatingSystem": "byoi_64",
        "customizations": {"imageURL": "https://h/i", "imageType": "iso"},
    }
    r = httpx.post(f"{url}/install/start", headers=AUTH, json=reinstall)
    assert (r.status_code, r.json()["message"]) == (400, "Bad format image, expected: qcow2, raw.")


def test_400_on_a_body_that_is_not_json(api: tuple[str, Any]) -> None:
    url, _ = api
    for raw in (b"{not json", b"\xff\xfe", b"[" * 100_000):
        r = httpx.post(f"{url}/install/start", headers=AUTH, content=raw)
        assert r.status_code == 400, raw[:10]
        assert r.json()["message"].startswith("Bad request: ")


def test_413_on_a_large_body(api: tuple[str, Any], runner: GatedRunner) -> None:
    url, _ = api
    big = json.dumps(body(sshKey="k" * (2 * 1024 * 1024)))
    r = httpx.post(f"{url}/install/start", headers=AUTH, content=big)
    assert r.status_code == 413
    assert r.json() == {"message": msg.api_body_too_large(1024 * 1024)}

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(f"{url}/install/start", headers=AUTH, content=chunks())
    assert r.status_code == 413
    assert not runner.requests


def test_202_then_409_then_done(api: tuple[str, Any], runner: GatedRunner) -> None:
    url, _ = api
    before = httpx.get(f"{url}/install/status", headers=AUTH).json()
    assert before["status"] == "todo"
    assert [s["status"] for s in before["progress"]] == ["todo"] * len(STEP_KEYS)
    assert before["progress"][3]["comment"] == "Downloading image"

    r = httpx.post(f"{url}/install/start", headers=AUTH, json=body())
    assert r.status_code == 202
    assert r.json()["status"] == "doing"
    assert r.headers["location"] == "/install/status"
    assert runner.in_write.wait(10)

    second = httpx.post(f"{url}/install/start", headers=AUTH, json=body())
    assert second.status_code == 409
    assert second.json() == {"message": msg.INSTALL_RUNNING}

    mid = httpx.get(f"{url}/install/status", headers=AUTH).json()
    assert mid["status"] == "doing" and mid["step"] == "write"
    assert (mid["bytesDone"], mid["bytesTotal"]) == (1500, 3000)
    states = {s["step"]: s["status"] for s in mid["progress"]}
    assert states["download"] == "done" and states["write"] == "doing"
    assert states["configdrive"] == "todo"

    runner.gate.set()
    seen = wait_status(url)
    final = seen[-1]
    assert final["status"] == "done"
    assert final["message"] == msg.install_done("/dev/test")
    assert all(s["status"] == "done" for s in final["progress"])
    assert len(runner.requests) == 1 and runner.requests[0].hostname == "node-1"

    # once it has ended, a new install may start (e.g. a retry)
    again = httpx.post(f"{url}/install/start", headers=AUTH, json=body())
    assert again.status_code == 202
    assert wait_status(url)[-1]["status"] == "done"


def test_failed_install_status(runner: GatedRunner) -> None:
    failing = GatedRunner(fail_at="gpt")
    failing.gate.set()
    app = create_app(settings(), failing, options=object())
    with running(app, settings()) as url:
        assert httpx.post(f"{url}/install/start", headers=AUTH, json=body()).status_code == 202
        final = wait_status(url)[-1]
    assert final["status"] == "error"
    assert final["message"] == msg.GPT_MOVE_FAILED
    gpt = next(s for s in final["progress"] if s["step"] == "gpt")
    assert gpt == {**gpt, "status": "error", "error": msg.GPT_MOVE_FAILED}


def test_runner_crash_ends_in_one_error_message() -> None:
    crashing = GatedRunner(raise_at="inspect")
    crashing.gate.set()
    app = create_app(settings(), crashing, options=object())
    with running(app, settings()) as url:
        assert httpx.post(f"{url}/install/start", headers=AUTH, json=body()).status_code == 202
        final = wait_status(url)[-1]
    assert final["status"] == "error"
    assert final["message"] == msg.internal_error("inspect", "RuntimeError")


def test_disks_uses_the_report(api: tuple[str, Any]) -> None:
    url, _ = api
    r = httpx.get(f"{url}/disks", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"disks": [], "chosen": None}


def test_disks_real_discovery() -> None:
    app = create_app(settings(disk="/dev/loop7"), GatedRunner(), options=object())
    with running(app, settings()) as url:
        r = httpx.get(f"{url}/disks", headers=AUTH)
    assert r.status_code == 200
    report = r.json()
    assert isinstance(report["disks"], list) and "chosen" in report
    assert report["explicit"] == "/dev/loop7"
    names = {d["name"] for d in report["disks"]}
    assert all(not d["eligible"] for d in report["disks"] if d["name"].startswith("loop"))
    assert names  # this machine has at least its root disk


def test_unknown_path_and_method_are_json(api: tuple[str, Any]) -> None:
    url, _ = api
    r = httpx.get(f"{url}/nope", headers=AUTH)
    assert r.status_code == 404 and "message" in r.json()
    r = httpx.get(f"{url}/install/start", headers=AUTH)
    assert r.status_code == 405 and "message" in r.json()


# --- limits -----------------------------------------------------------------------------------


def test_slow_client_is_cut_off() -> None:
    """A client trickling its headers (slow loris) is disconnected at the request deadline."""
    app = create_app(settings(), GatedRunner(), options=object())
    with running(app, settings(request_timeout=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            closed_after = None
            while time.monotonic() - started < 6:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    sock.settimeout(0.2)
                    if sock.recv(1024) == b"":
                        closed_after = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed_after = time.monotonic() - started
                    break
        assert closed_after is not None, "the slow client was never disconnected"
        assert 0.8 < closed_after < 3.0
        # the server still answers others
        assert httpx.get(f"{url}/health").status_code == 200


def test_slow_body_is_cut_off() -> None:
    app = create_app(settings(), GatedRunner(), options=object())
    with running(app, settings(request_timeout=1.0, body_timeout=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /install/start HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            started = time.monotonic()
            data = b""
            sock.settimeout(0.2)
            while time.monotonic() - started < 6:
                try:
                    sock.sendall(b" ")
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
            elapsed = time.monotonic() - started
        assert elapsed < 3.0
        assert data == b"" or data.startswith(b"HTTP/1.1 408")


def test_oversized_headers_are_refused(api: tuple[str, Any]) -> None:
    url, _ = api
    for size in (20 * 1024, 64 * 1024, 1024 * 1024):
        r = httpx.get(f"{url}/health", headers={"X-Big": "a" * size})
        assert r.status_code == 431, size
    # a head under the cap followed by a body in the same read is fine
    assert httpx.get(f"{url}/health", headers={"X-Big": "a" * 15000}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_connection_limit_answers_503(runner: GatedRunner) -> None:
    app = create_app(settings(), runner, options=object())
    limited = settings(max_connections=4)
    with running(app, limited) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            time.sleep(0.2)
            r = httpx.get(f"{url}/health")
            assert r.status_code == 503
        finally:
            for s in idle:
                s.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 200


# --- secrets ----------------------------------------------------------------------------------


def test_no_secret_in_responses_or_logs(
    api: tuple[str, Any], runner: GatedRunner, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = api
    caplog.set_level(logging.DEBUG)
    password, basic = "pw-" + secrets.token_hex(8), "Basic " + secrets.token_hex(12)
    payload = body(
        imageURL=f"http://user:{password}@127.0.0.1:9/i.qcow2",
        httpHeaders0Key="Authorization",
        httpHeaders0Value=basic,
    )
    runner.gate.set()
    r = httpx.post(f"{url}/install/start", headers=AUTH, json=payload)
    assert r.status_code == 202
    final = wait_status(url)[-1]
    httpx.get(f"{url}/install/status", headers={"Authorization": "Bearer guess-guess-guess"})
    texts = [r.text, json.dumps(final)] + [rec.getMessage() for rec in caplog.records]
    for text in texts:
        assert TOKEN not in text and password not in text and basic not in text
    assert any("install started for http://user:***@127.0.0.1:9/i.qcow2" in t for t in texts)


def test_log_handlers_scrub_secrets(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logging.StreamHandler(sys.stderr)
    root.handlers = [handler]
    try:
        install_log_filters()
        assert any(isinstance(f, ScrubFilter) for f in handler.filters)
        logging.getLogger("uvicorn.error").error("header echoed: Bearer %s", TOKEN)
    finally:
        root.handlers, root.level = saved
    err = capfd.readouterr().err
    assert "header echoed: Bearer ***" in err and TOKEN not in err


def test_token_file_rules(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(f"{TOKEN}\n")
    f.chmod(0o600)
    assert load_token(f) == TOKEN
    for bad in ("short", "", "two words-two-words-two-words"):
        f.write_text(bad)
        with pytest.raises(ValueError):
            load_token(f)
    with pytest.raises(ValueError):
        create_app(settings(token="short"))


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:443") == ("::1", 443)
    assert parse_listen(":9000") == ("0.0.0.0", 9000)
    for bad in ("8080", "host:", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


# --- TLS --------------------------------------------------------------------------------------


def test_tls(tmp_path: Path, runner: GatedRunner) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    app = create_app(settings(), runner, options=object())
    with running(app, settings(), tls_cert=cert_file, tls_key=key_file) as url:
        assert url.startswith("https://")
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with httpx.Client(verify=ctx) as client:
            assert client.get(f"{url}/install/status", headers=AUTH).json()["status"] == "todo"
            assert client.get(f"{url}/install/status").status_code == 401
        with pytest.raises(httpx.ConnectError):  # an untrusted client refuses the certificate
            httpx.get(f"{url}/health")
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP is not served
            httpx.get(url.replace("https", "http") + "/health")


# --- callbacks through the API -----------------------------------------------------------------


def test_callbacks_follow_the_install_and_shutdown_waits(runner: GatedRunner) -> None:
    from test_callbacks import Orchestrator

    orch = Orchestrator()  # not listening yet: the orchestrator is "down"
    try:
        callback = CallbackSettings(
            url=orch.url,
            token=TOKEN,
            progress_interval=0,
            retry_window=30,
            initial_backoff=0.05,
            max_backoff=0.3,
        )
        app = create_app(settings(callback=callback), runner, options=object())
        started = time.monotonic()
        with running(app, settings()) as url:
            assert httpx.post(f"{url}/install/start", headers=AUTH, json=body()).status_code == 202
            runner.gate.set()
            assert wait_status(url)[-1]["status"] == "done"
            assert not orch.received
            # the server is asked to stop now; the orchestrator only comes back 1 s later
            threading.Timer(1.0, orch.listen).start()
        assert time.monotonic() - started < 20
        # leaving `running` returned only after the lifespan shutdown delivered everything
        assert orch.received and orch.received[-1]["status"] == "done"
        assert orch.received[-1]["message"] == msg.install_done("/dev/test")
        sequences = [b["sequence"] for b in orch.received]
        assert sequences == sorted(sequences)
        assert len(orch.steps()) == 2 + 2 * len(STEP_KEYS)  # begin, each step twice, finish
        assert app.state.callbacks.stats.abandoned == 0
    finally:
        orch.stop()


# --- fuzzing against the OpenAPI document --------------------------------------------------------


def test_openapi_fuzz_finds_no_server_error() -> None:
    """schemathesis (PyPI: schemathesis) sends schema-driven and broken requests: no 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings

    quick = GatedRunner()
    quick.gate.set()
    app = create_app(
        settings(), quick, options=object(), disks_report=lambda: {"disks": [], "chosen": None}
    )
    with running(app, settings()) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        failures: list[str] = []
        codes: set[tuple[str, int]] = set()
        for operation in schema.get_all_operations():
            op = operation.ok()
            strategy = op.as_strategy() | op.as_strategy(
                generation_mode=schemathesis.GenerationMode.NEGATIVE
            )

            @given(case=strategy)
            @hsettings(
                max_examples=60,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                for headers in (AUTH, {}):
                    response = case.call(base_url=url, headers=headers)
                    codes.add((case.path, response.status_code))
                    if response.status_code >= 500:
                        failures.append(f"{case.method} {case.path}: {response.status_code}")

            check()
        assert not failures, failures[:5]
    # the fuzzing reached the handlers, with and without the token
    assert {
        ("/install/start", 400),
        ("/install/start", 401),
        ("/install/status", 200),
        ("/disks", 200),
        ("/disks", 401),
    } <= codes, codes


# --- the real serve process, a full install onto a loop device -----------------------------------

MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt_image(path: Path) -> bytes:
    """A small raw GPT image (sgdisk on a file) whose partition 1 holds a known pattern."""
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(
        ["sgdisk", "-n", "1:2048:+4M", "-t", "1:8300", "-c", "1:data", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pattern = secrets.token_bytes(4 * MiB)
    with open(path, "r+b") as f:
        f.seek(2048 * 512)
        f.write(pattern)
    return pattern


@contextlib.contextmanager
def serve_process(tmp_path: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    log_file = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "-v",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            str(token_file),
            *extra,
        ],
        cwd=REPO,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log_file.close()


def test_serve_refuses_a_bad_token_file(tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_text("short")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "serve",
            "--listen",
            "127.0.0.1:1",
            "--token-file",
            str(bad),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "at least 16 characters" in proc.stderr


@pytest.mark.root
def test_full_install_through_the_api(
    tmp_path: Path, http_dir: tuple[Path, str], make_loop: Any
) -> None:
    """byoi-agent serve (a real process) installs a raw GPT image onto a loop device, reports
    its progress on /install/status and to a callback orchestrator, then stops cleanly."""
    import hashlib

    from test_callbacks import Orchestrator

    www, base_url = http_dir
    pattern = gpt_image(www / "disk.raw")
    digest = hashlib.sha256((www / "disk.raw").read_bytes()).hexdigest()
    disk = make_loop(64 * MiB)
    orch = Orchestrator()
    orch.listen()
    try:
        with serve_process(
            tmp_path,
            "--disk",
            disk,
            "--workdir",
            str(tmp_path / "work"),
            "--callback-url",
            orch.url,
        ) as (url, proc):
            payload = body(
                imageURL=f"{base_url}/disk.raw",
                imageType="raw",
                imageCheckSum=digest,
                imageCheckSumType="sha256",
                sshKey="ssh-ed25519 AAAAkey a@b",
            )
            r = httpx.post(f"{url}/install/start", headers=AUTH, json=payload, timeout=10)
            assert r.status_code == 202, r.text
            seen = wait_status(url, timeout=120, every=0.1)
            final = seen[-1]
            assert final["status"] == "done", final
            assert final["message"] == msg.install_done(disk)
            assert final["disk"] == disk
            # progress moved: the steps were seen one after another, never going back
            done_counts = [sum(s["status"] == "done" for s in snap["progress"]) for snap in seen]
            assert done_counts == sorted(done_counts) and done_counts[-1] == len(STEP_KEYS)
            assert len(set(done_counts)) >= 3, done_counts  # intermediate states were seen
            assert r.json()["status"] == "doing"
            assert orch.wait_for(lambda rec: rec and rec[-1]["status"] == "done", timeout=30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    finally:
        orch.stop()

    with open(disk, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(pattern)) == pattern
    verify = subprocess.run(["sgdisk", "-v", disk], capture_output=True, text=True, timeout=60)
    assert "No problems found" in verify.stdout, verify.stdout
    parts = json.loads(
        subprocess.run(
            ["sfdisk", "--json", disk], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )
    assert len(parts["partitiontable"]["partitions"]) == 2  # the image's + the config drive
    steps = [b for b in orch.received if b["event"] == "step"]
    assert [b["sequence"] for b in orch.received] == sorted(b["sequence"] for b in orch.received)
    assert {"download", "write", "configdrive"} <= {b["step"] for b in steps}
    log_text = (tmp_path / "serve.log").read_text()
    assert '"POST /install/start HTTP/1.1" 202' in log_text  # the access log is on
    assert f"install started for {base_url}/disk.raw" in log_text
    assert TOKEN not in log_text


def test_example_orchestrator_client(tmp_path: Path) -> None:
    """examples/orchestrator_client.py follows an install to its end; exit 0 / 1."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(body()))
    bad.write_text(json.dumps(body(imageType="iso")))

    def client(url: str, payload: Path) -> subprocess.Popen[str]:
        script = str(REPO / "examples" / "orchestrator_client.py")
        return subprocess.Popen(
            [
                sys.executable,
                script,
                "--agent",
                url,
                "--token-file",
                str(token_file),
                "--payload",
                str(payload),
                "--interval",
                "0.05",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    for runner, code, last in (
        (GatedRunner(), 0, msg.install_done("/dev/test")),
        (GatedRunner(fail_at="configdrive"), 1, msg.GPT_MOVE_FAILED),
    ):
        app = create_app(settings(), runner, options=object())
        with running(app, settings()) as url:
            proc = client(url, good)
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:  # the install is held in "write" until the client shows it
                lines.append(line.strip())
                if "Writing image on disk 50%" in line:
                    runner.gate.set()
            assert proc.wait(30) == code, lines
            assert runner.gate.is_set(), lines
            assert lines[-1] == last
            refused = client(url, bad)
            out, _ = refused.communicate(timeout=30)
            assert refused.returncode == 1
            assert out.strip().endswith(msg.BAD_FORMAT)
        runner.gate.set()
    unreachable = client("http://127.0.0.1:9", good)
    unreachable.communicate(timeout=30)
    assert unreachable.returncode == 2

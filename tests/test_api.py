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
import schemathesis
import trustme
import uvicorn
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent import messages as msg
from agent.api import ApiSettings, create_app, openapi_document, parse_listen
from agent.callbacks import CallbackSettings
from agent.httpguard import FD_RESERVE, connection_cap, server_config
from agent.payload import InstallRequest
from agent.redact import ScrubFilter
from agent.serve import install_log_filters, load_token, token_problem
from agent.status import STEP_KEYS, InstallStatus
from tests.conftest import needs_root

REPO = Path(__file__).resolve().parent.parent
TOKEN = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CALLBACK_TOKEN = secrets.token_hex(16)

# --- every answer the tests get is checked against the API's one document (agent/openapi.json) --

SCHEMA = schemathesis.openapi.from_dict(openapi_document())
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
CHECKED: list[str] = []


def conforms(response: httpx.Response) -> None:
    """An httpx response hook: the status code is documented for the operation, the body is
    the documented JSON schema; outside the document's operations (404, 405) a Message."""
    response.read()
    request = response.request
    operation = SCHEMA.find_operation_by_path(request.method, request.url.path)
    if operation is None:
        assert response.headers["content-type"] == "application/json", response.headers
        assert set(response.json()) == {"message"}, response.text
    else:
        operation.Case().validate_response(response, checks=CHECKS)
    CHECKED.append(f"{request.method} {request.url.path} {response.status_code}")


HOOKS = {"response": [conforms]}


class Checked:
    """httpx's one-shot calls, each answer checked by ``conforms``."""

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        verify = kwargs.pop("verify", True)
        timeout = kwargs.pop("timeout", 10.0)
        with httpx.Client(event_hooks=HOOKS, verify=verify, timeout=timeout) as client:
            return client.request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


checked = Checked()


def start(url: str) -> httpx.Response:
    return checked.post(f"{url}/install/start", headers=AUTH, json=body())


def body(**meta: str) -> dict[str, Any]:
    values = {"imageURL": "http://127.0.0.1:9/img.qcow2", "imageType": "qcow2", **meta}
    return {
        "templateName": "byoi_64",
        "details": {"customHostname": "node-1"},
        "userMetadata": [{"key": k, "value": v} for k, v in values.items()],
    }


class GatedRunner:
    """Drives a real InstallStatus through every step; holds in "write" until released."""

    def __init__(self, fail_at: str = "", raise_at: str = "", honour_stop: bool = True) -> None:
        self.gate = threading.Event()
        self.in_write = threading.Event()
        self.stop_asked: list[int] = []  # signals given to request_stop
        self.honour_stop = honour_stop
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
                deadline = time.monotonic() + 20
                while not self.gate.wait(0.02):
                    if self.stop_asked and self.honour_stop:  # the safe point of this runner
                        status.fail(key, msg.interrupted(key))
                        return False
                    assert time.monotonic() < deadline, "test never released the install"
            if key == self.raise_at:
                raise RuntimeError("boom")
            if key == self.fail_at:
                status.fail(key, msg.GPT_MOVE_FAILED)
                return False
            status.done(key)
        status.finish(msg.install_done("/dev/test"))
        return True

    def request_stop(self, signum: int) -> bool:
        """Stands for ``pipeline.request_stop``."""
        self.stop_asked.append(signum)
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
    values: dict[str, Any] = dict(token=TOKEN)
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
        settings(),
        runner,
        options=object(),
        disks_report=lambda: {"disks": [], "chosen": None, "diskGroups": []},
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
    with httpx.Client(base_url=url, headers=AUTH, event_hooks=HOOKS) as client:
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
    assert checked.get(f"{url}/health").json() == {"status": "ok"}
    served = checked.get(f"{url}/openapi.json").json()
    # the one document, package data beside the code, is what is served
    assert served == json.loads((REPO / "agent" / "openapi.json").read_text())
    assert not (REPO / "docs" / "openapi.json").exists()


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
    r = checked.request(method, f"{url}{path}", headers=headers, json=body())
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
    r = checked.post(f"{url}/install/start", headers=AUTH, json=payload)
    assert r.status_code == 400
    assert r.json() == {"message": message}
    assert not runner.requests


def test_bad_image_type_exact_message(api: tuple[str, Any]) -> None:
    url, _ = api
    reinstall = {
        "operatingSystem": "byoi_64",
        "customizations": {"imageURL": "https://h/i", "imageType": "iso"},
    }
    r = checked.post(f"{url}/install/start", headers=AUTH, json=reinstall)
    assert (r.status_code, r.json()["message"]) == (400, "Bad format image, expected: qcow2, raw.")


def test_400_on_a_body_that_is_not_json(api: tuple[str, Any]) -> None:
    url, _ = api
    for raw in (b"{not json", b"\xff\xfe", b"[" * 100_000):
        r = checked.post(f"{url}/install/start", headers=AUTH, content=raw)
        assert r.status_code == 400, raw[:10]
        assert r.json()["message"].startswith("Bad request: ")


def test_413_on_a_large_body(api: tuple[str, Any], runner: GatedRunner) -> None:
    url, _ = api
    big = json.dumps(body(sshKey="k" * (2 * 1024 * 1024)))
    r = checked.post(f"{url}/install/start", headers=AUTH, content=big)
    assert r.status_code == 413
    assert r.json() == {"message": msg.api_body_too_large(1024 * 1024)}

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    # (a streamed request cannot be replayed to schemathesis: this answer is checked by hand)
    r = httpx.post(f"{url}/install/start", headers=AUTH, content=chunks())
    assert r.status_code == 413
    assert r.json() == {"message": msg.api_body_too_large(1024 * 1024)}
    assert not runner.requests


def test_202_then_409_then_done(api: tuple[str, Any], runner: GatedRunner) -> None:
    url, _ = api
    before = checked.get(f"{url}/install/status", headers=AUTH).json()
    assert before["status"] == "todo"
    assert [s["status"] for s in before["progress"]] == ["todo"] * len(STEP_KEYS)
    assert before["progress"][3]["comment"] == "Downloading image"

    r = checked.post(f"{url}/install/start", headers=AUTH, json=body())
    assert r.status_code == 202
    assert r.json()["status"] == "doing"
    assert r.headers["location"] == "/install/status"
    assert runner.in_write.wait(10)

    second = checked.post(f"{url}/install/start", headers=AUTH, json=body())
    assert second.status_code == 409
    assert second.json() == {"message": msg.INSTALL_RUNNING}

    mid = checked.get(f"{url}/install/status", headers=AUTH).json()
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
    again = checked.post(f"{url}/install/start", headers=AUTH, json=body())
    assert again.status_code == 202
    assert wait_status(url)[-1]["status"] == "done"


def test_failed_install_status(runner: GatedRunner) -> None:
    failing = GatedRunner(fail_at="gpt")
    failing.gate.set()
    app = create_app(settings(), failing, options=object())
    with running(app, settings()) as url:
        assert start(url).status_code == 202
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
        assert start(url).status_code == 202
        final = wait_status(url)[-1]
    assert final["status"] == "error"
    assert final["message"] == msg.internal_error("inspect", "RuntimeError")


def test_disks_uses_the_report(api: tuple[str, Any]) -> None:
    url, _ = api
    r = checked.get(f"{url}/disks", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"disks": [], "chosen": None, "diskGroups": []}


def test_disks_real_discovery() -> None:
    app = create_app(settings(disk="/dev/loop7"), GatedRunner(), options=object())
    with running(app, settings()) as url:
        r = checked.get(f"{url}/disks", headers=AUTH)
    assert r.status_code == 200
    report = r.json()
    assert isinstance(report["disks"], list) and "chosen" in report
    assert report["explicit"] == "/dev/loop7"
    names = {d["name"] for d in report["disks"]}
    assert all(not d["eligible"] for d in report["disks"] if d["name"].startswith("loop"))
    assert names  # this machine has at least its root disk


def test_unknown_path_and_method_are_json(api: tuple[str, Any]) -> None:
    url, _ = api
    r = checked.get(f"{url}/nope", headers=AUTH)
    assert r.status_code == 404 and "message" in r.json()
    r = checked.get(f"{url}/install/start", headers=AUTH)
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
        assert checked.get(f"{url}/health").status_code == 200


def raw_answer(port: int, request: bytes, trickle: bytes = b"", within: float = 6.0) -> bytes:
    """Send ``request``, then ``trickle`` every 0.2 s; everything received until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.settimeout(0.2)
        data = b""
        started = time.monotonic()
        while time.monotonic() - started < within:
            try:
                if trickle:
                    sock.sendall(trickle)
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"the connection stayed open {within} s: {data!r}")


@pytest.mark.parametrize("trickle", [b"", b" "], ids=["stalled", "trickling"])
def test_stalled_body_answers_408(trickle: bytes) -> None:
    """A body that does not arrive within the request timeout (1 s here, 15 s by default) gets
    the documented 408 with its message, then the connection is closed; the handler reading it
    sees a disconnect and starts nothing."""
    quick = GatedRunner()
    app = create_app(settings(), quick, options=object())
    with running(app, settings(request_timeout=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        started = time.monotonic()
        answer = raw_answer(
            port,
            b"POST /install/start HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
            trickle,
        )
        elapsed = time.monotonic() - started
        print(f"408 after {elapsed:.2f} s (request timeout 1 s)")
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"content-type: application/json" in head.lower()
        assert json.loads(payload) == {"message": msg.API_BODY_TIMEOUT}
        assert "408" in openapi_document()["paths"]["/install/start"]["post"]["responses"]
        assert not quick.requests
        assert checked.get(f"{url}/health").status_code == 200  # the server is fine


def test_a_complete_body_beats_the_deadline() -> None:
    """The deadline is per request: a keep-alive connection sending request after request,
    each in time, is never cut off (the timer restarts when the agent waits for the next)."""
    app = create_app(settings(), GatedRunner(), options=object())
    with (
        running(app, settings(request_timeout=1.0)) as url,
        httpx.Client(base_url=url, headers=AUTH, event_hooks=HOOKS) as client,
    ):
        for _ in range(4):
            assert client.get("/install/status").status_code == 200
            time.sleep(0.4)


def test_oversized_headers_are_refused(api: tuple[str, Any]) -> None:
    url, _ = api
    for size in (20 * 1024, 64 * 1024, 1024 * 1024):
        r = checked.get(f"{url}/health", headers={"X-Big": "a" * size})
        assert r.status_code == 431, size
    # a head under the cap followed by a body in the same read is fine
    assert checked.get(f"{url}/health", headers={"X-Big": "a" * 15000}).status_code == 200
    assert checked.get(f"{url}/health").status_code == 200


def test_idle_connections_make_room_for_a_request() -> None:
    """At the connection cap, a new connection closes the one that has waited longest for a
    request head: idle sockets never shut a client out (uvicorn's limit counted them: 503)."""
    app = create_app(settings(), GatedRunner(), options=object())
    with running(app, settings(max_connections=8)) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            time.sleep(0.2)
            for _ in range(3):  # the first makes room; the others fit in the room made
                r = checked.get(f"{url}/install/status", headers=AUTH)
                assert r.status_code == 200
            closed = []
            for s in idle:
                s.settimeout(0.3)
                try:
                    closed.append(s.recv(1) == b"")
                except TimeoutError:
                    closed.append(False)
            assert closed == [True] + [False] * 7  # the longest idle one went, only it
        finally:
            for s in idle:
                s.close()


def test_connection_cap_from_the_descriptor_limit() -> None:
    assert connection_cap(1024, 4096, 4096) == (4096, 1024)
    assert connection_cap(1024, 1024, 65536) == (1024 + FD_RESERVE, 1024)
    assert connection_cap(1024, 1024, -1) == (1024 + FD_RESERVE, 1024)  # unlimited hard limit
    assert connection_cap(1024, 512, 1024) == (1024, 1024 - FD_RESERVE)


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
    r = checked.post(f"{url}/install/start", headers=AUTH, json=payload)
    assert r.status_code == 202
    final = wait_status(url)[-1]
    checked.get(f"{url}/install/status", headers={"Authorization": "Bearer guess-guess-guess"})
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


BAD_TOKENS = {
    "empty": (b"", "the file is empty"),
    "whitespace": (b"  \n\t \n", "the file is empty"),
    "non-ascii": ("jéton-secret-0123456789".encode(), "non-ASCII"),
    "not-utf8": (b"\xff\xfe" + b"a" * 20, "non-ASCII"),
    "two-words": (b"two words-two-words-two-words", "spaces or control"),
    "control": (b"token\x01" + b"a" * 20, "spaces or control"),
    "short": (b"short", "only 5 characters"),
}


@pytest.mark.parametrize("name", BAD_TOKENS)
def test_token_file_refused(tmp_path: Path, name: str) -> None:
    data, why = BAD_TOKENS[name]
    f = tmp_path / "token"
    f.write_bytes(data)
    assert why in (token_problem(data) or "")
    with pytest.raises(ValueError, match="at least 16 characters, visible ASCII"):
        load_token(f)


def test_token_file_accepted(tmp_path: Path) -> None:
    f = tmp_path / "token"
    for text in (f"{TOKEN}\n", f"  {TOKEN}\r\n", "A/b+c=d~e_f.g-h!#$%&'*"):
        f.write_text(text)
        f.chmod(0o600)
        assert load_token(f) == text.strip()
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
        with httpx.Client(verify=ctx, event_hooks=HOOKS) as client:
            assert client.get(f"{url}/install/status", headers=AUTH).json()["status"] == "todo"
            assert client.get(f"{url}/install/status").status_code == 401
        with pytest.raises(httpx.ConnectError):  # an untrusted client refuses the certificate
            checked.get(f"{url}/health")
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP is not served
            checked.get(url.replace("https", "http") + "/health")


# --- callbacks through the API -----------------------------------------------------------------


def test_callbacks_follow_the_install_and_shutdown_waits(runner: GatedRunner) -> None:
    from test_callbacks import Orchestrator

    orch = Orchestrator()  # not listening yet: the orchestrator is "down"
    try:
        callback = CallbackSettings(
            url=orch.url,
            token=CALLBACK_TOKEN,
            progress_interval=0,
            retry_window=30,
            initial_backoff=0.05,
            max_backoff=0.3,
        )
        app = create_app(settings(callback=callback), runner, options=object())
        started = time.monotonic()
        with running(app, settings()) as url:
            assert start(url).status_code == 202
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
        assert set(orch.auth) == {f"Bearer {CALLBACK_TOKEN}"}  # its own credential
    finally:
        orch.stop()


def test_stop_ends_the_install_then_sends_its_final_callback() -> None:
    """Stopping the server (what SIGTERM does) asks the install to stop, waits for it to end
    at its safe point and for its final callback, then returns: promptly, not after the
    install would have finished."""
    from test_callbacks import Orchestrator

    orch = Orchestrator()
    orch.listen()
    runner = GatedRunner()
    callback = CallbackSettings(url=orch.url, initial_backoff=0.05, max_backoff=0.2)
    app = create_app(
        settings(callback=callback), runner, options=object(), request_stop=runner.request_stop
    )
    try:
        with running(app, settings()) as url:
            assert start(url).status_code == 202
            assert runner.in_write.wait(10)
            started = time.monotonic()
        stopped_in = time.monotonic() - started
        print(f"stopped {stopped_in:.2f} s after the stop was asked, mid-install")
        assert runner.stop_asked == [signal.SIGTERM] and not runner.gate.is_set()
        final = orch.received[-1]
        assert (final["status"], final["message"]) == ("error", msg.interrupted("write"))
        assert app.state.installs.status.snapshot()["message"] == msg.interrupted("write")
    finally:
        orch.stop()
        runner.gate.set()


def test_stop_waits_for_the_install_only_so_long() -> None:
    """An install that does not reach a safe point in time is given up on at the bound
    (``install_stop_wait``), and a dead orchestrator holds the stop only ``callback_stop_wait``."""
    from test_callbacks import Orchestrator

    orch = Orchestrator()  # never listens: every callback fails
    stubborn = GatedRunner(honour_stop=False)
    callback = CallbackSettings(url=orch.url, initial_backoff=0.05, max_backoff=0.2)
    bounded = settings(callback=callback, install_stop_wait=1.0, callback_stop_wait=1.0)
    app = create_app(bounded, stubborn, options=object(), request_stop=stubborn.request_stop)
    try:
        with running(app, bounded) as url:
            assert start(url).status_code == 202
            assert stubborn.in_write.wait(10)
            started = time.monotonic()
        stopped_in = time.monotonic() - started
        print(f"gave up after {stopped_in:.2f} s (bounds: 1 s install + 1 s callbacks)")
        assert stubborn.stop_asked == [signal.SIGTERM]
        assert app.state.installs.running()  # it was left behind, as the bound says
        assert stopped_in < 30  # bounded (the figure above is the measure)
    finally:
        stubborn.gate.set()
        orch.stop()


# --- fuzzing against the OpenAPI document --------------------------------------------------------


def test_openapi_fuzz_every_answer_conforms() -> None:
    """schemathesis sends schema-driven and broken requests, with and without the token: no
    5xx, and every answer is one the document declares (status code, content type, body
    schema, headers)."""
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings
    from schemathesis.checks import not_a_server_error

    quick = GatedRunner()
    quick.gate.set()
    app = create_app(
        settings(),
        quick,
        options=object(),
        disks_report=lambda: {"disks": [], "chosen": None, "diskGroups": []},
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
                    try:
                        case.validate_response(response, checks=[not_a_server_error, *CHECKS])
                    except AssertionError as exc:  # schemathesis' failures are AssertionErrors
                        failures.append(f"{case.method} {case.path}: {exc}"[:500])

            check()
        assert not failures, failures[:3]
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
                if checked.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log_file.close()
        for line in Path("/proc/mounts").read_text().splitlines():  # a killed serve's tmpfs
            if f" {tmp_path}/" in line:
                subprocess.run(["umount", "-l", line.split()[1]], check=False)


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--listen", "127.0.0.1:1", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["non-ascii", "empty", "whitespace", "short", "not-utf8"])
def test_serve_refuses_a_bad_token_file(tmp_path: Path, name: str) -> None:
    """A token no request could ever match is refused at start: exit 2, one clear line."""
    bad = tmp_path / "token"
    bad.write_bytes(BAD_TOKENS[name][0])
    proc = run_serve("--token-file", str(bad))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{bad}: " in last and BAD_TOKENS[name][1] in last, proc.stderr
    assert "at least 16 characters" in last and "Traceback" not in proc.stderr


def test_serve_refuses_the_api_token_for_callbacks(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    same = tmp_path / "callback-token"
    same.write_text(TOKEN + "\n")
    url = ["--callback-url", "http://127.0.0.1:9/cb"]
    proc = run_serve("--token-file", str(token), *url, "--callback-token-file", str(same))
    assert proc.returncode == 2 and msg.CALLBACK_CREDENTIAL_REUSED in proc.stderr, proc.stderr
    proc = run_serve("--token-file", str(token), "--callback-token-file", str(same))
    assert proc.returncode == 2 and msg.CALLBACK_CREDENTIAL_WITHOUT_URL in proc.stderr, proc.stderr
    same.write_text("é" * 20)
    proc = run_serve("--token-file", str(token), *url, "--callback-token-file", str(same))
    assert proc.returncode == 2 and f"{same}: " in proc.stderr, proc.stderr


@pytest.mark.parametrize("with_token", [True, False], ids=["callback-token", "no-token"])
def test_callbacks_never_carry_the_api_token(tmp_path: Path, with_token: bool) -> None:
    """A real `serve --callback-url`: the callbacks carry `--callback-token-file`'s token, or
    no Authorization at all without it; never the API token (whoever receives callbacks must
    not be able to start installs)."""
    from test_callbacks import Orchestrator

    orch = Orchestrator()
    orch.listen()
    extra = ["--callback-url", orch.url, "--disk", "/dev/nonexistent"]
    if with_token:
        (tmp_path / "cb-token").write_text(CALLBACK_TOKEN + "\n")
        extra += ["--callback-token-file", str(tmp_path / "cb-token")]
    try:
        with serve_process(tmp_path, *extra, "--workdir", str(tmp_path / "work")) as (url, _):
            r = checked.post(f"{url}/install/start", headers=AUTH, json=body())
            assert r.status_code == 202, r.text
            assert wait_status(url)[-1]["status"] == "error"  # no such disk: ends at once
            assert orch.wait_for(lambda rec: rec and rec[-1]["status"] == "error")
    finally:
        orch.stop()
    assert orch.auth and all(TOKEN not in a for a in orch.auth)
    assert set(orch.auth) == ({f"Bearer {CALLBACK_TOKEN}"} if with_token else {""})


def raise_nofile(need: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def test_500_idle_connections_do_not_shut_clients_out(tmp_path: Path) -> None:
    """A real `serve` while 500 idle sockets are held open (as a flood would reopen them):
    /health and the authenticated /install/status are still answered, and fast."""
    raise_nofile(2048)
    with serve_process(tmp_path, "--disk", "/dev/nonexistent") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(500)]
        try:
            time.sleep(0.5)  # every one accepted and waiting for its request head
            latencies = []
            for path, headers in [("/health", {}), ("/install/status", AUTH)] * 5:
                started = time.monotonic()
                r = checked.get(f"{url}{path}", headers=headers, timeout=5)
                latencies.append(time.monotonic() - started)
                assert r.status_code == 200, r.text
            print(
                f"with 500 idle connections: request latency max {max(latencies) * 1000:.1f} ms, "
                f"median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms"
            )
            still_open = 0
            for s in idle:
                s.setblocking(False)
                try:
                    still_open += s.recv(1) != b""
                except BlockingIOError:
                    still_open += 1
            assert still_open == 500  # under the cap (1024): nobody had to be closed
        finally:
            for s in idle:
                s.close()


@pytest.mark.root
@needs_root
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
            r = checked.post(f"{url}/install/start", headers=AUTH, json=payload, timeout=10)
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


def _slow(server: Any, sock: socket.socket, req: Any, n: int) -> None:
    from badserver import send_head

    size = 32 * MiB
    send_head(sock, "200 OK", {"Content-Length": size, "ETag": '"s"'})
    for _ in range(size // (64 * 1024)):  # 640 KiB/s: a download that takes a while
        sock.sendall(b"\0" * (64 * 1024))
        server.sleep(0.1)


def _stalled(server: Any, sock: socket.socket, req: Any, n: int) -> None:
    from badserver import send_head

    send_head(sock, "200 OK", {"Content-Length": 32 * MiB, "ETag": '"s"'})
    sock.sendall(b"\0" * MiB)
    server.sleep(120)  # then not a byte (the stall limit is 60 s)


def _unavailable(server: Any, sock: socket.socket, req: Any, n: int) -> None:
    from badserver import send_head

    send_head(sock, "503 Service Unavailable", {"Retry-After": 120, "Content-Length": 0})


@pytest.mark.root
@needs_root
@pytest.mark.parametrize(
    "behaviour", [_slow, _stalled, _unavailable], ids=["slow", "stalled", "retry-wait"]
)
def test_sigterm_mid_download_ends_promptly(tmp_path: Path, make_loop: Any, behaviour) -> None:
    """SIGTERM to a real `serve` while its install downloads: slowly (50 s to go), stalled
    (no byte for longer than the stall limit) or waiting to retry a 503 (Retry-After: 120).
    The install ends at once with the interrupted message, the final callback carries it, and
    the process exits 0 without waiting for the download."""
    from badserver import BadServer
    from test_callbacks import Orchestrator

    images = BadServer(b"").start()
    images.routes["/img"] = behaviour
    orch = Orchestrator()
    orch.listen()
    disk = make_loop(64 * MiB)
    extra = ["--disk", disk, "--workdir", str(tmp_path / "work"), "--callback-url", orch.url]
    try:
        with serve_process(tmp_path, *extra) as (url, proc):
            payload = body(imageURL=images.url("/img"), imageType="raw")
            assert (
                checked.post(f"{url}/install/start", headers=AUTH, json=payload).status_code == 202
            )
            wait_status(url, final=("doing",))
            deadline = time.monotonic() + 30
            while not images.count("/img"):  # the image server was asked
                assert time.monotonic() < deadline, "the download never started"
                time.sleep(0.05)
            time.sleep(1.5)  # into the slow transfer, the stall or the wait
            assert checked.get(f"{url}/install/status", headers=AUTH).json()["step"] == "download"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()
            stopped_in = time.monotonic() - started
    finally:
        images.stop()
        orch.stop()
    print(f"serve exited {stopped_in:.2f} s after SIGTERM, mid-download ({behaviour.__name__})")
    assert stopped_in < 10, stopped_in  # the stall limit (60 s) or the Retry-After (120 s) not
    final = orch.received[-1]
    assert (final["status"], final["message"]) == ("error", msg.interrupted("download"))
    assert str(tmp_path / "work") not in Path("/proc/mounts").read_text()


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

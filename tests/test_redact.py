"""Secrets in URLs and headers: redacted wherever a URL is shown, never sent to another origin.

The pure rules are a table; each leak the hardening review found is then reproduced through the
real CLI (``python -m agent install``) against a real server on 127.0.0.1 and a loop disk.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent
from agent import messages as msg
from agent.redact import redact_url, scrub, url_secrets
from tests.badserver import BadServer, send_head, serve

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://h.test/img.qcow2", "https://h.test/img.qcow2"),
        ("https://user:pw1234@h.test/i", "https://user:***@h.test/i"),
        ("https://user:@h.test/i", "https://user:***@h.test/i"),
        ("https://ghp_tok3n@h.test/i", "https://***@h.test/i"),  # a token as the user name
        ("https://h.test/i?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026"
         "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
         "&X-Amz-Security-Token=FQoG&X-Amz-Signature=abcdef0123",
         "https://h.test/i?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
         "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
         "&X-Amz-Security-Token=***&X-Amz-Signature=***"),
        ("https://h.test/i?AWSAccessKeyId=AKIA1&Expires=17&Signature=c2ln%3D",
         "https://h.test/i?AWSAccessKeyId=***&Expires=17&Signature=***"),
        ("https://a.blob.test/c/i?sv=2022&se=2026&sp=r&sig=s1g%2Bx", "https://a.blob.test/c/i?sv=2022&se=2026&sp=r&sig=***"),
        ("https://h.test/i?token=t0k&key=k3y&access_token=at&x=1&page=2",
         "https://h.test/i?token=***&key=***&access_token=***&x=1&page=2"),
        ("https://h.test/i?X-Goog-Signature=gs&My-Api-Key=zz&SECRET=s",
         "https://h.test/i?X-Goog-Signature=***&My-Api-Key=***&SECRET=***"),
        ("https://h.test/i?flag&token=", "https://h.test/i?flag&token="),  # nothing to hide
        ("https://u:p4ss@h.test/i?sig=abc#frag", "https://u:***@h.test/i?sig=***#frag"),
    ],
)  # fmt: skip
def test_redact_url_table(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_secrets_cover_encoded_and_decoded() -> None:
    found = url_secrets("https://tok%2Fen@h.test/i?Signature=c2ln%3D&x=1")
    assert {"tok%2Fen", "tok/en", "c2ln%3D", "c2ln="} <= set(found)
    assert "1" not in found


# --- through the real CLI ------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[BadServer]:
    srv = BadServer(b"\0" * 4096).start()
    try:
        yield srv
    finally:
        srv.stop()


def _install(tmp_path: Path, disk: str, url: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    meta = {"imageURL": url, "imageType": "raw"}
    for i, (k, v) in enumerate((headers or {}).items()):
        meta[f"httpHeaders{i}Key"], meta[f"httpHeaders{i}Value"] = k, v
    body = {
        "templateName": "byoi_64",
        "details": {"customHostname": "node-1"},
        "userMetadata": [{"key": k, "value": v} for k, v in meta.items()],
    }
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps(body))
    cmd = [sys.executable, "-m", "agent", "-vv", "install", "--payload", str(payload)]
    cmd += ["--disk", disk, "--workdir", str(tmp_path / "work"), "--json"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent
    )
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.root
def test_presigned_url_redacted_in_message_json_and_logs(
    tmp_path: Path, server: BadServer, make_loop
) -> None:
    server.routes["/img"] = lambda s, sock, req, n: send_head(
        sock, "403 Forbidden", {"Content-Length": 0}
    )
    query = (
        "X-Amz-Credential=AKIAEXAMPLE1&X-Amz-Security-Token=FQoGsecret&X-Amz-Signature=5ig9a7ure"
    )
    url = server.url(f"/img?X-Amz-Expires=900&{query}")
    proc, result = _install(tmp_path, make_loop(64 * MiB), url)
    shown = server.url("/img?X-Amz-Expires=900&X-Amz-Credential=***&X-Amz-Security-Token=***"
                       "&X-Amz-Signature=***")  # fmt: skip
    assert proc.returncode == 1
    assert result["message"] == msg.download_failed(shown)
    assert "DEBUG" in proc.stderr or "INFO" in proc.stderr  # -vv: the logs are there
    assert f"byoi-agent {agent.__version__} on Python" in proc.stderr  # what ran, first
    for secret in ("AKIAEXAMPLE1", "FQoGsecret", "5ig9a7ure"):
        assert secret not in proc.stdout and secret not in proc.stderr
    assert server.requests[0].path.endswith(query)  # the real URL was used


@pytest.mark.root
def test_token_as_user_name_redacted_and_sent(tmp_path: Path, server: BadServer, make_loop) -> None:
    server.routes["/img"] = lambda s, sock, req, n: send_head(
        sock, "404 Not Found", {"Content-Length": 0}
    )
    proc, result = _install(
        tmp_path, make_loop(64 * MiB), server.url("/img", userinfo="glpat-t0ken")
    )
    assert result["message"] == msg.download_failed(server.url("/img", userinfo="***"))
    assert "glpat-t0ken" not in proc.stdout + proc.stderr
    auth = server.requests[0].header("authorization") or ""
    assert base64.b64decode(auth.split()[1]) == b"glpat-t0ken:"  # sent as Basic auth, as curl does


@pytest.mark.root
def test_custom_secret_header_not_sent_to_another_origin(
    tmp_path: Path, server: BadServer, make_loop
) -> None:
    # 127.0.0.1 -> localhost: same machine, another origin for the client.
    server.routes["/start"] = lambda s, sock, req, n: send_head(
        sock, "302 Found", {"Location": s.url("/img", host="localhost"), "Content-Length": 0}
    )
    server.routes["/img"] = lambda s, sock, req, n: serve(s, sock, req)
    headers = {"X-Api-Key": "k-123456789", "X-Tenant": "blue", "Authorization": "Bearer abcdefgh"}
    proc, _result = _install(tmp_path, make_loop(64 * MiB), server.url("/start"), headers)
    first, redirected = server.requests[0], server.requests[1]
    assert first.header("x-api-key") == "k-123456789" and first.header("x-tenant") == "blue"
    assert redirected.path == "/img"
    for name in headers:
        assert redirected.header(name) is None, name
    assert "k-123456789" not in proc.stderr + proc.stdout


def test_scrub_removes_registered_url_secrets() -> None:
    from agent.download import _split_credentials

    _split_credentials("https://h.test/i?sig=zz-s1gnature-zz")
    assert "zz-s1gnature-zz" not in scrub("GET https://h.test/i?sig=zz-s1gnature-zz failed")

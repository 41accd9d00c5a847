"""Keeping secrets out of logs, status and messages.

Three kinds of secret reach the agent: credentials inside URLs (``https://user:pw@host/...``,
or a token alone as the user name), pre-signed URLs whose query carries the signature or token
(``X-Amz-Signature``, ``sig``, ``token``, ...), and HTTP header values (``Authorization``,
``X-Api-Key``, ...). URLs are redacted structurally wherever they are shown; the secret values
are also registered here so that a log filter can scrub them from any text that might echo them
back (a tool's stderr, an exception string, httpx's own log of the URL).
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

MASK = "***"
_SENSITIVE_HEADERS = {"authorization", "proxy-authorization", "cookie", "x-auth-token"}
# Query parameters of pre-signed URLs (S3 v2/v4, GCS, Azure SAS, CloudFront, OAuth, API keys).
_SECRET_PARAMS = {
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid",
    "signature", "sig", "token", "key", "access_token", "id_token", "refresh_token",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "policy", "key-pair-id",
    "client_secret", "password", "passwd", "secret", "apikey", "api_key", "auth", "code",
}  # fmt: skip
_SECRET_PARTS = (
    "token",
    "signature",
    "secret",
    "passw",
    "credential",
    "apikey",
    "api_key",
    "api-key",
)
_secrets: set[str] = set()
_lock = threading.Lock()


def is_secret_param(name: str) -> bool:
    """A query parameter whose value is a credential (by name; case does not matter)."""
    low = name.lower()
    return low in _SECRET_PARAMS or any(part in low for part in _SECRET_PARTS)


def redact_url(url: str) -> str:
    """The URL as it may be shown: a password becomes ``***`` (the user name is kept, as
    OVHcloud shows it), a user name alone (a token) becomes ``***``, and so does the value of
    every secret query parameter. Everything else is left as written."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _redact_param(pair: str) -> str:
    name, eq, value = pair.partition("=")
    if eq and value and is_secret_param(unquote_plus(name)):
        return f"{name}={MASK}"
    return pair


def url_secrets(url: str) -> list[str]:
    """The secret values a URL carries (password, lone user name, secret query values), both
    as written and decoded, for ``register_secret``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password is not None:
        found += [parts.password, unquote(parts.password)]
    elif parts.username:
        found += [parts.username, unquote(parts.username)]
    for pair in parts.query.split("&") if parts.query else ():
        name, eq, value = pair.partition("=")
        if eq and value and is_secret_param(unquote_plus(name)):
            found += [value, unquote_plus(value)]
    return found


def is_sensitive_header(name: str) -> bool:
    return name.lower() in _SENSITIVE_HEADERS


def register_secret(value: str | None) -> None:
    """Remember a secret so that ``scrub`` removes it from any text."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)
            # "Basic abc" is often echoed back as just "abc".
            scheme, _, token = value.partition(" ")
            if token and len(token) >= 4 and scheme.isalpha():
                _secrets.add(token)


def scrub(text: str) -> str:
    """Remove every registered secret from ``text``."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs registered secrets from every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True

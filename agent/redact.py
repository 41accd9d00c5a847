"""Keeping secrets out of logs, status and messages.

Two kinds of secret reach the agent: passwords inside URLs (``https://user:pw@host/...``) and
HTTP header values (``Authorization: Basic ...``). URLs are redacted structurally wherever they
are shown; header values and URL passwords are also registered here so that a log filter can
scrub them from any text that might echo them back (a tool's stderr, an exception string).
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_SENSITIVE_HEADERS = {"authorization", "proxy-authorization", "cookie", "x-auth-token"}
_secrets: set[str] = set()
_lock = threading.Lock()


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (user name kept, as OVHcloud shows it)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    if parts.password is None:
        return url
    netloc = parts.netloc
    userinfo, _, hostport = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostport}"))


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

"""Reference locators: the one parser of ``s3://bucket/key``, ``https://...`` and local paths."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SCHEME_SEPARATOR = "://"


class LocatorKind(StrEnum):
    S3 = "s3"
    HTTPS = "https"
    LOCAL = "local"


@dataclass(frozen=True)
class Locator:
    """Where a reference image lives: an S3 object, an HTTPS URL or a local file."""

    kind: LocatorKind
    text: str  # as written (a ``file://`` prefix removed)
    bucket: str = ""
    key: str = ""

    @property
    def path(self) -> Path:
        return Path(self.text)

    @property
    def is_local(self) -> bool:
        return self.kind == LocatorKind.LOCAL


def parse_locator(text: str) -> Locator:
    """Parse a reference; raise ``ValueError`` naming the problem for anything else."""
    if any(not char.isprintable() for char in text):
        raise ValueError(f"reference {redact(text)!r} holds a control character")
    scheme, separator, rest = text.partition(SCHEME_SEPARATOR)
    if not separator:
        if not text.strip():
            raise ValueError("a reference is empty")
        return Locator(LocatorKind.LOCAL, text)
    if scheme == "file":
        return parse_locator(rest)
    if scheme == "s3":
        bucket, key = split_s3_url(text)
        if not bucket or not key:
            raise ValueError(f"reference {redact(text)!r} must be s3://bucket/key")
        return Locator(LocatorKind.S3, text, bucket, key)
    if scheme == "https":
        try:
            host = urlsplit(text).hostname
        except ValueError:
            host = None
        if not host:
            raise ValueError(f"reference {redact(text)!r} is not a valid https:// URL")
        return Locator(LocatorKind.HTTPS, text)
    raise ValueError(
        f"reference {redact(text)!r} has scheme {scheme!r}: only s3://, https:// and local paths are supported"
    )


def redact(url: str) -> str:
    """A reference as it may be recorded or shown: no ``user:password@``, and for web URLs no query
    string or fragment (a pre-signed URL carries its signature there; in an ``s3://`` key a ``?``
    is part of the name)."""
    if not has_scheme(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # unbalanced brackets: nothing of it can be shown safely
        return f"{url.partition(SCHEME_SEPARATOR)[0]}://(unparsable)"
    netloc = parts.netloc.rpartition("@")[2]
    if parts.scheme not in ("http", "https"):
        return url.replace(parts.netloc, netloc, 1)
    hidden = "?(redacted)" if parts.query or parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + hidden


def has_scheme(text: str) -> bool:
    """Whether ``text`` names a scheme (``s3://``, ``https://``, ...) rather than a local path."""
    return SCHEME_SEPARATOR in text


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; either may be empty."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key

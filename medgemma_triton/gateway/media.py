"""`image_url` values -> encoded image bytes: base64 data URIs, and local files only where allowed.

The gateway never fetches remote URLs: a server that downloads what its callers name can be made to
reach hosts they cannot (SSRF), and would wait on them. Local paths are opt-in (`--allowed-local-media
DIR`) and confined to DIR after resolving symbolic links and `..`, so a request cannot read other files.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import urllib.parse
from pathlib import Path

from medgemma_triton.gateway.errors import APIError, invalid

# data:image/png;base64,.... (the media type's parameters, e.g. ";charset=...", may precede ;base64)
_DATA_URI = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*?);base64,", re.IGNORECASE)
_REMOTE = ("http://", "https://", "ftp://", "ftps://", "s3://", "gs://")
_BASE64_CHARS = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


def image_bytes(url: str, where: str, allowed_dir: Path | None, max_bytes: int) -> bytes:
    """The encoded image `url` names (`where` locates it in the request, for error messages)."""
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url.url must be a non-empty string", param="messages")
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        return _from_data_uri(url, where)
    if lowered.startswith(_REMOTE):
        scheme = url.split(":", 1)[0]
        raise invalid(
            f"{where}.image_url.url is a remote {scheme} URL; the gateway does not fetch URLs: send the image "
            "inline as a data URI (data:image/png;base64,...)",
            param="messages", code="remote_image_url",
        )
    if allowed_dir is None:
        raise invalid(
            f"{where}.image_url.url is neither a data URI nor a remote URL; local files are off "
            "(the gateway's --allowed-local-media DIR allows paths inside DIR): send the image as a data URI "
            "(data:image/png;base64,...)",
            param="messages", code="local_media_not_allowed",
        )
    return _from_local_file(url, where, allowed_dir, max_bytes)


def _from_data_uri(url: str, where: str) -> bytes:
    match = _DATA_URI.match(url)
    if match is None:
        raise invalid(
            f"{where}.image_url.url is a data URI without base64 data; expected data:image/<type>;base64,<data>",
            param="messages", code="invalid_image_url",
        )
    media_type = match.group("type").strip().lower()
    if not media_type.startswith("image/"):
        raise invalid(
            f"{where}.image_url.url is a data URI of type {media_type or '(none)'!r}; expected an image/* type",
            param="messages", code="invalid_image_url",
        )
    payload = url[match.end():].encode("ascii", errors="replace")
    payload = payload.replace(b"\n", b"").replace(b"\r", b"")
    if not _BASE64_CHARS.match(payload):
        raise invalid(f"{where}.image_url.url has data that is not base64", param="messages", code="invalid_base64")
    try:
        data = base64.b64decode(payload + b"=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}.image_url.url has data that is not base64", param="messages",
                      code="invalid_base64") from None
    if not data:
        raise invalid(f"{where}.image_url.url has no image data", param="messages", code="invalid_image_url")
    return data


def _local_path(url: str, where: str) -> str:
    if url.lower().startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise invalid(f"{where}.image_url.url names a file on host {parsed.netloc!r}; only local files are read",
                          param="messages", code="local_media_not_allowed")
        return urllib.parse.unquote(parsed.path)
    if "://" in url[:32]:
        raise invalid(f"{where}.image_url.url has an unsupported scheme; send a data URI", param="messages",
                      code="invalid_image_url")
    return url


def _inside(path: str, directory: Path) -> bool:
    return Path(path) == directory or Path(path).is_relative_to(directory)


def _from_local_file(url: str, where: str, directory: Path, max_bytes: int) -> bytes:
    """Read a file inside `directory` (relative paths are taken from it); anything else is refused
    with the same message, so the answer does not tell which files exist outside it."""
    outside = invalid(f"{where}.image_url.url is not a readable file inside the gateway's allowed media directory",
                      param="messages", code="local_media_not_allowed")
    raw = _local_path(url, where)
    if "\x00" in raw:
        raise outside
    candidate = Path(raw) if os.path.isabs(raw) else directory / raw
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise outside from None
    if not _inside(str(resolved), directory):
        raise outside
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise outside from None
    try:
        info = os.fstat(fd)
        # what was opened, not what was resolved a moment ago: a path swapped meanwhile is refused
        opened = f"/proc/self/fd/{fd}"
        if not stat.S_ISREG(info.st_mode) or (os.path.exists(opened) and not _inside(os.path.realpath(opened), directory)):
            raise outside
        if info.st_size > max_bytes:
            raise APIError(413, f"{where}.image_url.url is a file of {info.st_size} bytes; the gateway reads at "
                                f"most {max_bytes}", param="messages", code="image_too_large")
        with os.fdopen(fd, "rb") as f:
            fd = None
            return f.read(max_bytes + 1)[:max_bytes]
    except OSError:
        raise outside from None
    finally:
        if fd is not None:
            os.close(fd)

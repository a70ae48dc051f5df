"""Verified files: md5 checks against published values, and atomic downloads.

This is the one place the data layer talks to the network; httpx errors are translated here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from fedhealth.core import ChecksumError, DatasetError, DatasetMissingError, write_private_file

if TYPE_CHECKING:
    import httpx

DOWNLOAD_TIMEOUT_S = 30.0
MAX_DOWNLOAD_BYTES = 64 << 20


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def verify_md5(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` (one line: path, md5 found, md5 expected) unless the file matches."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    found = md5_of(content)
    if found != expected:
        raise ChecksumError(f"{path}: md5 {found} does not match the published md5 {expected}")


def download_verified(url: str, dest: Path, expected_md5: str, *, client: httpx.Client | None = None) -> None:
    """Fetch ``url`` into ``dest`` if and only if its md5 is ``expected_md5``.

    The bytes go to a temporary file next to ``dest`` that is renamed over it at the end, so a crash or a
    concurrent reader never sees half a file. A transfer failure raises :class:`DatasetMissingError`, wrong
    content :class:`ChecksumError`; either way nothing is left at ``dest``.
    """
    import httpx  # deferred: only a download needs the HTTP stack

    try:
        if client is None:
            with httpx.Client(timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True) as own:
                response = own.get(url)
        else:
            response = client.get(url)
        response.raise_for_status()
        data = response.content
    except httpx.HTTPError as exc:
        raise DatasetMissingError(
            f"{dest} is missing and could not be downloaded from {url} "
            f"({type(exc).__name__}: {_one_line(str(exc))})"
        ) from exc
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise DatasetMissingError(
            f"{dest} is missing and {url} answered more than {MAX_DOWNLOAD_BYTES} bytes"
        )
    found = md5_of(data)
    if found != expected_md5:
        raise ChecksumError(
            f"{dest}: downloaded from {url}, md5 {found} does not match the published md5 {expected_md5}"
        )
    try:
        write_private_file(dest, data)
    except OSError as exc:
        raise DatasetMissingError(
            f"{dest} is missing and could not be written after downloading it from {url} "
            f"({_one_line(str(exc))})"
        ) from exc

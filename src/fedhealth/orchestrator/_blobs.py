"""Content-addressed blob store: model tensors live in files named by their sha256, never in database rows."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from fedhealth.core import InputError, NotFoundError

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """Refuse anything that is not a lowercase sha256 hex string (also keeps paths inside the store)."""
    if not _DIGEST.match(digest):
        raise InputError(f"not a sha256 digest: {digest[:80]!r}")
    return digest


class BlobStore:
    """Immutable blobs under ``root/ab/abcdef...``. Writes are atomic (temp file + rename).

    A small in-memory cache keeps the most recent blobs, since every site downloads the same global model.
    """

    def __init__(self, root: Path, *, fsync: bool = False, cache_bytes: int = 256 << 20) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data``; return its sha256. Storing the same bytes twice is a no-op."""
        digest = digest or hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        self._remember(digest, data)
        return digest

    def get(self, digest: str) -> bytes:
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                return cached
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} is not in the store") from exc
        self._remember(digest, data)
        return data

    def get_if_small(self, digest: str, limit: int) -> bytes | None:
        """The blob if it is at most ``limit`` bytes, else None (without reading a large one)."""
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None:
            return cached if len(cached) <= limit else None
        try:
            size = self._path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} is not in the store") from exc
        return self.get(digest) if size <= limit else None

    def exists(self, digest: str) -> bool:
        return self._path(digest).exists()

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) > self._cache_bytes // 4:
            return
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return
            self._cache[digest] = data
            self._cached += len(data)
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)

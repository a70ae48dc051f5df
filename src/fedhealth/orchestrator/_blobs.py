"""Content-addressed blob store: model tensors live in files named by their sha256, never in database rows.

Two namespaces, so that what a route may serve and what it must never serve are kept apart on disk:

- ``MODEL``: global models and server-optimizer state the orchestrator made. A route serves one only after
  its own check (an agent: the input model of one of its open tasks; an operator: a released version).
- ``UPDATE``: what sites uploaded (a site's raw update in plain mode). Read by the round engine only; no
  route reads this namespace, so a digest seen in an audit entry opens nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from fedhealth.core import InputError, NotFoundError

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """Refuse anything that is not a lowercase sha256 hex string (also keeps paths inside the store)."""
    if not _DIGEST.match(digest):
        raise InputError(f"not a sha256 digest: {digest[:80]!r}")
    return digest


class BlobKind(StrEnum):
    MODEL = "model"  # made by the orchestrator; served after a route's own check
    UPDATE = "update"  # uploaded by a site; never served


class BlobWriter:
    """A blob streamed to a temporary file while its sha256 is computed; :meth:`commit` moves it into place,
    :meth:`discard` removes it. Large uploads therefore wait on disk, not in memory."""

    def __init__(self, store: BlobStore, kind: BlobKind) -> None:
        self._store = store
        self._kind = kind
        root = store.root_of(kind)
        self._tmp = root / f".upload.{os.getpid()}.{threading.get_ident()}.{os.urandom(8).hex()}.tmp"
        self._file: BinaryIO | None = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit/discard
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "the writer is closed"
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self._store.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def read(self) -> bytes:
        """The bytes written so far (to validate them before they are committed)."""
        self._close()
        return self._tmp.read_bytes()

    def commit(self) -> str:
        """Move the blob into the store under its digest (a no-op for bytes already stored)."""
        self._close()
        path = self._store.path(self.digest, self._kind)
        if path.exists():
            self._tmp.unlink(missing_ok=True)
        else:
            path.parent.mkdir(exist_ok=True)
            os.replace(self._tmp, path)
        return self.digest

    def discard(self) -> None:
        self._close()
        self._tmp.unlink(missing_ok=True)


class BlobStore:
    """Immutable blobs under ``root/ab/abcdef...`` (models) and ``root/updates/ab/abcdef...`` (uploads).
    Writes are atomic (temp file + rename).

    A small in-memory cache keeps the most recent models, since every site downloads the same global model.
    """

    def __init__(self, root: Path, *, fsync: bool = False, cache_bytes: int = 256 << 20) -> None:
        self.root = root
        self.fsync = fsync
        self._roots = {BlobKind.MODEL: root, BlobKind.UPDATE: root / "updates"}
        for folder in self._roots.values():
            folder.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    def root_of(self, kind: BlobKind) -> Path:
        return self._roots[kind]

    def path(self, digest: str, kind: BlobKind = BlobKind.MODEL) -> Path:
        check_digest(digest)
        return self._roots[kind] / digest[:2] / digest

    def put(self, data: bytes, digest: str | None = None, *, kind: BlobKind = BlobKind.MODEL) -> str:
        """Store ``data``; return its sha256. Storing the same bytes twice is a no-op."""
        digest = digest or hashlib.sha256(data).hexdigest()
        path = self.path(digest, kind)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        if kind is BlobKind.MODEL:
            self._remember(digest, data)
        return digest

    def writer(self, kind: BlobKind) -> BlobWriter:
        return BlobWriter(self, kind)

    def get(self, digest: str, *, kind: BlobKind = BlobKind.MODEL) -> bytes:
        if kind is BlobKind.UPDATE:
            return self._get_update(digest)
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                return cached
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} is not in the store") from exc
        self._remember(digest, data)
        return data

    def _get_update(self, digest: str) -> bytes:
        try:
            return self.path(digest, BlobKind.UPDATE).read_bytes()
        except FileNotFoundError:
            pass
        try:  # uploaded before uploads had their own folder (an open round across an upgrade)
            return self.path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"update {digest} is not in the store") from exc

    def get_if_small(self, digest: str, limit: int) -> bytes | None:
        """The model if it is at most ``limit`` bytes, else None (without reading a large one)."""
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None:
            return cached if len(cached) <= limit else None
        try:
            size = self.path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} is not in the store") from exc
        return self.get(digest) if size <= limit else None

    def exists(self, digest: str, *, kind: BlobKind = BlobKind.MODEL) -> bool:
        return self.path(digest, kind).exists()

    def remove_update(self, digest: str) -> None:
        """Delete an update no task points to (the loser of two concurrent uploads for one task). Models
        are never removed: the same bytes may be another study's."""
        self.path(digest, BlobKind.UPDATE).unlink(missing_ok=True)

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

"""Content-addressed blob store: model tensors live in files named by their sha256, never in database rows.

Two namespaces, so that what a route may serve and what it must never serve are kept apart on disk:

- ``MODEL``: global models and server-optimizer state the orchestrator made. A route serves one only after
  its own check (an agent: the input model of one of its open tasks; an operator: a released version).
- ``UPDATE``: what sites uploaded (a site's raw update in plain mode). Read by the round engine only; no
  route reads this namespace, so a digest seen in an audit entry opens nothing.

A blob is read back only if its bytes still hash to its name (:class:`DamagedBlobError` otherwise: a file
truncated by a power cut or changed on disk is never served or aggregated as if it were the stored bytes),
and storing the same bytes again replaces a damaged file. With ``fsync`` a blob's folder is synced after the
rename too, so a blob the (synced) database names is still there after a power cut. Temporary files of a
writer that was killed are removed when the store opens, and blobs no database row names are collected when
the orchestrator starts (:meth:`BlobStore.collect`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from fedhealth.core import FedHealthError, InputError, NotFoundError, sync_folder, write_private_file

_DIGEST = re.compile(r"^[0-9a-f]{64}\Z")  # \Z, not $: "$" also matches before a trailing newline
# The temporary files this module writes, with the id of the process writing them (see _tmp_name).
_TEMPORARY = re.compile(r"^\.(?:upload|[0-9a-f]{64})\.(\d+)\.[0-9a-z.]*tmp\Z")


class DamagedBlobError(FedHealthError):
    """A stored blob's bytes no longer hash to its digest: truncated or changed on disk once stored."""


def _tmp_name(prefix: str) -> str:
    # The pid tells a later start a dead writer's leftovers from a live writer's file (_discard_leftovers).
    return f".{prefix}.{os.getpid()}.{threading.get_ident()}.{os.urandom(8).hex()}.tmp"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process: alive
        return True
    except OverflowError:
        return False
    return True


def _intact(path: Path, digest: str) -> bool:
    """Whether ``path`` holds bytes that hash to ``digest`` (False if it is missing)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        return False
    return h.hexdigest() == digest


def _read_verified(path: Path, digest: str) -> bytes:
    """The bytes at ``path``, if they still hash to ``digest``; FileNotFoundError if it is missing."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise DamagedBlobError(
            f"blob {digest} is damaged on disk ({len(data)} bytes that no longer match its digest); "
            "storing the same bytes again repairs it"
        )
    return data


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
        self._tmp = root / _tmp_name("upload")
        self._file: BinaryIO | None = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit/discard
        self._hash = hashlib.sha256()
        self.size = 0
        self._failed = False

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "the writer is closed"
        try:
            self._file.write(chunk)
        except BaseException:
            self._abandon()
            raise
        self._hash.update(chunk)
        self.size += len(chunk)

    def _abandon(self) -> None:
        """A write failed (a full disk): what is in the file is not the blob the digest names, so it goes
        and the writer can no longer be read or committed."""
        self._failed = True
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):  # its unwritten buffer cannot be flushed either
                file.close()
        self._tmp.unlink(missing_ok=True)

    def _check_whole(self) -> None:
        if self._failed:
            raise OSError(errno.EIO, "a write of this blob failed: it was discarded and cannot be stored")

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def _close(self) -> None:
        self._check_whole()
        file = self._file
        if file is None:
            return
        try:
            file.flush()  # a full disk often shows only here, for the buffered part
            if self._store.fsync:
                os.fsync(file.fileno())
        except BaseException:
            self._abandon()
            raise
        self._file = None
        file.close()

    def read(self) -> bytes:
        """The bytes written so far (to validate them before they are committed)."""
        self._close()
        return self._tmp.read_bytes()

    def commit(self) -> str:
        """Move the blob into the store under its digest (a no-op for bytes already stored intact)."""
        self._close()
        path = self._store.path(self.digest, self._kind)
        if _intact(path, self.digest):
            self._tmp.unlink(missing_ok=True)
        else:
            self._store.place(self._tmp, path)
        return self.digest

    def discard(self) -> None:
        if self._failed:
            return
        with contextlib.suppress(OSError):  # a failed flush abandons the file: it goes either way
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
        self._discard_leftovers()
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
        """Store ``data``; return its sha256. Storing the same bytes twice is a no-op (unless the stored
        file was damaged: then it is replaced). A failed write (a full disk) leaves no file behind."""
        digest = digest or hashlib.sha256(data).hexdigest()
        path = self.path(digest, kind)
        if not _intact(path, digest):
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(_tmp_name(digest))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self.place(tmp, path)
        if kind is BlobKind.MODEL:
            self._remember(digest, data)
        return digest

    def writer(self, kind: BlobKind) -> BlobWriter:
        return BlobWriter(self, kind)

    def place(self, tmp: Path, path: Path) -> None:
        """Rename the written (and, with ``fsync``, synced) ``tmp`` to ``path``. With ``fsync`` the rename
        is synced too: the blob's folder, and its parent, whose entry for a folder just made (here or by a
        concurrent writer that has not synced it yet) is as volatile as the rename."""
        folder = path.parent
        folder.mkdir(exist_ok=True)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            sync_folder(folder)
            sync_folder(folder.parent)

    def _discard_leftovers(self) -> None:
        """Remove the temporary files of writers whose process is gone (killed mid-write): half an upload
        or model that no row names and no retry reuses. A live process's files (another orchestrator's, or
        this one's) are left alone."""
        for root in self._roots.values():
            for folder in (root, *(p for p in root.iterdir() if p.is_dir() and len(p.name) == 2)):
                for leftover in folder.glob(".*.tmp"):
                    match = _TEMPORARY.match(leftover.name)
                    if match is not None and not _alive(int(match.group(1))):
                        leftover.unlink(missing_ok=True)

    # The studies of the database this folder's blobs were last kept for (one id a line), beside the blobs.
    KEPT_FOR = ".studies"

    def kept_for(self, studies: set[str], named: set[str]) -> bool:
        """Whether a database with these studies is the one this folder's blobs belong to, so that the blobs
        it does not name may be collected: it still has every study it had when the folder was last kept
        for one. A wrong database (a forgotten ``FEDHEALTH_DATABASE_URL`` falling back to the home's SQLite
        file, a mistyped schema, another federation's, an older backup) names none of the blobs, and taking
        them all for orphans would lose every model. An unrecorded folder that holds blobs (the first start
        of a release that collects) belongs to a database that names at least one of them (``named``).
        Record the database's studies with :meth:`keep_for` once it is known to belong."""
        try:
            recorded = set((self.root / self.KEPT_FOR).read_text(encoding="ascii").split())
        except FileNotFoundError:
            stored = [blob.name for blob in self._stored()]
            return not stored or any(digest in named for digest in stored)
        return recorded <= studies

    def keep_for(self, studies: set[str]) -> None:
        """Record ``studies`` as those of the database this folder's blobs belong to (:meth:`kept_for`): at
        start, and each study as it is created (its blobs are here from then on)."""
        with contextlib.suppress(FileNotFoundError):
            studies = studies | set((self.root / self.KEPT_FOR).read_text(encoding="ascii").split())
        write_private_file(self.root / self.KEPT_FOR, "".join(f"{s}\n" for s in sorted(studies)).encode())

    def _stored(self) -> Iterator[Path]:
        """Every file named like a blob, in either root."""
        for root in self._roots.values():
            for folder in (p for p in root.iterdir() if p.is_dir() and len(p.name) == 2):
                for blob in folder.iterdir():
                    if _DIGEST.match(blob.name) and blob.name[:2] == folder.name:
                        yield blob

    def collect(self, named: set[str]) -> int:
        """Remove the blobs whose digest is not in ``named`` (every digest a database row names), returning
        how many went: an upload whose task row was never written (killed between the two, or the row's
        commit failed), a model of an aggregation killed before its round closed. Nothing names them and
        nothing will (a retried upload writes its bytes again). Only files named like a blob are candidates:
        temporary files (a live writer's, see :meth:`_discard_leftovers`) and anything else are left alone.

        Call it only while no request or round can write (at start, before serving, holding the
        orchestrator's lock): a blob is written before the row that names it, so a running orchestrator's
        newest blob is always unnamed for a moment."""
        removed = 0
        for blob in list(self._stored()):
            if blob.name not in named and blob.is_file() and not blob.is_symlink():
                blob.unlink(missing_ok=True)
                removed += 1
        with self._lock:  # nothing was cached yet at start; a cached copy of a removed blob must not linger
            for digest in [d for d in self._cache if d not in named]:
                self._cached -= len(self._cache.pop(digest))
        return removed

    def get(self, digest: str, *, kind: BlobKind = BlobKind.MODEL) -> bytes:
        if kind is BlobKind.UPDATE:
            return self._get_update(digest)
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                return cached
        try:
            data = _read_verified(self.path(digest), digest)
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} is not in the store") from exc
        self._remember(digest, data)  # verified: the cache holds only intact bytes
        return data

    def _get_update(self, digest: str) -> bytes:
        try:
            return _read_verified(self.path(digest, BlobKind.UPDATE), digest)
        except FileNotFoundError:
            pass
        try:  # uploaded before uploads had their own folder (an open round across an upgrade)
            return _read_verified(self.path(digest), digest)
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

"""Private homes: folders 0700 and files 0600, for every place that holds keys, consent records or ledgers.

A site home holds the site's identity key and ``site.sqlite`` (consent records with patient ids, permit and
deny decisions, the privacy ledger); the orchestrator's home holds the federation's CA key, its signing key
and its database. No other local account may read any of it. New files are created private from the start
(:func:`create_private_file` before SQLite opens a database: SQLite gives the database's ``-wal`` and
``-shm`` files the database file's own mode), and every service checks its home when it starts
(:func:`secure_home`): anything looser is tightened, and a home another account owns is refused.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedhealth.core._errors import ConfigError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_OTHERS = 0o077  # group and world bits


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700; tighten it if it exists with looser bits."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & _OTHERS:
        os.chmod(path, PRIVATE_DIR_MODE)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty as 0600 if it does not exist (an existing file is left as it is: see
    :func:`secure_home`). Call it before a library (SQLite) creates the file with the process umask."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    except (FileExistsError, FileNotFoundError):
        return  # there already, or no folder for it: SQLite reports the latter when it opens the file
    os.close(fd)


def sync_folder(folder: Path) -> None:
    """Make a rename or creation in ``folder`` durable: a file's own fsync does not cover its name, so after a
    power cut an atomic rename not synced here can come back as the previous version (a removed peer pin,
    an older site state)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:  # a folder this account may write into but not list: no way to sync it
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # some file systems (FUSE, some network ones) cannot sync a folder: the file was written and renamed,
        # as durable as they make it, and failing here would report a write that happened as failed
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` readable by the owner only (0600), atomically: through a temporary file of
    an unpredictable name created exclusively (``mkstemp``: ``O_EXCL``, 0600) beside it, then renamed over
    ``path``. A fixed temporary name (``<path>.tmp``, opened with ``O_TRUNC``) would write the secret into
    whatever another account planted there: a symbolic link to its own file, or a file it keeps open.

    A symbolic link at ``path`` is replaced, never followed. With ``overwrite=False`` anything at ``path``
    (a file, a link, even one that points nowhere) is left alone and :class:`FileExistsError` raised: the
    temporary file is hard-linked into place, which fails rather than replace. The new name is synced to
    disk with the data (:func:`sync_folder`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def _link_new(tmp: str, path: Path, data: bytes) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there (:class:`FileExistsError` otherwise), then remove
    ``tmp``. A file system without hard links gets ``path`` created exclusively instead (``O_EXCL`` refuses
    a link too), written in place: not atomic there, but never through a link nor over a file."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(path, flags, PRIVATE_FILE_MODE), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.unlink(tmp)


def refuse_foreign_folder(folder: Path, *, what: str) -> None:
    """:class:`ConfigError` (one line) for an output folder that is a symbolic link (everything written
    would land wherever it points) or that another local account owns (it could read or swap the files once
    written); a folder not there yet is fine."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{what} {folder} is a symbolic link; give the folder itself")
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{what} {folder} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}): that "
            "account could read or replace what is written there; choose a folder of your own"
        )


def discard_interrupted_writes(path: Path) -> int:
    """Remove the temporary files :func:`write_private_file` left beside ``path`` when its process was killed
    between creating one and renaming it (``.<name>.<random>.tmp``); returns how many. Call it only where
    this process is the file's one writer (a site's checkpoint of its own session): another writer's
    temporary file is in use until it is renamed. Symbolic links are removed, never followed."""
    removed = 0
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            leftover.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    return removed


@dataclass(frozen=True, slots=True, kw_only=True)
class Tightened:
    """What :func:`secure_home` changed: each path with its old mode."""

    changes: tuple[tuple[Path, int], ...]

    def __bool__(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        """One line naming what was tightened."""
        shown = ", ".join(f"{p.name or p} {mode:o}" for p, mode in self.changes[:4])
        more = f" and {len(self.changes) - 4} more" if len(self.changes) > 4 else ""
        return f"tightened to 0700/0600 (was: {shown}{more}): other local users could read them"


def secure_home(root: Path, *, what: str, subdirs: tuple[str, ...] = ()) -> Tightened:
    """Check a home at start-up: ``root`` and the given ``subdirs`` must belong to this user; each is made
    0700 and every file directly inside them 0600 (executable bits kept for the owner only). Symbolic links
    are not followed. Raises :class:`ConfigError` (one line) for a home that is not a folder or that another
    account owns: this process would then keep patient data where someone else controls access."""
    changes: list[tuple[Path, int]] = []
    for folder in (root, *(root / s for s in subdirs)):
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            if folder == root:
                raise ConfigError(f"{what} {root} does not exist") from None
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{what} {folder} is not a folder (a symbolic link is not accepted)")
        if info.st_uid != os.getuid():
            raise ConfigError(
                f"{what} {folder} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}); "
                "refusing to use a home another account controls"
            )
        changes += _tighten(folder, info.st_mode, PRIVATE_DIR_MODE)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    mode = entry.stat(follow_symlinks=False).st_mode
                    changes += _tighten(Path(entry.path), mode, stat.S_IMODE(mode) & ~_OTHERS)
    return Tightened(changes=tuple(changes))


def _tighten(path: Path, mode: int, wanted: int) -> list[tuple[Path, int]]:
    current = stat.S_IMODE(mode)
    if not current & _OTHERS:
        return []
    try:
        os.chmod(path, wanted, follow_symlinks=False)
    except OSError as exc:
        raise ConfigError(
            f"{path} is readable by other users (mode {current:o}) and cannot be tightened: {exc.strerror}"
        ) from exc
    return [(path, current)]

"""The site dashboard's data-quality page: each registered dataset's check and quality report (rows, labels,
missing values, ranges and far-out values per feature, the pinned schema), as ``fedhealth site dataset
check`` prints it. It is for the steward's eyes on this machine only: nothing of it is sent anywhere.

Reading a dataset can be slow (a large file, a remote database), so each report is kept with the snapshot of
the source it was read from and is read again only when that snapshot changes:

- a file (``file://``): its size and modification time, and those of the schema files the URI names (the
  pinned schema included, which ``dataset add --replace`` rewrites) — a ``stat``, cheap on every page load;
- a builtin dataset (``builtin://``): fixed (the files are checked against their checksums);
- anything else (SQL, OMOP, FHIR, a folder of images): no cheap snapshot, so the report is read again once it
  is older than ``max_age_s`` (15 minutes by default).

The page's "check again" link re-reads every dataset now. A failed check is kept the same way (the source is
not hammered on each load), with its one-line message and hint.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote

from fedhealth.agent import DatasetCheckError, DatasetSummary, SiteDatasets, check_dataset
from fedhealth.core import Clock, ConfigError, SystemClock
from fedhealth.data import DatasetURI, redact_uri

MAX_AGE_S = 15 * 60.0

Check = Callable[..., DatasetSummary]


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetQuality:
    """One registered dataset as the page shows it: its check's summary (with the quality report), or why
    the check failed; whether its schema is pinned; when it was checked and how its snapshot is known."""

    name: str
    uri: str  # secrets shown as ***
    pinned: bool
    checked_at: datetime
    snapshot: str  # how a change of the source is noticed (a sentence for the page)
    summary: DatasetSummary | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    key: tuple[object, ...]  # equal keys: the same data (for an expiring snapshot, within max_age_s)
    expires: bool
    how: str


def source_snapshot(uri: str) -> _Snapshot:
    """What identifies the data behind ``uri`` cheaply (module docstring)."""
    try:
        parsed = DatasetURI.parse(uri)
    except ConfigError:
        return _Snapshot((uri,), True, "re-read every 15 minutes")
    if parsed.scheme == "builtin":
        return _Snapshot((uri,), False, "builtin dataset: fixed")
    if parsed.scheme == "file":
        paths = [Path(unquote(parsed.path))]  # the path stays percent-encoded; parameters are decoded
        if "schema" in parsed.params:
            paths.append(Path(parsed.params["schema"]))
        stamps: list[object] = [uri]
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((str(path), None))  # missing: checked again once it appears
                continue
            if stat.S_ISDIR(st.st_mode):  # a folder's own time misses edits of the files in it
                return _Snapshot((uri,), True, "folder: re-read every 15 minutes")
            stamps.append((str(path), st.st_size, st.st_mtime_ns))
        return _Snapshot(tuple(stamps), False, "re-read when the file or its schema changes")
    return _Snapshot((uri,), True, f"{parsed.scheme} source: re-read every 15 minutes")


class QualityCache:
    """Each registered dataset's :class:`DatasetQuality`, kept per source snapshot (module docstring)."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        max_age_s: float = MAX_AGE_S,
        data_dir: Path | None = None,
        check: Check = check_dataset,
    ) -> None:
        self._clock = clock or SystemClock()
        self._max_age_s = max_age_s
        self._data_dir = data_dir
        self._check = check
        self._kept: dict[str, tuple[_Snapshot, DatasetQuality]] = {}
        self._lock = threading.Lock()  # two page loads at once read a dataset once
        self.reads = 0  # how many times a dataset was actually read (for tests and the page)

    def reports(self, datasets: SiteDatasets, *, refresh: bool = False) -> list[DatasetQuality]:
        """Every registered dataset's report, read again only where its snapshot changed (or ``refresh``)."""
        with self._lock:
            registered = datasets.all()
            for gone in self._kept.keys() - registered.keys():
                del self._kept[gone]
            return [
                self._report(datasets, name, uri, refresh=refresh) for name, uri in sorted(registered.items())
            ]

    def _report(self, datasets: SiteDatasets, name: str, uri: str, *, refresh: bool) -> DatasetQuality:
        snapshot = source_snapshot(uri)
        now = self._clock.now()
        kept = self._kept.get(name)
        if kept is not None and not refresh and kept[0].key == snapshot.key:
            age = (now - kept[1].checked_at).total_seconds()
            if not snapshot.expires or age < self._max_age_s:
                return kept[1]
        pinned = datasets.pinned(name)
        self.reads += 1
        try:
            summary = self._check(name, uri, self._data_dir, pinned=pinned)
            found = DatasetQuality(
                name=name,
                uri=summary.uri,
                pinned=pinned,
                checked_at=now,
                snapshot=snapshot.how,
                summary=summary,
            )
        except DatasetCheckError as exc:
            found = DatasetQuality(
                name=name,
                uri=redact_uri(uri),
                pinned=pinned,
                checked_at=now,
                snapshot=snapshot.how,
                error=" ".join(str(exc).split()),
            )
        self._kept[name] = (snapshot, found)
        return found

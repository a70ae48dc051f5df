"""The one textual form of instants that governance hashes, and parsing of dates from outside."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from fedhealth.core import InputError

_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def require_aware(value: datetime, what: str) -> datetime:
    """``value`` in UTC; a naive datetime is refused (:class:`InputError`): its time zone would be a guess."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InputError(f"{what} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def format_instant(value: datetime) -> str:
    """``2026-01-01T09:30:00.000000Z``: fixed width, UTC, microseconds; hashed as is."""
    return require_aware(value, "a timestamp").strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_instant(text: str) -> datetime:
    """The inverse of :func:`format_instant`; any other spelling is refused (it would hash differently)."""
    if not _INSTANT.match(text):
        raise ValueError(f"not a fedhealth timestamp: {text!r}")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def at_start_of_day(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def parse_bound(text: str, *, end: bool) -> datetime:
    """A date (``2026-03-01``) or an ISO 8601 datetime with an offset, as a UTC instant.

    A date as a start means the start of that day; as an end it means the end of that day, returned as the
    next midnight because governance treats ends as exclusive. Naive datetimes are refused.
    """
    text = text.strip()
    if _DATE.match(text):
        day = date.fromisoformat(text)
        return at_start_of_day(day + timedelta(days=1) if end else day)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: write e.g. {text}Z, or a plain date")
    return parsed.astimezone(UTC)


def as_instant(value: date | datetime) -> datetime:
    """A datetime (aware) as UTC, or a date as the start of that day in UTC."""
    if isinstance(value, datetime):
        return require_aware(value, "the date")
    return at_start_of_day(value)

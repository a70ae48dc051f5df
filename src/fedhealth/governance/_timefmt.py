"""The one textual form of instants that governance hashes, and parsing of dates from outside."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from fedhealth.core import InputError

_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z\Z")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")


def require_aware(value: datetime, what: str) -> datetime:
    """``value`` in UTC; a naive datetime is refused (:class:`InputError`): its time zone would be a guess."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InputError(f"{what} must be a timezone-aware datetime")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00: before year 1 in UTC
        raise InputError(f"{what} is outside the years 1 to 9999 in UTC") from None


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
    next midnight because governance treats ends as exclusive. ``9999-12-31`` as an end, the "no end" of many
    hospital exports, has no next midnight: it is the calendar's last instant, and so is an end in year 9999
    whose offset puts it past the calendar in UTC (``9999-12-31T23:59:59-05:00``). Naive datetimes are
    refused, and so is any other instant outside the years 1 to 9999 in UTC.
    """
    text = text.strip()
    try:
        if _DATE.match(text):
            day = date.fromisoformat(text)
            if end and day == date.max:
                return datetime.max.replace(tzinfo=UTC)
            return at_start_of_day(day + timedelta(days=1) if end else day)
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            raise ValueError(f"{text!r} has no UTC offset: write e.g. {text}Z, or a plain date")
        return parsed.astimezone(UTC)
    except OverflowError:  # an offset that moves the instant before year 1 or past year 9999 in UTC
        if end and text[:4] == "9999":  # the "no end" written in local time west of UTC: the same open end
            return datetime.max.replace(tzinfo=UTC)
        raise ValueError(
            f"{text!r} is outside the years 1 to 9999 in UTC (an open end is an empty cell)"
        ) from None


def as_instant(value: date | datetime) -> datetime:
    """A datetime (aware) as UTC, or a date as the start of that day in UTC."""
    if isinstance(value, datetime):
        return require_aware(value, "the date")
    return at_start_of_day(value)

"""Injectable time: services read the clock through :class:`Clock` so tests can control it."""

from __future__ import annotations

import email.utils
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Wall time (timezone-aware UTC) and a monotonic counter in seconds."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to; for deterministic tests."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += timedelta(seconds=seconds)
        self._mono += seconds


def utcnow() -> datetime:
    """The current UTC time, timezone-aware."""
    return datetime.now(UTC)


def token_lifetime_s(expires_at: datetime, date_header: str | None) -> float:
    """How long a token issued in an answer lives, in seconds: its expiry less the issuer's clock when it
    answered (the answer's HTTP ``Date``), so that the holder's own clock does not count; count it down on
    the holder's monotonic clock. Compared with the holder's wall clock, a site ten minutes ahead found
    every ten-minute token expired on arrival and logged in again before every call (against the login rate
    limit), and one behind kept a token past its end until refused
    (tests/agent/test_time_attacks.py::test_a_site_clock_off_by_an_hour_renews_its_token_once_per_lifetime_not_per_call).
    Without a readable ``Date`` the holder's clock is all there is. A lying issuer gains nothing from a long
    lifetime (it refuses its own token with a 401, which renews it) and an expiry at the dawn of time
    overflows nothing: the difference of two aware datetimes always fits
    (tests/agent/test_time_attacks.py::test_a_token_expiring_at_the_dawn_of_time_is_renewed_not_a_crash)."""
    issued = datetime.now(UTC)
    if date_header:
        try:
            stated = email.utils.parsedate_to_datetime(date_header)
        except (TypeError, ValueError, IndexError, OverflowError):  # a year of 20 digits overflows
            stated = None
        if stated is not None and stated.tzinfo is not None:
            issued = stated
    return (expires_at - issued).total_seconds()

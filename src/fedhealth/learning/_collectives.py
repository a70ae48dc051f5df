"""What a collective recipe's site program sees: :class:`Collectives`, a session's synchronous collectives.

Every participant calls the same collectives in the same order (a site program is deterministic given its
data and what the session returned); each call blocks until every participant made it. Two implementations
share one core (:class:`SessionMember` over ``fedhealth.secagg``'s :class:`CollectiveSite`, so the masks are
the same everywhere): :class:`InMemorySession` (threads of one process, for tests and the in-process runner)
and the agent's HTTP one (``fedhealth.agent``), which only moves the bytes.

If the session fails (a participant lost, a check failed) every pending and later call raises
:class:`~fedhealth.secagg.SessionFailedError` with the reason; nothing unmasked was revealed.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.secagg import (
    SETUP_INDEX,
    CallBuffer,
    CollectiveConfig,
    CollectiveRelay,
    CollectiveSite,
    SessionFailedError,
    SessionFailure,
)

T = TypeVar("T")


@runtime_checkable
class Collectives(Protocol):
    """A session's collectives, as one site's program uses them."""

    @property
    def site(self) -> str:
        """This site."""

    @property
    def sites(self) -> tuple[str, ...]:
        """The session's participants, sorted; ``sites[0]`` is the leader."""

    def secure_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        """The sum over every participant of ``values`` (real, any shape; the same shape at every site), as
        float64 of that shape: exactly ``sum(round(x * 2^40)) / 2^40``. Each value must lie strictly within
        ``±2^23 / n`` for n participants (else :class:`~fedhealth.secagg.FixedPointRangeError`, before
        anything is sent). The orchestrator sees only masked vectors and the sum."""

    def checked_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        """:meth:`secure_sum` that the relay cannot alter unnoticed: each site adds secret random linear
        combinations of its values (under a key the leader shares with every site, sealed from the relay)
        and checks them against the sum it receives; an altered sum fails the session
        (:class:`~fedhealth.secagg.SecAggSecurityError`). For sums whose result decides what is revealed
        next (the statistics recipe's counts decide which cells' values are summed). The first one costs one
        call more (the key), each 64 values more."""

    def broadcast(self, data: bytes | None) -> bytes:
        """The leader passes bytes, every other site None; all receive the leader's bytes (signed by it).
        A broadcast is public: the orchestrator relays it and keeps the last one as the session's result."""

    def barrier(self) -> None:
        """Return once every participant reached this call."""


@runtime_checkable
class BenchmarkCollectives(Collectives, Protocol):
    def unmasked_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        """The same sum as :meth:`secure_sum` without masks: each site's values cross in clear. For the
        collective benchmark's baseline only; never for a site's data."""


class SessionMember:
    """One participant's side of a session over some relay: the collectives of :class:`Collectives` on top
    of a :class:`CollectiveSite`. A subclass moves the bytes (:meth:`_exchange`)."""

    def __init__(self, core: CollectiveSite) -> None:
        self._core = core
        self._opened = False
        self._bodies = CallBuffer()  # sum bodies are built here: valid until the next sum

    @property
    def site(self) -> str:
        return self._core.site

    @property
    def sites(self) -> tuple[str, ...]:
        return self._core.config.sites

    @property
    def calls(self) -> int:
        """Collectives completed so far."""
        return self._core.calls

    def _exchange(self, index: int, body: bytes | memoryview) -> bytes | memoryview:
        """Send call ``index`` and return its result once every participant sent theirs (a view may be
        valid only until the next call). ``body`` may be a view of a buffer the next call reuses."""
        raise NotImplementedError

    def open(self) -> None:
        """The set-up call: exchange signed session keys with every participant."""
        result = self._exchange(SETUP_INDEX, self._core.advertise())
        self._core.establish(result)
        self._opened = True

    def secure_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        body = self._core.prepare_sum(values, buffer=self._bodies)
        return self._core.complete_sum(self._exchange(self._core.pending_index, body))

    def checked_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        if not self._core.has_group_secret:  # every site's first checked sum: the same call everywhere
            body = self._core.prepare_group_secret()
            self._core.complete_group_secret(self._exchange(self._core.pending_index, body))
        body = self._core.prepare_checked_sum(values, buffer=self._bodies)
        return self._core.complete_checked_sum(self._exchange(self._core.pending_index, body))

    def unmasked_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        body = self._core.prepare_sum(values, masked=False, buffer=self._bodies)
        return self._core.complete_sum(self._exchange(self._core.pending_index, body))

    def broadcast(self, data: bytes | None) -> bytes:
        body = self._core.prepare_broadcast(data)
        return self._core.complete_broadcast(self._exchange(self._core.pending_index, body))

    def barrier(self) -> None:
        body = self._core.prepare_barrier()
        self._core.complete_barrier(self._exchange(self._core.pending_index, body))

    def close(self) -> None:
        """The closing call: every site checks that all of them were sent the same results."""
        body = self._core.prepare_end()
        self._core.complete_end(self._exchange(self._core.pending_index, body))


# --- in memory ---------------------------------------------------------------------------------------------


class InMemorySession:
    """A session among threads of this process: real keys, masks and relay, no transport.

    :meth:`run` runs one site program per participant, each in its own thread, and returns their results;
    a program that raises, or a participant that does not reach a call within ``call_timeout_s`` of the
    first, fails the session for all (the others' calls raise :class:`SessionFailedError`), as over HTTP.
    """

    def __init__(
        self,
        sites: Sequence[str],
        *,
        study_id: str = "in-memory",
        round: int = 1,
        spec_hash: str = "0" * 64,
        collusion: int = 0,
        call_timeout_s: float = 30.0,
    ) -> None:
        self.config = CollectiveConfig(
            study_id=study_id,
            round=round,
            attempt=secrets.token_hex(8),
            spec_hash=spec_hash,
            sites=tuple(sorted(sites)),
            collusion=collusion,
        )
        self._keys = {s: IdentityKey.generate() for s in self.config.sites}
        self._identities: dict[str, PublicIdentity] = {s: k.public() for s, k in self._keys.items()}
        self.relay = CollectiveRelay(self.config, self._identities)
        self.call_timeout_s = call_timeout_s
        self._cond = threading.Condition()

    def member(self, site: str) -> InMemoryCollectives:
        core = CollectiveSite(self.config, site, self._keys[site], self._identities)
        return InMemoryCollectives(core, self)

    def fail(self, reason: SessionFailure, detail: str) -> None:
        with self._cond:
            self.relay.fail(reason, detail)
            self._cond.notify_all()

    def exchange(self, site: str, index: int, body: bytes) -> bytes | memoryview:
        with self._cond:
            try:
                if self.relay.receive(site, index, body):
                    self._cond.notify_all()
            except BaseException:
                self._cond.notify_all()  # a call that failed the session wakes the others now, not at timeout
                raise
            give_up = time.monotonic() + self.call_timeout_s
            while (result := self.relay.result(index)) is None:  # raises once the session failed
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    missing = ", ".join(self.relay.missing())
                    self.relay.fail(
                        SessionFailure.SITE_LOST,
                        f"{missing} did not take part in call {index} within {self.call_timeout_s:g} s",
                    )
                    self._cond.notify_all()
                    continue
                self._cond.wait(remaining)
            return result

    def run(self, program: Callable[[Collectives], T]) -> dict[str, T]:
        """Run ``program`` at every participant (set-up before, closing check after); returns each site's
        result, or raises the first site's error (a program's own exception before a session failure)."""
        results: dict[str, T] = {}
        errors: dict[str, BaseException] = {}

        def one(site: str) -> None:
            member = self.member(site)
            try:
                member.open()
                results[site] = program(member)
                member.close()
            except BaseException as exc:
                errors[site] = exc
                if not isinstance(exc, SessionFailedError):
                    self.fail(SessionFailure.SITE_LOST, f"{site}'s program failed ({type(exc).__name__})")

        threads = [threading.Thread(target=one, args=(s,), name=f"collective-{s}") for s in self.config.sites]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            own = [e for e in errors.values() if not isinstance(e, SessionFailedError)]
            raise (own or list(errors.values()))[0]
        return results


class InMemoryCollectives(SessionMember):
    """One thread's participant of an :class:`InMemorySession`."""

    def __init__(self, core: CollectiveSite, session: InMemorySession) -> None:
        super().__init__(core)
        self._session = session

    def _exchange(self, index: int, body: bytes | memoryview) -> bytes | memoryview:
        return self._session.exchange(self.site, index, bytes(body))


def run_in_memory(sites: Sequence[str], program: Callable[[Collectives], T], **session: Any) -> dict[str, T]:
    """Run ``program`` as a collective session of ``sites`` in this process (threads); see
    :class:`InMemorySession`."""
    return InMemorySession(sites, **session).run(program)

"""The relay of a collective session: the orchestrator's side, as a sans-IO state machine (the protocol is
described in :mod:`fedhealth.secagg._collective`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import ConfigError, CryptoError
from fedhealth.crypto import PublicIdentity, constant_time_equal
from fedhealth.secagg._errors import SecAggMessageError, SecAggProtocolError, SecAggSecurityError
from fedhealth.secagg._session import (
    MAX_VECTOR_LENGTH,
    SETUP_INDEX,
    SIGNATURE_BYTES,
    CollectiveConfig,
    CollectiveOp,
    SessionAdvert,
    SessionFailedError,
    SessionFailure,
    decode_call,
    load_json,
)

# --- the relay ----------------------------------------------------------------------------------------------


class CollectiveRelay:
    """The orchestrator's side of one session: it gathers every participant's call for an index and computes
    the one result all of them receive (the adverts, the ring sum of the masked vectors, the leader's
    broadcast, nothing for a barrier, the closing MACs).

    It holds at most the running sum of the index being collected and the last result; it never holds a
    site's input unmasked (sites mask before sending) and it never computes a sum over fewer than every
    participant. Anything that breaks the session's rules fails the session (:class:`SessionFailedError`,
    kept in :attr:`failure`); so does :meth:`fail`, which the driver calls when a participant is lost. There
    is no partial result after a failure: what was gathered for the open index is dropped.
    """

    def __init__(self, config: CollectiveConfig, identities: Mapping[str, PublicIdentity]) -> None:
        if set(identities) != set(config.sites):
            raise ConfigError("identities must name exactly the session's participants")
        self.config = config
        self._digest = config.digest()
        self._identities = dict(identities)
        self.index = SETUP_INDEX  # the index being gathered
        self.failure: SessionFailedError | None = None
        self.done = False
        self.released: bytes | None = None  # the payload of the last broadcast (public by design)
        self._op: CollectiveOp | None = None
        self._length = 0
        self._contributors: set[str] = set()
        self._acc: NDArray[np.uint64] | None = None
        self._parts: dict[str, Any] = {}
        self._last_index = -1
        self._last: bytes | memoryview = b""

    @property
    def calls(self) -> int:
        """Collectives completed between the set-up and the end."""
        completed = self.index - 1 if not self.done else self.index - 2
        return max(0, completed)

    def received(self, site: str, index: int) -> bool:
        """Whether ``site``'s call ``index`` was already taken (a re-send changes nothing)."""
        return index == self._last_index or (index == self.index and site in self._contributors)

    def missing(self) -> list[str]:
        """The participants whose call for the open index has not arrived."""
        return [s for s in self.config.sites if s not in self._contributors]

    def fail(self, reason: SessionFailure, detail: str) -> SessionFailedError:
        """End the session without a result; returns the error (kept in :attr:`failure`)."""
        if self.failure is None:
            self.failure = SessionFailedError(reason, detail)
            self._acc = None
            self._parts.clear()
            self._contributors.clear()
            self._last = b""
        return self.failure

    def result(self, index: int) -> bytes | memoryview | None:
        """The result of ``index`` once every participant sent it (None while it is open)."""
        if self.failure is not None:
            raise self.failure
        if index == self._last_index:
            return self._last
        if index == self.index and not self.done:
            return None
        raise SecAggProtocolError(f"call {index} is not the session's open or last call")

    def receive(self, site: str, index: int, body: bytes | bytearray) -> bool:
        """One participant's call for ``index``; True when it completed the index. A call a site already sent
        (a transport retry) changes nothing. A writeable ``body`` may be taken over as the running sum."""
        if self.failure is not None:
            raise self.failure
        if site not in self._identities:
            raise SecAggProtocolError(f"{site!r} is not a participant of this session")
        if self.received(site, index):
            return False  # a re-sent call: its result is (or will be) there
        if self.done or index < self.index:
            raise SecAggProtocolError(f"call {index} is closed")
        if index > self.index:
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION,
                f"{site} sent call {index} while the session gathers call {self.index}",
            )
        try:
            op, payload = decode_call(body)
        except SecAggMessageError as exc:
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION, f"{site} sent a malformed call: {exc}"
            ) from None
        self._check_op(site, index, op, len(payload))
        if op is CollectiveOp.SETUP:
            self._take_advert(site, payload)
        elif op is CollectiveOp.SUM:
            self._add(body, payload)
        elif op in (CollectiveOp.BROADCAST, CollectiveOp.SEAL):
            if site == self.config.leader:
                self._parts[site] = bytes(payload)
        elif op is CollectiveOp.END:
            self._take_end(site, payload)
        self._contributors.add(site)
        if len(self._contributors) < self.config.n:
            return False
        self._complete(op)
        return True

    def _check_op(self, site: str, index: int, op: CollectiveOp, length: int) -> None:
        if (op is CollectiveOp.SETUP) != (index == SETUP_INDEX):
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION,
                f"{site} sent a {op.name.lower()} as call {index} (the set-up is call 0, and only it)",
            )
        if op is CollectiveOp.SUM and (length % 8 or length > 8 * MAX_VECTOR_LENGTH):
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION, f"{site} sent a sum that is not a uint64 vector"
            )
        if op in (CollectiveOp.BROADCAST, CollectiveOp.SEAL) and (length >= SIGNATURE_BYTES) != (
            site == self.config.leader
        ):
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION,
                f"{site} sent a broadcast payload, but only the leader ({self.config.leader}) sends one"
                if site != self.config.leader
                else f"the leader {site} sent a broadcast without its signature",
            )
        if op is CollectiveOp.BARRIER and length:
            raise self.fail(SessionFailure.PROTOCOL_VIOLATION, f"{site} sent a barrier with a payload")
        if self._op is None:
            self._op, self._length = op, length
            return
        if op is not self._op:
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION,
                f"the sites disagree on call {index}: {site} sent a {op.name.lower()}, "
                f"others a {self._op.name.lower()} (their programs diverged)",
            )
        if op is CollectiveOp.SUM and length != self._length:
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION,
                f"the sites disagree on call {index}: {site} sums {length // 8} values, "
                f"others {self._length // 8}",
            )

    def _take_advert(self, site: str, payload: memoryview) -> None:
        try:
            advert = SessionAdvert.from_bytes(payload)
            if advert.site_id != site:
                raise SecAggSecurityError(f"{site} sent an advert naming {advert.site_id}")
            if not constant_time_equal(advert.config_digest, self._digest):
                raise SecAggSecurityError(f"{site}'s advert is for another session")
            self._identities[site].verify(advert.signature, advert.signed_payload())
        except SecAggMessageError as exc:
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION, f"{site} sent a malformed advert: {exc}"
            ) from None
        except (SecAggSecurityError, CryptoError) as exc:
            raise self.fail(SessionFailure.SECURITY, f"{site}'s advert does not verify: {exc}") from None
        self._parts[site] = advert

    def _take_end(self, site: str, payload: memoryview) -> None:
        try:
            entry = load_json(payload)
        except SecAggMessageError as exc:
            raise self.fail(
                SessionFailure.PROTOCOL_VIOLATION, f"{site} sent a malformed end: {exc}"
            ) from None
        if (
            not isinstance(entry, dict)
            or entry.get("site") != site
            or not isinstance(entry.get("tags"), dict)
        ):
            raise self.fail(SessionFailure.PROTOCOL_VIOLATION, f"{site} sent a malformed end")
        self._parts[site] = entry

    def _add(self, body: bytes | bytearray, payload: memoryview) -> None:
        vector = np.frombuffer(payload, dtype="<u8")
        if self._acc is None:
            # the first vector becomes the running sum: taken over when the transport gave a writeable
            # buffer, copied otherwise
            self._acc = vector if isinstance(body, bytearray) else vector.copy()
        else:
            np.add(self._acc, vector, out=self._acc)  # uint64 wraps mod 2^64: the ring's addition

    def _complete(self, op: CollectiveOp) -> None:
        result: bytes | memoryview
        if op is CollectiveOp.SETUP:
            result = json.dumps([self._parts[s].to_json() for s in self.config.sites]).encode()
        elif op is CollectiveOp.SUM:
            assert self._acc is not None
            result = memoryview(self._acc.data).cast("B")
        elif op is CollectiveOp.BROADCAST:
            result = self._parts[self.config.leader]
            self.released = bytes(result[:-SIGNATURE_BYTES])
        elif op is CollectiveOp.SEAL:  # sealed for each site: nothing the relay can read, nor a result
            result = self._parts[self.config.leader]
        elif op is CollectiveOp.END:
            result = json.dumps([self._parts[s] for s in self.config.sites], sort_keys=True).encode()
            self.done = True
        else:
            result = b""
        self._last_index, self._last = self.index, result
        self.index += 1
        self._op, self._length = None, 0
        self._contributors = set()
        self._acc = None
        self._parts = {}

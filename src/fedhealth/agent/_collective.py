"""The site side of a collective session: check the session against the approved spec, then run the
recipe's site program with :class:`HttpCollectives`, the session's collectives over the agent's connection.

The protocol is ``fedhealth.secagg``'s :class:`CollectiveSite` (masks, signatures, the closing check); this
module carries its bytes and holds the site's checks against a malicious orchestrator:

- **The session is the approved one.** Before any key is advertised or any data read, the site checks that
  the session's participants are exactly the spec's sites (:func:`~fedhealth.protocol.collective_plan`:
  its training sites; at least 3, and at least 2 outside the spec's collusion bound), that every peer key the
  orchestrator hands out hashes to the spec's fingerprint for that site, and that no pinned key changed
  (``peers.json``, shared with secure rounds). The session's keys bind the study, round, attempt and the
  approved spec's hash.
- **Nothing in clear.** Every sum is masked before it leaves the site; broadcasts are the leader's (signed)
  and public by design.
- **Equivocation is caught.** The closing call checks that every site was sent the same results; a mismatch
  (or a forged broadcast, or a bad key) stops the session at this site with ``collective_refused``.

Transport: one ``POST .../collective/{index}?wait=S`` per collective on the agent's keep-alive connection
(raw bytes, no JSON), answered with the result; if the result is not ready within ``S`` the site long-polls
with ``GET``. A transport retry re-sends the same bytes (the relay counts a call once).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from fedhealth.agent._client import OrchestratorClient
from fedhealth.agent._pipeline import TaskRefused
from fedhealth.agent._secure import PeerPins
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.governance import spec_hash
from fedhealth.learning import SessionMember
from fedhealth.protocol import (
    ATTESTATION_HEADER,
    FailureCode,
    SiteAttestation,
    Task,
    TaskKind,
    collective_plan,
)
from fedhealth.secagg import (
    CollectiveConfig,
    CollectiveSite,
    KeyReuseGuard,
    SessionFailedError,
    SessionFailure,
)

log = logging.getLogger("fedhealth.agent")


@dataclass(frozen=True, slots=True)
class CheckedSession:
    """A collective session that passed the site's checks: its configuration and the peers' identities."""

    config: CollectiveConfig
    peers: dict[str, PublicIdentity]


def _mismatch(what: str) -> TaskRefused:
    return TaskRefused(
        FailureCode.SECURE_ROUND_MISMATCH.value,
        f"the collective session's {what} differs from what the approved study spec prescribes; "
        "refusing the session",
    )


def check_collective_session(task: Task, site: str, identity: IdentityKey, pins: PeerPins) -> CheckedSession:
    """The site's checks of a collective task's session against the approved spec, before any key is
    advertised or any data read. Raises :class:`TaskRefused`."""
    if task.kind is not TaskKind.COLLECTIVE:
        raise _mismatch("task kind")
    info = task.collective
    if info is None:
        raise TaskRefused(
            FailureCode.SECURE_ROUND_MISSING.value,
            "the task is a collective session but came without the session's set-up; this site sends "
            "nothing in clear for it",
        )
    try:
        plan = collective_plan(task.spec)
    except ValueError:
        raise _mismatch("existence (the spec cannot hold a collective session)") from None
    if tuple(info.sites) != plan.sites or site not in plan.sites:
        raise _mismatch("participant list")
    if set(info.peer_keys) != set(plan.sites):
        raise _mismatch("peer key list")
    if plan.site_keys[site] != identity.public().fingerprint:
        raise TaskRefused(
            FailureCode.PEER_KEY_MISMATCH.value,
            "the approved spec names another identity key for this site; refusing the session",
        )
    pins.check(info.peer_keys, plan.site_keys)
    try:
        config = CollectiveConfig(
            study_id=task.study_id,
            round=task.round,
            attempt=info.attempt,
            spec_hash=spec_hash(task.spec.model_dump(mode="json")),
            sites=plan.sites,
            collusion=plan.collusion,
        )
    except ValueError:  # ConfigError: e.g. a study id or attempt the session cannot bind
        raise _mismatch("configuration") from None
    peers = {s: PublicIdentity(bytes.fromhex(k)) for s, k in info.peer_keys.items()}
    return CheckedSession(config=config, peers=peers)


class HttpCollectives(SessionMember):
    """This site's part in a session, over the agent's HTTPS connection to the orchestrator."""

    def __init__(
        self,
        client: OrchestratorClient,
        task: Task,
        checked: CheckedSession,
        *,
        site: str,
        identity: IdentityKey,
        guard: KeyReuseGuard | None = None,
        poll_wait_s: float = 25.0,
    ) -> None:
        super().__init__(CollectiveSite(checked.config, site, identity, checked.peers, key_guard=guard))
        self._client = client
        self._deadline = task.deadline
        self._poll_wait_s = poll_wait_s
        self._task_id = task.task_id
        self._attempt = checked.config.attempt
        self._extra: dict[str, str] = {}

    def _exchange(self, index: int, body: bytes) -> bytes:
        data = self._send(index, body, self._extra)
        while data is None:
            data = self._send(index, None, {})
        return data

    def _send(self, index: int, body: bytes | None, headers: dict[str, str]) -> bytes | None:
        left = (self._deadline - datetime.now(UTC)).total_seconds()
        if left <= 0:
            raise SessionFailedError(SessionFailure.ABORTED, "the session's round deadline passed")
        return self._client.collective_call(
            self._task_id,
            index,
            body,
            attempt=self._attempt,
            wait=min(self._poll_wait_s, left),
            headers=headers,
            max_elapsed_s=max(1.0, left),
        )

    def close_with(self, attestation: SiteAttestation | None) -> None:
        """The closing call, carrying the site's attestation for the task (no per-site figure)."""
        if attestation is not None:
            self._extra = {
                ATTESTATION_HEADER: base64.b64encode(attestation.model_dump_json().encode()).decode()
            }
        try:
            self.close()
        finally:
            self._extra = {}

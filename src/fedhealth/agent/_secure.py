"""The site side of a secure round: check the round against the approved spec, then walk the SecAgg+ stages
over HTTPS.

The protocol is ``fedhealth.secagg``'s :class:`SecAggClient`; this module carries its messages and holds the
site's own guards against a malicious orchestrator (DESIGN.md's threat model):

- **No downgrade.** A task whose spec asks for secure aggregation but that arrives without a secure round is
  refused: the site never sends an update, or a metric, in clear for such a spec.
- **The round is the approved one.** The steward approved the spec's hash, which covers the participating
  sites, their identity-key fingerprints, the collusion bound, the threshold and the neighbourhood size.
  Before it advertises any key, the site checks that the round's participants are among the spec's sites for
  the task's kind, that its threshold, collusion bound and neighbourhood settings are what
  :func:`~fedhealth.protocol.secure_round_plan` derives from the spec, and that every peer key the
  orchestrator hands out hashes to the spec's fingerprint for that site. A peer the spec does not name is
  refused, never pinned.
- **Pins.** Peers' keys are also pinned in ``peers.json`` in the site home (only peers an approved spec
  names): a key that changes from one study to the next is refused until a steward compares fingerprints
  out of band and removes the old pin.
- **Unmask once.** A site answers the unmask stage at most once per (approved spec, round, kind), across
  attempts and agent restarts: the answer is recorded durably in the site database before it is built
  (:class:`UnmaskRecord`). Training is deterministic, so answering a second attempt over a different set of
  survivors would let the orchestrator subtract two sums.

The client's ephemeral secrets live in this process's memory for the length of one round and are never
written down: an agent that restarts mid-round has simply dropped out of it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from fedhealth.agent._client import OrchestratorClient, SecureRoundGone
from fedhealth.agent._pipeline import TaskRefused
from fedhealth.core import ConfigError, CryptoError, write_private_file
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.governance import spec_hash
from fedhealth.privacy import sqlite_engine
from fedhealth.protocol import FailureCode, SiteAttestation, Task, secure_round_plan
from fedhealth.runtime import secure_codec
from fedhealth.secagg import (
    ConsistencyRequest,
    KeyDirectory,
    KeyReuseGuard,
    SecAggClient,
    SecAggConfig,
    ShareBundle,
    UnmaskRequest,
)

log = logging.getLogger("fedhealth.agent")

# TaskFailure codes of the site's secure-round refusals (their reasons: fixed sentences, no patient data)
SECURE_ROUND_MISSING = FailureCode.SECURE_ROUND_MISSING.value
SECURE_ROUND_MISMATCH = FailureCode.SECURE_ROUND_MISMATCH.value
PEER_KEY_MISMATCH = FailureCode.PEER_KEY_MISMATCH.value
PEER_KEY_CHANGED = FailureCode.PEER_KEY_CHANGED.value
ALREADY_UNMASKED = FailureCode.ALREADY_UNMASKED.value


class PeerPins:
    """Peers' identity keys as first seen in a round the approved spec vouched for, kept in the site home.

    :meth:`check` pins only peers named by ``approved`` (the spec's fingerprints) whose key matches it, and
    refuses a key that differs from its pin, so neither an orchestrator nor a later spec can swap a pinned
    peer's key silently. Re-keying a peer is a steward's decision: compare the fingerprints out of band, then
    remove the pin from ``peers.json``.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pins: dict[str, str] = {}
        self._lock = threading.Lock()
        if path is not None and path.exists():
            self._pins = json.loads(path.read_text())

    def check(self, peer_keys: Mapping[str, str], approved: Mapping[str, str]) -> None:
        """Refuse unless every peer is approved with this key and no pinned key changed; then pin the new."""
        unknown = sorted(set(peer_keys) - set(approved))
        if unknown:
            raise TaskRefused(
                PEER_KEY_MISMATCH,
                f"the round names peers the approved spec does not: {', '.join(unknown)}; refusing the round",
            )
        wrong = sorted(s for s, k in peer_keys.items() if _fingerprint(k) != approved[s])
        if wrong:
            raise TaskRefused(
                PEER_KEY_MISMATCH,
                f"the identity keys given for {', '.join(wrong)} do not match the approved spec's "
                "fingerprints; refusing the round",
            )
        with self._lock:
            changed = sorted(s for s, k in peer_keys.items() if s in self._pins and self._pins[s] != k)
            if changed:
                raise TaskRefused(
                    PEER_KEY_CHANGED,
                    f"the identity keys of {', '.join(changed)} differ from the keys this site pinned; "
                    "refusing the round (a key substitution, or a re-enrolled site: compare fingerprints "
                    "with its steward, then remove its pin from peers.json)",
                )
            new = {s: k for s, k in peer_keys.items() if s not in self._pins}
            if new:
                self._pins.update(new)
                if self.path is not None:
                    write_private_file(self.path, json.dumps(self._pins, indent=2, sort_keys=True).encode())

    def fingerprints(self) -> dict[str, str]:
        return {s: _fingerprint(k) for s, k in sorted(self._pins.items())}


def _fingerprint(key_hex: str) -> str:
    try:
        return PublicIdentity(bytes.fromhex(key_hex)).fingerprint
    except (ValueError, CryptoError):
        return "invalid"


_METADATA = sa.MetaData()
_UNMASKED = sa.Table(
    "site_secagg_unmasked",
    _METADATA,
    sa.Column("spec_hash", sa.String(64), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("study_id", sa.String(128), nullable=False),
    sa.Column("attempt", sa.String(64), nullable=False),
    sa.Column("unmasked_at", sa.String(40), nullable=False),
)


class UnmaskRecord:
    """The site's durable record of the secure rounds it unmasked, in its own database (``site.sqlite``).

    A round is keyed by the hash of its approved spec (not the orchestrator's study id: a second study with
    the same spec is the same computation to the site), its number and its kind. :meth:`claim` inserts the
    key and commits before returning (``synchronous=FULL``), so the record survives a crash that follows;
    a second claim of the same key, from any attempt or agent process, is refused. Without a site home the
    record lives in this process only.
    """

    def __init__(self, engine: sa.Engine | None) -> None:
        self.engine = engine
        self._memory: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()
        if engine is not None:
            _METADATA.create_all(engine)

    @classmethod
    def at(cls, database: Path | None) -> UnmaskRecord:
        return cls(sqlite_engine(database) if database is not None else None)

    def claim(self, task: Task, attempt: str) -> None:
        """Record that ``task``'s round is being unmasked; :class:`TaskRefused` if it was before."""
        key = (spec_hash(task.spec.model_dump(mode="json")), task.round, task.kind.value)
        with self._lock:
            if self.engine is None:
                if key in self._memory:
                    raise _already_unmasked(task)
                self._memory.add(key)
                return
            try:
                with self.engine.begin() as c:
                    c.execute(
                        _UNMASKED.insert().values(
                            spec_hash=key[0],
                            round=key[1],
                            kind=key[2],
                            study_id=task.study_id,
                            attempt=attempt,
                            unmasked_at=datetime.now(UTC).isoformat(),
                        )
                    )
            except sa.exc.IntegrityError:
                raise _already_unmasked(task) from None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def _already_unmasked(task: Task) -> TaskRefused:
    return TaskRefused(
        ALREADY_UNMASKED,
        f"this site already answered the unmask stage of {task.kind.value} round {task.round} of this "
        "study (in an earlier attempt); it answers once per round, so two sums over different sites cannot "
        "be subtracted",
    )


@dataclass(frozen=True, slots=True)
class CheckedRound:
    """A secure round that passed the site's checks: its configuration and the peers' identities."""

    config: SecAggConfig
    peers: dict[str, PublicIdentity]
    attempt: str


def _mismatch(what: str) -> TaskRefused:
    return TaskRefused(
        SECURE_ROUND_MISMATCH,
        f"the secure round's {what} differs from what the approved study spec prescribes; refusing the round",
    )


def check_secure_round(task: Task, site: str, identity: IdentityKey, pins: PeerPins) -> CheckedRound | None:
    """The site's checks of a task's secure round against the approved spec, before any data is read and
    any key advertised; None for a study without secure aggregation. Raises :class:`TaskRefused`."""
    spec = task.spec
    sa_spec = spec.secure_aggregation
    info = task.secure_round
    if sa_spec is None:
        if info is not None:
            raise _mismatch("existence (the study does not use secure aggregation)")
        return None
    if info is None:
        # the downgrade: whatever the task says, a spec that asks for secure aggregation gets nothing in clear
        raise TaskRefused(
            SECURE_ROUND_MISSING,
            "the study requires secure aggregation but the task came without a secure round; this site "
            "sends nothing in clear for it",
        )
    plan = secure_round_plan(spec, task.kind)
    try:
        config = SecAggConfig.from_json(info.config)
    except ConfigError:
        raise _mismatch("configuration") from None
    if config.study_id != f"{task.study_id}/{info.attempt}" or config.round != task.round:
        raise _mismatch("study or round")
    if site not in config.sites or not set(config.sites) <= set(plan.sites):
        raise _mismatch("participant list")
    if config.threshold != plan.threshold:
        raise _mismatch("threshold")
    if config.collusion != plan.collusion:
        raise _mismatch("collusion bound")
    if (
        config.full_graph_max_sites != plan.full_graph_max_sites
        or config.neighbourhood_size != plan.neighbourhood_size
    ):
        raise _mismatch("neighbourhood size")
    if config.vector_length != secure_codec(spec, task.kind).length:
        raise _mismatch("vector length")
    if set(info.peer_keys) != set(config.sites):
        raise _mismatch("peer key list")
    if sa_spec.site_keys[site] != identity.public().fingerprint:
        raise TaskRefused(
            PEER_KEY_MISMATCH,
            "the approved spec names another identity key for this site; refusing the round",
        )
    pins.check(info.peer_keys, sa_spec.site_keys)
    peers = {s: PublicIdentity(bytes.fromhex(k)) for s, k in info.peer_keys.items()}
    return CheckedRound(config=config, peers=peers, attempt=info.attempt)


def bounded_deadline(task: Task) -> datetime:
    """The instant a secure round's (or a collective session's) waits end: the task's deadline, but never
    more than two approved round periods (``round_deadline_s``, in the spec the steward approved) from now,
    the cap ``SiteAgent._until_deadline`` puts on training and transfers. Fixed once, when the exchange
    starts: counted afresh for each long poll, a deadline in the year 9999 (a lying orchestrator, or a site
    clock reset to 1970) let a stage that never closes, or a collective call never answered, hold the site
    for ever, each request retried for as long
    (tests/agent/test_secure_wait_attacks.py)."""
    return min(task.deadline, datetime.now(UTC) + timedelta(seconds=2 * task.spec.round_deadline_s))


def run_secure_exchange(
    client: OrchestratorClient,
    task: Task,
    checked: CheckedRound,
    *,
    site: str,
    identity: IdentityKey,
    guard: KeyReuseGuard,
    record: UnmaskRecord,
    vector: np.ndarray,
    attestation: SiteAttestation | None = None,
    poll_wait_s: float = 25.0,
) -> None:
    """Take part in the task's (checked) secure round with ``vector`` (already quantized by the round's
    codec); ``attestation`` travels with the first message (no per-site figure: metrics are in the sum)."""
    protocol = SecAggClient(
        checked.config,
        site,
        identity,
        checked.peers,
        key_guard=guard,
        before_reveal=reveal_once(record, task, checked.attempt),
    )

    deadline = bounded_deadline(task)

    def left() -> float:
        return max(1.0, (deadline - datetime.now(UTC)).total_seconds())

    def send(stage: str, body: bytes) -> None:
        client.secagg_send(task.task_id, stage, body, max_elapsed_s=left())
        log.info("task %s: sent %s", task.task_id, stage)

    def exchange(stage: str, body: bytes, attestation: SiteAttestation | None = None) -> bytes:
        """Send the stage's message and get the server's answer, in one request when it comes in time."""
        data = client.secagg_send(
            task.task_id,
            stage,
            body,
            wait=min(poll_wait_s, left()),
            attestation=attestation,
            max_elapsed_s=left(),
        )
        log.info("task %s: sent %s", task.task_id, stage)
        return data if data is not None else answer_to(stage)

    def answer_to(stage: str) -> bytes:
        while True:
            data = client.secagg_receive(
                task.task_id, stage, wait=min(poll_wait_s, left()), max_elapsed_s=left()
            )
            if data is not None:
                return data
            if (deadline - datetime.now(UTC)).total_seconds() <= 0:
                raise SecureRoundGone(f"the round deadline passed while waiting after the {stage} stage")

    started = time.perf_counter()
    directory = KeyDirectory.from_bytes(
        exchange("advertise_keys", protocol.advertise_keys().to_bytes(), attestation)
    )
    bundle = ShareBundle.from_bytes(exchange("share_keys", protocol.share_keys(directory).to_bytes()))
    check = ConsistencyRequest.from_bytes(
        exchange("masked_input", protocol.masked_input(bundle, vector).to_bytes())
    )
    request = UnmaskRequest.from_bytes(exchange("consistency", protocol.consistency(check).to_bytes()))
    # the client runs before_reveal (the durable once-per-round record) only after every unmask check passed
    send("unmask", protocol.unmask(request).to_bytes())
    log.info("task %s: secure round done in %.2f s", task.task_id, time.perf_counter() - started)


def reveal_once(record: UnmaskRecord, task: Task, attempt: str) -> Callable[[], None]:
    """The client's ``before_reveal``: durably claim this round's unmask, or refuse (revealing nothing)."""

    def before_reveal() -> None:
        record.claim(task, attempt)

    return before_reveal

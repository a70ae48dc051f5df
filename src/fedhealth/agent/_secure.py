"""The site side of a secure round: pin the peers' identities, then walk the four SecAgg+ stages over HTTPS.

The protocol is ``fedhealth.secagg``'s :class:`SecAggClient`; this module only carries its messages. The
client's ephemeral secrets live in this process's memory for the length of one round and are never written
down: an agent that restarts mid-round has simply dropped out of it.

Peer identity keys come from the orchestrator (they are the keys the sites enrolled), so a site pins each
peer's key the first time it sees it (``peers.json`` in the site home) and refuses a round in which a pinned
peer's key changed: an orchestrator that substitutes keys is caught at the second round at the latest, and a
data steward can compare the pinned fingerprints out of band (``fedhealth site peers``).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fedhealth.agent._client import OrchestratorClient, SecureRoundGone
from fedhealth.agent._pipeline import TaskRefused
from fedhealth.core import sha256_hex
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.protocol import SecureRoundInfo, SiteAttestation, Task
from fedhealth.secagg import (
    KeyDirectory,
    KeyReuseGuard,
    SecAggClient,
    SecAggConfig,
    ShareBundle,
    UnmaskRequest,
)

log = logging.getLogger("fedhealth.agent")


class PeerPins:
    """Trust on first use for peers' identity keys, kept in the site home."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pins: dict[str, str] = {}
        if path is not None and path.exists():
            self._pins = json.loads(path.read_text())

    def check(self, peer_keys: dict[str, str]) -> None:
        changed = sorted(s for s, k in peer_keys.items() if s in self._pins and self._pins[s] != k)
        if changed:
            raise TaskRefused(
                "peer_key_changed",
                f"the identity keys of {', '.join(changed)} differ from the keys this site pinned; refusing "
                "the round (a key substitution, or a re-enrolled site: compare fingerprints, then re-pin)",
            )
        new = {s: k for s, k in peer_keys.items() if s not in self._pins}
        if new:
            self._pins.update(new)
            if self.path is not None:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(self._pins, indent=2, sort_keys=True))
                tmp.replace(self.path)

    def fingerprints(self) -> dict[str, str]:
        return {s: sha256_hex(bytes.fromhex(k)) for s, k in sorted(self._pins.items())}


def run_secure_exchange(
    client: OrchestratorClient,
    task: Task,
    *,
    site: str,
    identity: IdentityKey,
    pins: PeerPins,
    guard: KeyReuseGuard,
    vector: np.ndarray,
    attestation: SiteAttestation | None = None,
    poll_wait_s: float = 25.0,
) -> None:
    """Take part in the task's secure round with ``vector`` (already quantized by the round's codec);
    ``attestation`` travels with the first message (no per-site figure: metrics are inside the sum)."""
    info: SecureRoundInfo | None = task.secure_round
    assert info is not None
    pins.check(info.peer_keys)
    config = SecAggConfig.from_json(info.config)
    peers = {s: PublicIdentity(bytes.fromhex(k)) for s, k in info.peer_keys.items()}
    protocol = SecAggClient(config, site, identity, peers, key_guard=guard)

    def left() -> float:
        return max(1.0, (task.deadline - datetime.now(UTC)).total_seconds())

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
            if (task.deadline - datetime.now(UTC)).total_seconds() <= 0:
                raise SecureRoundGone(f"the round deadline passed while waiting after the {stage} stage")

    started = time.perf_counter()
    directory = KeyDirectory.from_bytes(
        exchange("advertise_keys", protocol.advertise_keys().to_bytes(), attestation)
    )
    bundle = ShareBundle.from_bytes(exchange("share_keys", protocol.share_keys(directory).to_bytes()))
    request = UnmaskRequest.from_bytes(
        exchange("masked_input", protocol.masked_input(bundle, vector).to_bytes())
    )
    send("unmask", protocol.unmask(request).to_bytes())
    log.info("task %s: secure round done in %.2f s", task.task_id, time.perf_counter() - started)

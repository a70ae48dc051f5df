"""A collective session driven in memory for the secagg tests: sites and relay wired together, with hooks to
let the relay lie."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhealth.crypto import IdentityKey
from fedhealth.secagg import CollectiveConfig, CollectiveRelay, CollectiveSite

SPEC_HASH = "ab" * 32


def make_config(sites: Sequence[str], *, attempt: str | None = None, collusion: int = 0) -> CollectiveConfig:
    return CollectiveConfig(
        study_id="study-1",
        round=1,
        attempt=attempt or secrets.token_hex(8),
        spec_hash=SPEC_HASH,
        sites=tuple(sorted(sites)),
        collusion=collusion,
    )


@dataclass
class Session:
    config: CollectiveConfig
    keys: dict[str, IdentityKey]
    sites: dict[str, CollectiveSite]
    relay: CollectiveRelay
    # every body the relay was handed, per (index, site): what the orchestrator sees
    seen: dict[tuple[int, str], bytes] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.config.sites)

    def post(self, bodies: dict[str, bytes], index: int) -> None:
        for site, body in bodies.items():
            self.seen[(index, site)] = body
            self.relay.receive(site, index, body)

    def result(self, index: int) -> bytes:
        out = self.relay.result(index)
        assert out is not None, f"call {index} is not complete"
        return bytes(out)

    def set_up(self) -> None:
        bodies = {s: site.advertise() for s, site in self.sites.items()}
        self.post(bodies, 0)
        result = self.result(0)
        for site in self.sites.values():
            site.establish(result)

    def secure_sum(
        self,
        values: dict[str, np.ndarray],
        *,
        tamper: Callable[[str, bytes], bytes] | None = None,
    ) -> dict[str, np.ndarray]:
        """One sum; ``tamper(site, result)`` may change what the relay sends each site."""
        bodies = {s: self.sites[s].prepare_sum(v) for s, v in values.items()}
        index = self.sites[self.names[0]].pending_index
        self.post(bodies, index)
        result = self.result(index)
        return {
            s: site.complete_sum(tamper(s, result) if tamper is not None else result)
            for s, site in self.sites.items()
        }

    def end(self) -> None:
        bodies = {s: site.prepare_end() for s, site in self.sites.items()}
        index = self.sites[self.names[0]].pending_index
        self.post(bodies, index)
        result = self.result(index)
        for site in self.sites.values():
            site.complete_end(result)


def open_session(sites: Sequence[str] = ("a", "b", "c", "d"), **config: object) -> Session:
    cfg = make_config(sites, **config)  # type: ignore[arg-type]
    keys = {s: IdentityKey.generate() for s in cfg.sites}
    identities = {s: k.public() for s, k in keys.items()}
    members = {s: CollectiveSite(cfg, s, keys[s], identities) for s in cfg.sites}
    return Session(config=cfg, keys=keys, sites=members, relay=CollectiveRelay(cfg, identities))


def fixed_point_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """sum(round(x * 2^40)) / 2^40 in exact integer arithmetic, then one conversion to float64 per entry."""
    flat = [np.asarray(v, dtype=np.float64).reshape(-1) for v in vectors]
    totals = [sum(int(np.rint(v[i] * 2.0**40)) for v in flat) for i in range(flat[0].size)]
    return np.array([float(t) / 2.0**40 for t in totals], dtype=np.float64).reshape(np.shape(vectors[0]))

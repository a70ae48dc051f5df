"""Test helpers: a whole SecAgg+ federation (identities, config, clients, server) in memory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.secagg import (
    ConsistencyRequest,
    KeyDirectory,
    KeyReuseGuard,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    UnmaskRequest,
)


def site_names(n: int) -> tuple[str, ...]:
    return tuple(sorted(f"site-{i:02d}" for i in range(n)))


@dataclass
class Federation:
    config: SecAggConfig
    keys: dict[str, IdentityKey]
    publics: dict[str, PublicIdentity]
    clients: dict[str, SecAggClient]
    server: SecAggServer

    @property
    def sites(self) -> tuple[str, ...]:
        return self.config.sites

    def inputs(self, seed: int = 0) -> dict[str, NDArray[np.uint32]]:
        rng = np.random.default_rng(seed)
        return {
            s: rng.integers(0, 2**32, self.config.vector_length, dtype=np.uint64).astype(np.uint32)
            for s in self.sites
        }

    def advertise(self, sites: tuple[str, ...] | None = None) -> dict[str, KeyDirectory]:
        for s in sites if sites is not None else self.sites:
            self.server.receive(self.clients[s].advertise_keys())
        return self.server.close_stage()  # type: ignore[return-value]

    def share(
        self, directories: Mapping[str, KeyDirectory], sites: tuple[str, ...] | None = None
    ) -> dict[str, ShareBundle]:
        for s in sites if sites is not None else tuple(directories):
            self.server.receive(self.clients[s].share_keys(directories[s]))
        return self.server.close_stage()  # type: ignore[return-value]

    def mask(
        self,
        bundles: Mapping[str, ShareBundle],
        inputs: Mapping[str, NDArray[np.uint32]],
        sites: tuple[str, ...] | None = None,
    ) -> dict[str, ConsistencyRequest]:
        for s in sites if sites is not None else tuple(bundles):
            self.server.receive(self.clients[s].masked_input(bundles[s], inputs[s]))
        return self.server.close_stage()  # type: ignore[return-value]

    def sign(
        self, checks: Mapping[str, ConsistencyRequest], sites: tuple[str, ...] | None = None
    ) -> dict[str, UnmaskRequest]:
        for s in sites if sites is not None else tuple(checks):
            self.server.receive(self.clients[s].consistency(checks[s]))
        return self.server.close_stage()  # type: ignore[return-value]

    def unmask(self, requests: Mapping[str, UnmaskRequest], sites: tuple[str, ...] | None = None) -> None:
        for s in sites if sites is not None else tuple(requests):
            self.server.receive(self.clients[s].unmask(requests[s]))
        self.server.close_stage()


def make_federation(
    n: int,
    threshold: int | None = None,
    length: int = 5,
    *,
    study: str = "study-1",
    round_number: int = 0,
    collusion: int = 0,
    full_graph_max_sites: int = 20,
    neighbourhood_size: int | None = None,
    keys: Mapping[str, IdentityKey] | None = None,
    guards: Mapping[str, KeyReuseGuard] | None = None,
    server_checks_signatures: bool = False,
) -> Federation:
    names = site_names(n)
    config = SecAggConfig(
        study_id=study,
        round=round_number,
        sites=names,
        threshold=threshold if threshold is not None else n // 2 + 1,
        vector_length=length,
        collusion=collusion,
        full_graph_max_sites=full_graph_max_sites,
        neighbourhood_size=neighbourhood_size,
    )
    identity = dict(keys) if keys is not None else {s: IdentityKey.generate() for s in names}
    publics = {s: k.public() for s, k in identity.items()}
    clients = {
        s: SecAggClient(config, s, identity[s], publics, key_guard=None if guards is None else guards[s])
        for s in names
    }
    server = SecAggServer(config, identities=publics if server_checks_signatures else None)
    return Federation(config=config, keys=identity, publics=publics, clients=clients, server=server)


def plain_sum(inputs: Mapping[str, NDArray[np.uint32]], sites: Iterable[str]) -> NDArray[np.uint64]:
    """The reference: the named sites' inputs summed in uint64, reduced mod 2**32."""
    chosen = [inputs[s].astype(np.uint64) for s in sites]
    return np.sum(np.stack(chosen), axis=0) % (1 << 32)

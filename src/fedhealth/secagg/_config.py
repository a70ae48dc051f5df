"""The value every party of one SecAgg+ round agrees on, and the neighbourhood graph it determines.

Thresholds (see :class:`SecAggConfig`):

- ``threshold`` (t) is the fewest sites that must answer every stage; below it the round fails. We enforce
  ``n/2 < t <= n``: an honest client reveals, for each peer, either the share of its self-mask seed or the
  share of its pairwise key, never both, so a server that tells different clients different stories about who
  dropped gets each kind from disjoint sets of clients, and two disjoint sets cannot both reach a strict
  majority. That is why no separate consistency-check round is needed.
- With the full graph (n <= ``full_graph_max_sites``) every site shares its secrets with all n sites (itself
  included) and the Shamir threshold is t itself.
- Above that size each site has k neighbours on a random k-regular graph (Bell et al. 2020: a Harary graph
  H(n, k) whose node labels are permuted by a public seed), shares with its k neighbours and itself, and the
  Shamir threshold is a strict majority of those k + 1 holders, for the same disjointness argument inside
  every neighbourhood. By default k = 3 * ceil(log2 n), rounded up to an even number; the round then survives
  a site dropping unless more than half of some neighbourhood dropped too, which for random dropouts is
  unlikely but not impossible (it fails cleanly with ``NEIGHBOURHOOD_TOO_SMALL``). Raise k for more margin.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fedhealth.core import ConfigError, canonical_json, is_valid_name
from fedhealth.crypto import derive_key
from fedhealth.secagg._crypto_extra import seeded_permutation

PROTOCOL_VERSION = "fedhealth-secagg+/1"
MAX_VECTOR_LENGTH = 1 << 28  # 1 GiB of uint32: far above any model we ship, well below numpy's limits
MAX_SITES = 10_000
SEED_BYTES = 32


def default_degree(n: int) -> int:
    """Bell et al.'s logarithmic neighbourhood size: 3 * ceil(log2 n), even, at most n - 1."""
    k = 3 * math.ceil(math.log2(max(n, 2)))
    k += k % 2
    return min(k, n - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggConfig:
    """One round's public parameters. Every client signs its keys together with this value's digest."""

    study_id: str
    round: int
    sites: tuple[str, ...]
    threshold: int
    vector_length: int
    full_graph_max_sites: int = 20
    neighbourhood_size: int | None = None
    graph_seed: bytes | None = None
    protocol_version: str = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.study_id, str) or not 0 < len(self.study_id) <= 128:
            raise ConfigError("study_id must be a non-empty string of at most 128 characters")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ConfigError("round must be a non-negative integer")
        if not isinstance(self.sites, tuple) or not all(isinstance(s, str) for s in self.sites):
            raise ConfigError("sites must be a tuple of site ids")
        bad = [s for s in self.sites if not is_valid_name(s)]
        if bad:
            raise ConfigError(f"invalid site ids: {bad}")
        if list(self.sites) != sorted(set(self.sites)):
            raise ConfigError("sites must be sorted and distinct")
        n = len(self.sites)
        if not 2 <= n <= MAX_SITES:
            raise ConfigError(f"secure aggregation needs 2..{MAX_SITES} sites, got {n}")
        if not n // 2 < self.threshold <= n:
            raise ConfigError(f"threshold must be a strict majority of the {n} sites and at most {n}")
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise ConfigError(f"vector_length must be within 1..{MAX_VECTOR_LENGTH}")
        if self.full_graph_max_sites < 2:
            raise ConfigError("full_graph_max_sites must be at least 2")
        if self.neighbourhood_size is not None and (
            self.neighbourhood_size % 2 or not 2 <= self.neighbourhood_size <= n - 1
        ):
            raise ConfigError(f"neighbourhood_size must be even and within 2..{n - 1}")
        if self.graph_seed is not None and len(self.graph_seed) != SEED_BYTES:
            raise ConfigError("graph_seed is 32 bytes")
        if self.protocol_version != PROTOCOL_VERSION:
            raise ConfigError(f"unsupported protocol version {self.protocol_version!r}")

    @property
    def n(self) -> int:
        return len(self.sites)

    @property
    def full_graph(self) -> bool:
        """Whether every pair of sites are neighbours."""
        return self.n <= self.full_graph_max_sites or self.degree == self.n - 1

    @property
    def degree(self) -> int:
        """k: how many neighbours each site has."""
        if self.n <= self.full_graph_max_sites:
            return self.n - 1
        return self.neighbourhood_size if self.neighbourhood_size is not None else default_degree(self.n)

    @property
    def share_threshold(self) -> int:
        """How many of a site's k + 1 share holders reconstruct its secrets."""
        return self.threshold if self.full_graph else (self.degree + 1) // 2 + 1

    def x_of(self, site_id: str) -> int:
        """A site's Shamir x-coordinate: its 1-based position in ``sites``."""
        try:
            return self.sites.index(site_id) + 1
        except ValueError:
            raise ConfigError(f"{site_id!r} is not a site of this round") from None

    def context(self) -> dict[str, object]:
        """What every derivation and signature binds: protocol, study, round."""
        return {"protocol": self.protocol_version, "study": self.study_id, "round": self.round}

    def effective_graph_seed(self) -> bytes:
        if self.graph_seed is not None:
            return self.graph_seed
        # a public value all parties compute alike; the orchestrator may set a fresh one per round instead
        return derive_key(b"\x00" * SEED_BYTES, {**self.context(), "purpose": "secagg-default-graph-seed"})

    def to_json(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "round": self.round,
            "sites": list(self.sites),
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "full_graph_max_sites": self.full_graph_max_sites,
            "neighbourhood_size": self.neighbourhood_size,
            "graph_seed": None if self.graph_seed is None else self.graph_seed.hex(),
            "protocol_version": self.protocol_version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecAggConfig:
        try:
            seed = data.get("graph_seed")
            return cls(
                study_id=data["study_id"],
                round=data["round"],
                sites=tuple(data["sites"]),
                threshold=data["threshold"],
                vector_length=data["vector_length"],
                full_graph_max_sites=data.get("full_graph_max_sites", 20),
                neighbourhood_size=data.get("neighbourhood_size"),
                graph_seed=None if seed is None else bytes.fromhex(seed),
                protocol_version=data.get("protocol_version", PROTOCOL_VERSION),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed SecAgg+ configuration: {exc}") from exc

    def digest(self) -> bytes:
        """sha256 of the canonical JSON: the round's identity, signed into every key advertisement."""
        return hashlib.sha256(canonical_json(self.to_json())).digest()

    def graph(self) -> NeighbourhoodGraph:
        return _graph_of(self)


@dataclass(frozen=True, slots=True)
class NeighbourhoodGraph:
    """Who shares secrets and masks with whom in one round."""

    sites: tuple[str, ...]
    neighbours: Mapping[str, frozenset[str]] = field(repr=False)

    @classmethod
    def build(cls, config: SecAggConfig) -> NeighbourhoodGraph:
        sites = config.sites
        n = len(sites)
        if config.full_graph:
            everyone = frozenset(sites)
            return cls(sites, {s: everyone - {s} for s in sites})
        key = derive_key(
            config.effective_graph_seed(), {**config.context(), "purpose": "secagg-neighbourhood-graph"}
        )
        order = [sites[i] for i in seeded_permutation(key, n)]
        half = config.degree // 2
        neighbours = {
            order[p]: frozenset(order[(p + d) % n] for d in range(-half, half + 1) if d != 0)
            for p in range(n)
        }
        return cls(sites, neighbours)

    def of(self, site_id: str) -> frozenset[str]:
        return self.neighbours[site_id]

    def holders(self, site_id: str) -> frozenset[str]:
        """The sites that hold shares of ``site_id``'s secrets: its neighbours and itself."""
        return self.neighbours[site_id] | {site_id}

    def is_connected(self, subset: Iterable[str]) -> bool:
        """Whether the graph restricted to ``subset`` is connected (an empty subset is not)."""
        members = set(subset)
        if not members:
            return False
        start = next(iter(members))
        seen = {start}
        stack = [start]
        while stack:
            for nb in self.neighbours[stack.pop()]:
                if nb in members and nb not in seen:
                    seen.add(nb)
                    stack.append(nb)
        return seen == members


@lru_cache(maxsize=64)
def _graph_of(config: SecAggConfig) -> NeighbourhoodGraph:
    # every client and the server of a simulated round share one config; build its graph once
    return NeighbourhoodGraph.build(config)

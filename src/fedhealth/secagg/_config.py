"""The value every party of one SecAgg+ round agrees on, the rules its thresholds obey, and the neighbourhood
graph it determines once the sites have advertised their keys.

Thresholds (see :class:`SecAggConfig`; the argument is written out in docs/secure-aggregation.md):

- ``collusion`` (c) is how many sites may collude with a malicious server. The round threshold t must satisfy
  ``2t > n + c`` and ``t <= n``: an honest site reveals shares only after seeing t signatures, from sites of
  the survivor set, over exactly the set it signed itself; two different sets would need t signatures each,
  so at least 2(t - c) honest signers, more than the n - c honest sites there are.
- With the full graph (n <= ``full_graph_max_sites``) every site shares its secrets with all n sites (itself
  included) and the Shamir threshold is t itself.
- Above that size each site has k neighbours on a random k-regular graph (Bell et al. 2020: a Harary graph
  H(n, k) whose node labels are permuted by a seed the sites' signed advertisements determine, see
  :func:`graph_for`), shares with its k neighbours and itself, and the Shamir threshold s is the local form
  of the same rule, ``2s > k + 1 + c``. The round also requires ``s >= c + 2`` (``k >= c + 1``, see
  :func:`min_degree`): then c colluders and a malicious server learn no sum over fewer than s - c >= 2
  honest sites, whatever the graph, so a colluder grinding the graph seed gains nothing.
- The default k is ``3 * ceil(log2 n) + c``, even (:func:`default_degree`): a neighbourhood then survives
  about ``1.5 * log2 n`` dropouts, as Bell et al.'s default does without colluders.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fedhealth.core import ConfigError, canonical_json, is_valid_name
from fedhealth.secagg._crypto_extra import derive, seeded_permutation

PROTOCOL_VERSION = "fedhealth-secagg+/2"
MAX_VECTOR_LENGTH = 1 << 28  # 1 GiB of uint32: far above any model we ship, well below numpy's limits
MAX_SITES = 10_000
SEED_BYTES = 32


def _even(k: int) -> int:
    return k + k % 2


def default_degree(n: int, collusion: int = 0) -> int:
    """Bell et al.'s logarithmic neighbourhood size 3 * ceil(log2 n), plus c so that colluders do not eat
    into the dropouts a neighbourhood survives; even, at most n - 1 (which is the full graph)."""
    return min(_even(3 * math.ceil(math.log2(max(n, 2))) + collusion), n - 1)


def min_degree(n: int, collusion: int) -> int:
    """The smallest even neighbourhood size k with share threshold s >= c + 2, i.e. k >= c + 1 (may exceed
    n - 1: then only the full graph is allowed)."""
    return max(2, _even(collusion + 1))


def sparse_share_threshold(degree: int, collusion: int) -> int:
    """The smallest s with 2s > k + 1 + c: a strict majority of the k + 1 holders beyond the c colluders."""
    return (degree + 1 + collusion) // 2 + 1


def min_threshold(n: int, collusion: int) -> int:
    """The smallest t with 2t > n + c."""
    return (n + collusion) // 2 + 1


def threshold_problem(n: int, threshold: int, collusion: int, min_sites: int = 0) -> str | None:
    """Why ``threshold`` is not safe for ``n`` sites tolerating ``collusion`` colluding sites, with the
    arithmetic, or None when it is. ``min_sites`` is the study's quorum: a threshold below it would let the
    server unmask a sum of fewer sites than the study accepts."""
    site_s = "site" if n == 1 else "sites"
    colluding = "colluding site" if collusion == 1 else "colluding sites"
    if collusion < 0:
        return f"the collusion bound must be at least 0, got {collusion}"
    if threshold > n:
        return f"threshold {threshold} exceeds the {n} {site_s} of the round: use t <= {n}"
    if threshold < min_sites:
        return f"threshold {threshold} is below the study's quorum of {min_sites} sites: use t >= {min_sites}"
    if 2 * threshold <= n + collusion:
        least = min_threshold(n, collusion)
        fix = (
            f"use t >= {least}"
            if least <= n
            else f"no threshold works with {n} {site_s}: tolerate at most {n - 1} colluding sites"
        )
        return (
            f"threshold {threshold} with {n} {site_s} tolerating {collusion} {colluding} needs 2t > n + c: "
            f"{2 * threshold} > {n + collusion} is false; {fix}"
        )
    return None


def neighbourhood_problem(n: int, degree: int, collusion: int) -> str | None:
    """Why a sparse round of ``n`` sites with neighbourhood size ``degree`` is not safe against
    ``collusion`` colluding sites, with the arithmetic, or None when it is."""
    if degree % 2 or not 2 <= degree <= n - 1:
        return f"the neighbourhood size must be even and within 2..{n - 1}, got {degree}"
    s = sparse_share_threshold(degree, collusion)
    if s > degree + 1:
        return (
            f"neighbourhood size {degree} tolerating {collusion} colluding sites needs a share threshold "
            f"s = floor((k + 1 + c) / 2) + 1 = {s} of only k + 1 = {degree + 1} holders; "
            f"use k >= {min_degree(n, collusion)}"
        )
    if s < collusion + 2:
        return (
            f"neighbourhood size {degree} with {collusion} colluding sites gives share threshold "
            f"s = floor((k + 1 + c) / 2) + 1 = {s}, and sparse mode needs s >= c + 2 = {collusion + 2} "
            f"(else c colluders and the server learn single inputs); use k >= {min_degree(n, collusion)}"
        )
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggConfig:
    """One round's public parameters. Every client signs its keys together with this value's digest.

    The neighbourhood graph is not part of it: its seed comes from the sites' signed advertisements
    (:func:`fedhealth.secagg._derive.graph_seed`), so the orchestrator cannot choose it alone.
    """

    study_id: str
    round: int
    sites: tuple[str, ...]
    threshold: int
    vector_length: int
    collusion: int = 0
    full_graph_max_sites: int = 20
    neighbourhood_size: int | None = None
    protocol_version: str = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.study_id, str) or not 0 < len(self.study_id) <= 128:
            raise ConfigError("study_id must be a non-empty string of at most 128 characters")
        for name in ("round", "threshold", "vector_length", "collusion", "full_graph_max_sites"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer")
        if self.round < 0:
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
        if self.threshold < 1:
            raise ConfigError("threshold must be at least 1")
        problem = threshold_problem(n, self.threshold, self.collusion)
        if problem is not None:
            raise ConfigError(problem)
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise ConfigError(f"vector_length must be within 1..{MAX_VECTOR_LENGTH}")
        if self.full_graph_max_sites < 2:
            raise ConfigError("full_graph_max_sites must be at least 2")
        if self.neighbourhood_size is not None and (
            isinstance(self.neighbourhood_size, bool)
            or not isinstance(self.neighbourhood_size, int)
            or self.neighbourhood_size % 2
            or not 2 <= self.neighbourhood_size <= n - 1
        ):
            raise ConfigError(f"neighbourhood_size must be even and within 2..{n - 1}")
        if not self.full_graph:
            problem = neighbourhood_problem(n, self.degree, self.collusion)
            if problem is not None:
                raise ConfigError(problem)
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
        if self.neighbourhood_size is not None:
            return self.neighbourhood_size
        return default_degree(self.n, self.collusion)

    @property
    def share_threshold(self) -> int:
        """How many of a site's k + 1 share holders reconstruct its secrets: t with the full graph, else the
        smallest s with 2s > k + 1 + c."""
        if self.full_graph:
            return self.threshold
        return sparse_share_threshold(self.degree, self.collusion)

    @property
    def privacy_bound(self) -> int:
        """The fewest honest sites in any sum a malicious server with ``collusion`` colluders can learn:
        t - c with the full graph, s - c with neighbourhoods (docs/secure-aggregation.md)."""
        return self.share_threshold - self.collusion

    def x_of(self, site_id: str) -> int:
        """A site's Shamir x-coordinate: its 1-based position in ``sites``."""
        try:
            return self.sites.index(site_id) + 1
        except ValueError:
            raise ConfigError(f"{site_id!r} is not a site of this round") from None

    def context(self) -> dict[str, object]:
        """What every derivation and signature binds: protocol, study, round."""
        return {"protocol": self.protocol_version, "study": self.study_id, "round": self.round}

    def to_json(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "round": self.round,
            "sites": list(self.sites),
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "collusion": self.collusion,
            "full_graph_max_sites": self.full_graph_max_sites,
            "neighbourhood_size": self.neighbourhood_size,
            "protocol_version": self.protocol_version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecAggConfig:
        try:
            if "graph_seed" in data:
                # an orchestrator-chosen graph seed is exactly what this protocol version refuses
                raise ConfigError("graph_seed is not a configuration field: the sites' keys determine it")
            return cls(
                study_id=data["study_id"],
                round=data["round"],
                sites=tuple(data["sites"]),
                threshold=data["threshold"],
                vector_length=data["vector_length"],
                collusion=data["collusion"],
                full_graph_max_sites=data["full_graph_max_sites"],
                neighbourhood_size=data["neighbourhood_size"],
                protocol_version=data["protocol_version"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed SecAgg+ configuration: {exc}") from exc

    def digest(self) -> bytes:
        """sha256 of the canonical JSON: the round's identity, signed into every key advertisement."""
        return hashlib.sha256(canonical_json(self.to_json())).digest()


@dataclass(frozen=True, slots=True)
class NeighbourhoodGraph:
    """Who shares secrets and masks with whom in one round."""

    sites: tuple[str, ...]
    neighbours: Mapping[str, frozenset[str]] = field(repr=False)

    @classmethod
    def build(cls, config: SecAggConfig, seed: bytes) -> NeighbourhoodGraph:
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ConfigError("a graph seed is 32 bytes")
        sites = config.sites
        n = len(sites)
        if config.full_graph:
            everyone = frozenset(sites)
            return cls(sites, {s: everyone - {s} for s in sites})
        context: dict[str, str | int | list[str]] = {
            "protocol": config.protocol_version,
            "study": config.study_id,
            "round": config.round,
            "purpose": "secagg-neighbourhood-graph",
        }
        order = [sites[i] for i in seeded_permutation(derive(seed, context), n)]
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
def graph_for(config: SecAggConfig, seed: bytes) -> NeighbourhoodGraph:
    """The round's graph for a seed (the full graph ignores it). Cached: every client and the server of a
    simulated round build the same one."""
    return NeighbourhoodGraph.build(config, seed)

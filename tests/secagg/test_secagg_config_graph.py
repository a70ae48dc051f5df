"""Round configuration and the neighbourhood graph: validation, k-regularity, connectivity, determinism."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_federation import site_names

from fedhealth.core import ConfigError
from fedhealth.secagg import SecAggConfig, default_degree
from fedhealth.secagg._crypto_extra import seeded_permutation


def _config(n: int, **kw: object) -> SecAggConfig:
    fields: dict[str, object] = {
        "study_id": "s",
        "round": 0,
        "sites": site_names(n),
        "threshold": n // 2 + 1,
        "vector_length": 4,
    }
    fields.update(kw)
    return SecAggConfig(**fields)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.integers(5, 300), st.binary(min_size=32, max_size=32), st.data())
def test_graph_is_k_regular_symmetric_and_connected(n: int, seed: bytes, data: st.DataObject) -> None:
    k = data.draw(st.sampled_from([d for d in range(2, n - 1, 2)] or [2]))
    config = _config(n, full_graph_max_sites=4, neighbourhood_size=k, graph_seed=seed)
    graph = config.graph()
    assert not config.full_graph
    for site in config.sites:
        nbs = graph.of(site)
        assert len(nbs) == k
        assert site not in nbs
        assert all(site in graph.of(nb) for nb in nbs)
    assert graph.is_connected(config.sites)


def test_graph_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    one = _config(60, graph_seed=b"\x01" * 32).graph()
    same = _config(60, graph_seed=b"\x01" * 32).graph()
    other = _config(60, graph_seed=b"\x02" * 32).graph()
    assert one.neighbours == same.neighbours
    assert one.neighbours != other.neighbours


def test_default_graph_seed_is_bound_to_study_and_round() -> None:
    a = _config(60).graph()
    b = _config(60, round=1).graph()
    c = _config(60, study_id="t").graph()
    assert a.neighbours == _config(60).graph().neighbours
    assert a.neighbours != b.neighbours
    assert a.neighbours != c.neighbours


def test_small_federations_use_the_full_graph() -> None:
    config = _config(20)
    assert config.full_graph
    assert config.degree == 19
    assert config.share_threshold == config.threshold
    graph = config.graph()
    assert all(graph.of(s) == set(config.sites) - {s} for s in config.sites)


@pytest.mark.parametrize("n", [21, 50, 100, 1000, 10_000])
def test_default_degree_grows_logarithmically_and_is_even(n: int) -> None:
    k = default_degree(n)
    assert k % 2 == 0
    assert k == min(n - 1, 3 * math.ceil(math.log2(n)) + (3 * math.ceil(math.log2(n))) % 2)
    config = _config(n)
    assert config.degree == k
    assert config.share_threshold == (k + 1) // 2 + 1  # a strict majority of the k + 1 holders


def test_connectivity_of_subsets() -> None:
    config = _config(10, full_graph_max_sites=2, neighbourhood_size=2)  # a ring
    graph = config.graph()
    ring = [config.sites[0]]
    while len(ring) < 10:
        ring.append(next(nb for nb in sorted(graph.of(ring[-1])) if nb not in ring))
    assert graph.is_connected(ring[:5])
    assert not graph.is_connected(ring[:3] + ring[5:8])
    assert not graph.is_connected([])


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 200))
def test_seeded_permutation_is_a_permutation(seed: bytes, n: int) -> None:
    perm = seeded_permutation(seed, n)
    assert sorted(perm) == list(range(n))
    assert perm == seeded_permutation(seed, n)


def test_seeded_permutation_is_roughly_uniform() -> None:
    # every element lands in every position about equally often over many seeds
    n, trials = 4, 2400
    counts = [[0] * n for _ in range(n)]
    for i in range(trials):
        for pos, value in enumerate(seeded_permutation(i.to_bytes(32, "big"), n)):
            counts[pos][value] += 1
    expected = trials / n
    sigma = math.sqrt(trials * (1 / n) * (1 - 1 / n))
    assert all(abs(c - expected) < 5 * sigma for row in counts for c in row)


@pytest.mark.parametrize(
    "changes",
    [
        {"study_id": ""},
        {"round": -1},
        {"round": True},
        {"sites": ("site-01", "site-00", "site-02")},
        {"sites": ("site-00", "site-00", "site-01")},
        {"sites": ("Site A", "site-b", "site-c")},
        {"sites": ("site-00",), "threshold": 1},
        {"sites": ["site-00", "site-01", "site-02"]},
        {"threshold": 1},  # not a strict majority of 3
        {"threshold": 4},
        {"vector_length": 0},
        {"full_graph_max_sites": 1},
        {"neighbourhood_size": 3},
        {"neighbourhood_size": 0},
        {"graph_seed": b"short"},
        {"protocol_version": "flower-secaggplus"},
    ],
)
def test_invalid_configurations_are_refused(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "study_id": "s",
        "round": 0,
        "sites": ("site-00", "site-01", "site-02"),
        "threshold": 2,
        "vector_length": 4,
    }
    fields.update(changes)
    with pytest.raises(ConfigError):
        SecAggConfig(**fields)  # type: ignore[arg-type]


def test_config_json_round_trip_and_digest_binds_every_field() -> None:
    config = _config(30, graph_seed=b"\x07" * 32, neighbourhood_size=6)
    again = SecAggConfig.from_json(config.to_json())
    assert again == config
    assert again.digest() == config.digest()
    assert _config(30, graph_seed=b"\x07" * 32, neighbourhood_size=8).digest() != config.digest()
    assert (
        _config(30, graph_seed=b"\x07" * 32, neighbourhood_size=6, vector_length=5).digest()
        != config.digest()
    )
    with pytest.raises(ConfigError):
        SecAggConfig.from_json({"study_id": "s"})


def test_x_coordinates_are_positions_and_unknown_sites_are_refused() -> None:
    config = _config(3)
    assert [config.x_of(s) for s in config.sites] == [1, 2, 3]
    with pytest.raises(ConfigError):
        config.x_of("site-99")

"""Round configuration and the neighbourhood graph: validation and its arithmetic, k-regularity, connectivity,
determinism, and a digest that binds every field."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_federation import site_names

from fedhealth.core import ConfigError
from fedhealth.secagg import (
    SecAggConfig,
    default_degree,
    graph_for,
    min_degree,
    min_threshold,
    neighbourhood_problem,
    sparse_share_threshold,
    threshold_problem,
)
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
    config = _config(n, full_graph_max_sites=4, neighbourhood_size=k)
    graph = graph_for(config, seed)
    assert not config.full_graph
    for site in config.sites:
        nbs = graph.of(site)
        assert len(nbs) == k
        assert site not in nbs
        assert all(site in graph.of(nb) for nb in nbs)
    assert graph.is_connected(config.sites)


def test_graph_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    one = graph_for(_config(60), b"\x01" * 32)
    same = graph_for(_config(60), b"\x01" * 32)
    other = graph_for(_config(60), b"\x02" * 32)
    assert one.neighbours == same.neighbours
    assert one.neighbours != other.neighbours


def test_one_seed_gives_different_graphs_in_other_studies_and_rounds() -> None:
    seed = b"\x03" * 32
    a = graph_for(_config(60), seed)
    b = graph_for(_config(60, round=1), seed)
    c = graph_for(_config(60, study_id="t"), seed)
    assert a.neighbours != b.neighbours
    assert a.neighbours != c.neighbours


def test_graph_seed_must_be_32_bytes() -> None:
    with pytest.raises(ConfigError):
        graph_for(_config(60), b"short")


def test_small_federations_use_the_full_graph() -> None:
    config = _config(20)
    assert config.full_graph
    assert config.degree == 19
    assert config.share_threshold == config.threshold
    graph = graph_for(config, bytes(32))
    assert all(graph.of(s) == set(config.sites) - {s} for s in config.sites)


@pytest.mark.parametrize(
    ("n", "collusion", "k"),
    [
        # 3 * ceil(log2 n) + c, rounded up to even, at most n - 1; worked out by hand
        (4, 0, 3),  # 6 > n - 1: the full graph
        (21, 0, 16),  # log2 21 = 4.4 -> 5 -> 15 -> 16
        (50, 0, 18),  # 5.6 -> 6 -> 18
        (100, 0, 22),  # 6.6 -> 7 -> 21 -> 22
        (1000, 0, 30),  # 9.97 -> 10 -> 30
        (10_000, 0, 42),  # 13.3 -> 14 -> 42
        (100, 33, 54),  # 21 + 33
        (25, 8, 24),  # 15 + 8 = 23 -> 24 = n - 1: the full graph
    ],
)
def test_default_degree_grows_logarithmically_plus_the_colluders(n: int, collusion: int, k: int) -> None:
    assert default_degree(n, collusion) == k


@pytest.mark.parametrize(
    ("k", "collusion", "s"),
    [(4, 0, 3), (22, 0, 12), (4, 1, 4), (16, 8, 13), (54, 33, 45), (10, 9, 11)],
)
def test_sparse_share_threshold_values(k: int, collusion: int, s: int) -> None:
    assert sparse_share_threshold(k, collusion) == s


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 400), st.integers(0, 200))
def test_sparse_share_threshold_is_the_least_beyond_half_of_holders_and_colluders(k: int, c: int) -> None:
    s = sparse_share_threshold(k, c)
    # two groups of s holders overlap in more than the c colluders (2s > k + 1 + c), and s - 1 would not
    assert 2 * s > k + 1 + c
    assert 2 * (s - 1) <= k + 1 + c


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 500), st.integers(0, 499))
def test_min_threshold_is_the_least_t_with_2t_above_n_plus_c(n: int, c: int) -> None:
    t = min_threshold(n, c)
    assert 2 * t > n + c
    assert 2 * (t - 1) <= n + c
    assert (threshold_problem(n, t, c) is None) == (t <= n)
    assert threshold_problem(n, t - 1, c) is not None


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 60))
def test_min_degree_is_the_least_even_size_with_a_safe_share_threshold(c: int) -> None:
    n = 500
    allowed = [k for k in range(2, n, 2) if neighbourhood_problem(n, k, c) is None]
    assert min_degree(n, c) == allowed[0]
    assert sparse_share_threshold(allowed[0], c) >= c + 2
    assert all(sparse_share_threshold(k, c) >= c + 2 for k in allowed)


def test_the_default_configuration_is_valid_for_every_collusion_a_threshold_allows() -> None:
    for n in (21, 25, 40, 100, 300):
        for c in range(0, n // 3 + 1):
            config = _config(n, threshold=min_threshold(n, c), collusion=c)
            assert config.share_threshold - c >= 2 or config.full_graph


def test_threshold_problem_states_the_arithmetic() -> None:
    assert threshold_problem(5, 3, 1) == (
        "threshold 3 with 5 sites tolerating 1 colluding site needs 2t > n + c: 6 > 6 is false; use t >= 4"
    )
    assert threshold_problem(5, 4, 1) is None
    assert threshold_problem(5, 4, 1, min_sites=5) == (
        "threshold 4 is below the study's quorum of 5 sites: use t >= 5"
    )
    assert threshold_problem(5, 6, 0) == "threshold 6 exceeds the 5 sites of the round: use t <= 5"
    message = threshold_problem(4, 4, 4)
    assert message is not None
    assert "8 > 8 is false" in message
    assert "at most 3 colluding sites" in message
    assert threshold_problem(4, 4, -1) is not None


def test_sparse_mode_refuses_a_neighbourhood_too_small_for_the_colluders_with_the_arithmetic() -> None:
    with pytest.raises(ConfigError) as info:
        _config(40, threshold=30, collusion=10, full_graph_max_sites=4, neighbourhood_size=8)
    # k = 8, c = 10: s = floor(19 / 2) + 1 = 10 > c + 2? no: 10 < 12
    assert "s = floor((k + 1 + c) / 2) + 1 = 10" in str(info.value)
    assert "use k >= 12" in str(info.value)
    ok = _config(40, threshold=30, collusion=10, full_graph_max_sites=4, neighbourhood_size=12)
    assert ok.share_threshold == 12 == ok.collusion + 2


def test_connectivity_of_subsets() -> None:
    config = _config(10, full_graph_max_sites=2, neighbourhood_size=2)  # a ring
    graph = graph_for(config, bytes(32))
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
        {"threshold": 2, "collusion": 1},  # 2t > n + c: 4 > 4 is false
        {"collusion": -1},
        {"collusion": True},
        {"threshold": 2.0},
        {"vector_length": 0},
        {"full_graph_max_sites": 1},
        {"neighbourhood_size": 3},
        {"neighbourhood_size": 0},
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
    config = _config(30, threshold=20, collusion=3, full_graph_max_sites=10, neighbourhood_size=10)
    again = SecAggConfig.from_json(config.to_json())
    assert again == config
    assert again.digest() == config.digest()
    # one valid change per field; the set of fields is read from the class, so a new field must be added here
    changes: dict[str, object] = {
        "study_id": "s2",
        "round": 1,
        "sites": (*config.sites[:-1], "site-99"),
        "threshold": 21,
        "vector_length": 5,
        "collusion": 2,
        "full_graph_max_sites": 11,
        "neighbourhood_size": 12,
    }
    fields = {f.name for f in dataclasses.fields(SecAggConfig)}
    assert set(changes) == fields - {"protocol_version"}  # the only version this code accepts
    digests = {config.digest()}
    for name, value in changes.items():
        variant = dataclasses.replace(config, **{name: value})
        assert variant.digest() not in digests, name
        digests.add(variant.digest())
    assert config.to_json()["protocol_version"] == config.protocol_version  # and it is hashed in
    assert set(config.to_json()) == fields


def test_config_from_json_refuses_missing_fields_and_an_orchestrator_chosen_graph_seed() -> None:
    full = _config(30, threshold=20).to_json()
    for name in full:
        partial = {k: v for k, v in full.items() if k != name}
        with pytest.raises(ConfigError):
            SecAggConfig.from_json(partial)
    with pytest.raises(ConfigError):
        SecAggConfig.from_json({**full, "graph_seed": "00" * 32})


def test_x_coordinates_are_positions_and_unknown_sites_are_refused() -> None:
    config = _config(3)
    assert [config.x_of(s) for s in config.sites] == [1, 2, 3]
    with pytest.raises(ConfigError):
        config.x_of("site-99")

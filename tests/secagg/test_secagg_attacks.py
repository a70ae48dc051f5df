"""Finding 1 of issue 10, as the issue describes it, against real clients: refused now, exact before.

A malicious server with no colluding site delivers to a victim X only the share boxes of a subset M of its
neighbours (so X masks with M only), then tells the sites stories about who survived so that it collects X's
self-mask-seed shares from some sites and M's pairwise-key shares from others, and removes every mask from X's
input. Each plan runs twice on the same adversary model (``secagg_adversary``):

- with the client's survivor and signature checks replaced by the checks the client made before the fix
  (it is among the survivors, at least t of them, connected; no signatures): X's input comes out exactly
  (this commit's parent ran the same plans on the unmodified old client: ``git log -- this file``);
- with the real client: refused, and no sum over fewer honest sites than the guarantee is computable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from secagg_adversary import Adversary, closure, plain_sum, revealable, unmask_sum, violations
from secagg_federation import site_names

from fedhealth.secagg import (
    FailureReason,
    RoundFailedError,
    SecAggClient,
    SecAggConfig,
    SecAggSecurityError,
    Stage,
    UnmaskRequest,
)

Plan = Callable[[Adversary], str]  # plays the round, returns the victim


def _old_survivor_checks(self: SecAggClient, survivors: frozenset[str]) -> None:
    # what the client checked before the fix (at unmask): it is a survivor, t of them, connected
    assert self._graph is not None
    if self._site not in survivors:
        raise SecAggSecurityError("told it dropped")
    if len(survivors) < self._config.threshold:
        raise RoundFailedError(FailureReason.TOO_FEW_SITES, "too few survivors")
    if not self._graph.is_connected(survivors):
        raise RoundFailedError(FailureReason.SURVIVORS_DISCONNECTED, "disconnected")


def _no_signature_checks(self: SecAggClient, request: UnmaskRequest) -> None:
    self._signed = request.survivors  # the old client answered whatever set it was told


@pytest.fixture
def old_client_logic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SecAggClient, "_check_survivors", _old_survivor_checks)
    monkeypatch.setattr(SecAggClient, "_check_signatures", _no_signature_checks)


def _config(n: int, t: int, **kw: object) -> SecAggConfig:
    fields: dict[str, object] = {"study_id": "study-1", "round": 0, "sites": site_names(n), "threshold": t}
    return SecAggConfig(**fields, vector_length=8, **kw)  # type: ignore[arg-type]


def _victim_recovered(adv: Adversary, victim: str) -> bool:
    known = closure(adv)
    if frozenset({victim}) not in revealable(adv, known):
        return False
    return bool(np.array_equal(unmask_sum(adv, known, {victim}), plain_sum(adv, {victim})))


def _mask_with_only(adv: Adversary, victim: str, mask_set: set[str]) -> None:
    """Key set-up as usual, then the victim gets the boxes of ``mask_set`` only."""
    adv.advertise()
    adv.share()
    others = adv.graph_of(victim).of(victim) - mask_set
    adv.mask(withheld={victim: others})
    assert adv.clients[victim].masked_with == mask_set


def _rotating_stories(adv: Adversary, victim: str, mask_set: set[str]) -> dict[str, frozenset[str]]:
    """Full graph: each site hears its own story, leaving out n - t sites of the mask set (never the victim),
    so that each site of the mask set is 'dropped' in the stories of at least t sites."""
    n, t = adv.config.n, adv.config.threshold
    ordered = sorted(mask_set)
    stories = {}
    for i, site in enumerate(adv.config.sites):
        candidates = [m for m in ordered if m != site]
        start = i % max(1, len(candidates))
        rotated = candidates[start:] + candidates[:start]
        stories[site] = frozenset(set(adv.config.sites) - set(rotated[: n - t]))
    return stories


def _finding_1_full_graph(adv: Adversary) -> str:
    victim = "site-00"
    mask_set = set(adv.config.sites[1 : adv.config.threshold])  # t - 1 peers: with itself, t sites
    _mask_with_only(adv, victim, mask_set)
    adv.consistency(told=_rotating_stories(adv, victim, mask_set))
    adv.unmask()
    return victim


def _consistent_lie(adv: Adversary) -> str:
    """The victim masks with share_threshold - 1 of its neighbours; everyone is told those dropped."""
    victim = "site-00"
    adv.advertise()
    adv.share()
    neighbours = sorted(adv.graph_of(victim).of(victim))
    mask_set = set(neighbours[: adv.config.share_threshold - 1])
    adv.mask(withheld={victim: set(neighbours) - mask_set})
    story = frozenset(set(adv.config.sites) - mask_set)
    adv.consistency(told=dict.fromkeys(adv.config.sites, story))
    adv.unmask()
    return victim


CASES = [
    pytest.param(_config(3, 2), _finding_1_full_graph, id="finding-1-3-sites"),
    pytest.param(_config(6, 4), _finding_1_full_graph, id="finding-1-6-sites"),
    pytest.param(_config(100, 67), _consistent_lie, id="finding-1-100-sites-sparse", marks=pytest.mark.slow),
    pytest.param(_config(5, 3), _consistent_lie, id="narrowing-5-sites-t3"),
    pytest.param(_config(24, 16), _consistent_lie, id="narrowing-24-sites-defaults"),
]


@pytest.mark.parametrize(("config", "plan"), CASES)
@pytest.mark.usefixtures("old_client_logic")
def test_the_attack_recovers_the_victim_exactly_against_the_old_client_checks(
    config: SecAggConfig, plan: Plan
) -> None:
    adv = Adversary(config, frozenset())
    victim = plan(adv)
    assert _victim_recovered(adv, victim)
    assert any(group == {victim} for group, _ in violations(adv))


@pytest.mark.parametrize(("config", "plan"), CASES)
def test_the_attack_is_refused_and_no_small_sum_is_computable(config: SecAggConfig, plan: Plan) -> None:
    if config.n == 100:
        assert not config.full_graph  # defaults: 22-regular graph, share threshold 12, t = ceil(2n/3)
        assert (config.degree, config.share_threshold) == (22, 12)
    if config.n == 24:
        assert (config.full_graph, config.degree, config.share_threshold) == (False, 16, 9)
    adv = Adversary(config, frozenset())
    victim = plan(adv)
    # the victim refuses to sign a survivor set holding neighbours it did not mask with
    assert isinstance(adv.stopped[victim], SecAggSecurityError)
    assert "did not mask with" in str(adv.stopped[victim])
    assert not _victim_recovered(adv, victim)
    assert violations(adv) == []
    assert victim not in closure(adv).seeds


def test_rotating_stories_gather_too_few_signatures_for_anyone_to_reveal() -> None:
    adv = Adversary(_config(6, 4), frozenset())
    _finding_1_full_graph(adv)
    assert adv.revealers == set()
    assert all(
        isinstance(e, RoundFailedError) and e.reason is FailureReason.TOO_FEW_SITES
        for site, e in adv.stopped.items()
        if site != "site-00"
    )


def test_narrowing_below_threshold_is_refused_before_the_masked_input() -> None:
    # the |U2| >= t check: with one box the victim would reach only 2 of t = 3 sites
    adv = Adversary(_config(5, 3), frozenset())
    adv.advertise()
    adv.share()
    adv.mask(withheld={"site-00": {"site-02", "site-03", "site-04"}})
    error = adv.stopped["site-00"]
    assert isinstance(error, RoundFailedError)
    assert error.reason is FailureReason.TOO_FEW_SITES
    assert "site-00" not in adv.masked


def _sparse_one_colluder_victim_never_signs(adv: Adversary) -> str:
    """k = 4, one colluder E: the victim X masks with one honest neighbour A and E; the server lists X as a
    survivor and A as dropped. X refuses to sign, but X's other two neighbours and E reveal X's self-mask
    seed, and the sites around A reveal A's key."""
    (e,) = adv.colluders
    adv.advertise()
    adv.share()
    graph = adv.graph_of(adv.honest[0])
    victim = min(s for s in graph.of(e) if s in adv.clients)
    a = min(s for s in graph.of(victim) if s != e)
    adv.mask(withheld={victim: graph.of(victim) - {a, e}})
    story = frozenset(set(adv.config.sites) - {a})
    adv.consistency(told=dict.fromkeys(adv.config.sites, story))
    adv.unmask()
    return victim


def test_sparse_share_threshold_must_outvote_the_colluders_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bell et al.'s s = k/2 + 1 with s >= c + 2 (the design first proposed) is not enough against one
    # colluder: the victim's input comes out although it refused to sign. s = floor((k + 1 + c)/2) + 1 is.
    config = _config(12, 7, collusion=1, full_graph_max_sites=4, neighbourhood_size=4)
    assert config.share_threshold == 4  # 2s > k + 1 + c = 6
    colluder = frozenset({"site-11"})

    adv = Adversary(config, colluder)
    victim = _sparse_one_colluder_victim_never_signs(adv)
    assert victim not in adv.masked  # it needs 3 boxes, got 2: refused before masking
    assert violations(adv) == []

    monkeypatch.setattr(SecAggConfig, "share_threshold", property(lambda self: self.degree // 2 + 1))
    assert config.share_threshold == 3 == config.collusion + 2
    weak = Adversary(config, colluder)
    victim = _sparse_one_colluder_victim_never_signs(weak)
    assert isinstance(weak.stopped[victim], SecAggSecurityError)  # it refused to sign ...
    assert _victim_recovered(weak, victim)  # ... and its input came out anyway


def test_honest_rounds_reveal_exactly_the_survivors_sum_to_the_model() -> None:
    # the model is not vacuous: on an honest round it finds the survivors' sum and computes it exactly
    config = _config(14, 10, collusion=2, full_graph_max_sites=4, neighbourhood_size=6)
    adv = Adversary(config, frozenset({"site-03", "site-09"}))
    adv.advertise()
    adv.share()
    adv.mask(silent={"site-05"})
    adv.consistency()
    adv.unmask()
    known = closure(adv)
    survivors = frozenset(adv.masked)
    assert revealable(adv, known) == [survivors]
    assert np.array_equal(unmask_sum(adv, known, survivors), plain_sum(adv, survivors))
    assert survivors == set(adv.honest) - {"site-05"}
    assert known.keys.keys() == {"site-05"}  # the dropped site's mask key, nothing else
    assert adv.clients["site-00"].stage is Stage.DONE

"""Finding 1 of issue 10, reproduced against the client logic as it stands (before the consistency round).

A malicious server with no colluding site plays the protocol with real clients: it delivers to a victim X only
the share boxes of a subset M of its neighbours (so X masks with M only), then tells the sites stories about
who survived so that it collects X's self-mask-seed shares from some and M's pairwise-key shares from others,
and removes every mask from X's masked input. Each test asserts that X's input comes out exactly: these tests
document the attack; the commit that adds the consistency round turns them into refusals.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from secagg_federation import Federation, make_federation

from fedhealth.crypto import AgreementKey
from fedhealth.secagg import MaskedInput, ShareKind, UnmaskRequest
from fedhealth.secagg._crypto_extra import apply_masks
from fedhealth.secagg._derive import pairwise_mask_seed, self_mask_seed
from fedhealth.secagg._shamir import reconstruct_secret


def _attack(
    fed: Federation, victim: str, mask_set: set[str], stories: dict[str, frozenset[str]]
) -> NDArray[np.uint32]:
    """Run the round as the malicious server; return what it computes as the victim's input."""
    config, digest = fed.config, fed.config.digest()
    graph = config.graph()
    directories = fed.advertise()
    adverts = {a.site_id: a for d in directories.values() for a in d.advertisements}
    bundles = fed.share(directories)
    # the victim gets the boxes of mask_set only; everyone else gets what they are owed
    bundles[victim] = type(bundles[victim])(
        recipient=victim,
        config_digest=digest,
        boxes=tuple(b for b in bundles[victim].boxes if b.sender in mask_set),
    )
    inputs = fed.inputs(42)
    masked: dict[str, MaskedInput] = {
        s: fed.clients[s].masked_input(bundles[s], inputs[s]) for s in fed.sites
    }
    # the stories: each site is told its own survivor set; the rest of the round "dropped"
    points: dict[tuple[str, ShareKind], dict[int, bytes]] = {}
    for site, story in stories.items():
        request = UnmaskRequest(
            recipient=site,
            config_digest=digest,
            survivors=tuple(sorted(story)),
            dropped=tuple(sorted(set(fed.sites) - story)),
        )
        for share in fed.clients[site].unmask(request).shares:
            points.setdefault((share.owner, share.kind), {})[config.x_of(site)] = share.share
    t = config.share_threshold
    seed = reconstruct_secret(points[(victim, ShareKind.SELF_MASK_SEED)], t)
    add: list[bytes] = []
    subtract = [self_mask_seed(config, digest, seed, victim)]
    for peer in sorted(mask_set):
        key = AgreementKey.from_private_bytes(reconstruct_secret(points[(peer, ShareKind.PAIRWISE_KEY)], t))
        assert key.public_bytes() == adverts[peer].mask_public_key
        pair_seed = pairwise_mask_seed(config, digest, key, adverts[victim].mask_public_key, peer, victim)
        (subtract if victim < peer else add).append(pair_seed)  # undo what the victim added
    assert graph.of(victim) >= mask_set
    out = masked[victim].vector.copy()
    apply_masks(out, add=add, subtract=subtract)
    assert np.array_equal(out, inputs[victim])
    return out


def _rotating_stories(fed: Federation, victim: str, mask_set: set[str]) -> dict[str, frozenset[str]]:
    """Full graph: every site hears a different story, each leaving out n - t of the mask set (never the
    victim), so that each site of the mask set is 'dropped' in the stories of at least t sites."""
    n, t = fed.config.n, fed.config.threshold
    ordered = sorted(mask_set)
    stories = {}
    for i, site in enumerate(fed.sites):
        candidates = [m for m in ordered if m != site]
        start = i % max(1, len(candidates))
        rotated = candidates[start:] + candidates[:start]
        left_out = set(rotated[: n - t])
        stories[site] = frozenset(set(fed.sites) - left_out)
    return stories


def test_finding_1_three_sites_full_graph_victim_input_recovered_exactly() -> None:
    fed = make_federation(3, 2)
    victim = "site-00"
    _attack(fed, victim, {"site-01"}, _rotating_stories(fed, victim, {"site-01"}))


def test_finding_1_six_sites_full_graph_victim_input_recovered_exactly() -> None:
    fed = make_federation(6, 4)
    victim = "site-00"
    mask_set = {"site-01", "site-02", "site-03"}  # t - 1 boxes: the victim's own count reaches t
    _attack(fed, victim, mask_set, _rotating_stories(fed, victim, mask_set))


def _consistent_lie(fed: Federation, mask_set: set[str]) -> dict[str, frozenset[str]]:
    story = frozenset(set(fed.sites) - mask_set)
    return dict.fromkeys(story, story)


def test_finding_1_hundred_sites_sparse_graph_victim_input_recovered_exactly() -> None:
    fed = make_federation(100, 67, 8)  # default: 22-regular graph, share threshold 12, t = ceil(2n/3)
    assert not fed.config.full_graph
    victim = "site-00"
    mask_set = set(sorted(fed.config.graph().of(victim))[: fed.config.share_threshold - 1])
    _attack(fed, victim, mask_set, _consistent_lie(fed, mask_set))


def test_narrowing_five_sites_one_consistent_lie_recovers_the_victim() -> None:
    fed = make_federation(5, 3)
    victim = "site-00"
    mask_set = {"site-01", "site-02"}  # boxes from 2 of 4 neighbours: fewer than t = 3 neighbours
    _attack(fed, victim, mask_set, _consistent_lie(fed, mask_set))


def test_narrowing_twenty_four_sites_default_settings_one_consistent_lie_recovers_the_victim() -> None:
    fed = make_federation(24, 16, 8)  # defaults: t = ceil(2n/3) = 16, 16-regular graph above 20 sites
    assert not fed.config.full_graph
    victim = "site-00"
    mask_set = set(sorted(fed.config.graph().of(victim))[: fed.config.share_threshold - 1])
    _attack(fed, victim, mask_set, _consistent_lie(fed, mask_set))

"""Explicit attacks on a SecAgg+ round by a malicious orchestrator (and colluding sites within the bound c),
driving real clients (docs/secure-aggregation.md, "The protocol" and "What a malicious orchestrator learns").

tests/secagg/test_secagg_malicious_server.py searches strategies at random; these are the classic attacks
spelt out step by step, each checked against what the server can then actually rebuild with the real
cryptography: a site claimed dropped after its masked input arrived, two dropout stories told to two halves
of the federation with the colluders signing both, signatures of an earlier attempt, a peer advertising
another site's key, and a site revealing a corrupted share.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from secagg_federation import make_federation, plain_sum

from fedhealth.crypto import AgreementKey, IdentityKey
from fedhealth.secagg import (
    ConsistencyRequest,
    FailureReason,
    KeyAdvertisement,
    KeyDirectory,
    RevealedShare,
    RoundFailedError,
    SecAggClient,
    SecAggConfig,
    SecAggProtocolError,
    SecAggSecurityError,
    SecAggServer,
    ShareKind,
    Stage,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    _derive,
)
from fedhealth.secagg._crypto_extra import apply_masks
from fedhealth.secagg._shamir import reconstruct_secret, reconstruct_verified, split_secret


def _request(client: SecAggClient, survivors: set[str]) -> ConsistencyRequest:
    return ConsistencyRequest(
        recipient=client.site_id, config_digest=client.config.digest(), survivors=tuple(sorted(survivors))
    )


def _unmask(client: SecAggClient, survivors: set[str], signatures: dict[str, bytes]) -> UnmaskRequest:
    return UnmaskRequest(
        recipient=client.site_id,
        config_digest=client.config.digest(),
        survivors=tuple(sorted(survivors)),
        signatures=tuple(SurvivorSignature(site_id=s, signature=signatures[s]) for s in sorted(signatures)),
    )


def _shares_of(responses: list[UnmaskResponse], owner: str, kind: ShareKind) -> dict[str, bytes]:
    return {
        r.site_id: share.share
        for r in responses
        for share in r.shares
        if share.owner == owner and share.kind is kind
    }


# --- the classic attack: "V dropped" after V's masked input arrived ----------------------------------------


def test_a_site_claimed_dropped_after_its_masked_input_stays_hidden_by_its_self_mask() -> None:
    """Every site but V is told V dropped (its masked input is in the server's hands). They sign, and reveal
    V's mask-key shares; the server rebuilds V's key and strips every pairwise mask from V's masked vector.
    What is left is still masked by V's self mask, whose seed shares no one revealed; and no site can then be
    asked for them, in this round or over another survivor set."""
    fed = make_federation(4, 3, length=64)
    victim, others = fed.sites[0], fed.sites[1:]
    inputs = fed.inputs(seed=7)
    bundles = fed.share(fed.advertise())
    masked = {s: fed.clients[s].masked_input(bundles[s], inputs[s]) for s in fed.sites}
    story = set(others)  # "V's masked input did not arrive"
    signatures = {s: fed.clients[s].consistency(_request(fed.clients[s], story)).signature for s in others}
    responses = [fed.clients[s].unmask(_unmask(fed.clients[s], story, signatures)) for s in others]

    # the server now holds t shares of V's mask key, and none of V's self-mask seed
    assert _shares_of(responses, victim, ShareKind.SELF_MASK_SEED) == {}
    key_shares = _shares_of(responses, victim, ShareKind.PAIRWISE_KEY)
    assert len(key_shares) == fed.config.share_threshold
    key = AgreementKey.from_private_bytes(
        reconstruct_secret({fed.config.x_of(s): v for s, v in key_shares.items()}, fed.config.share_threshold)
    )
    seed = fed.clients[victim].graph_seed
    assert seed is not None
    adverts = {s: fed.clients[s]._peer_keys[victim] for s in others}  # V's keys, as its peers saw them
    assert key.public_bytes() == adverts[others[0]].mask_public_key  # the key really is V's
    stripped = masked[victim].vector.copy()
    digest = fed.config.digest()
    for peer in others:
        peer_public = fed.clients[victim]._peer_keys[peer].mask_public_key
        pair_seed = _derive.pairwise_mask_seed(fed.config, digest, seed, key, peer_public, victim, peer)
        # V added the mask of a pair where it has the lower id, and subtracted it otherwise
        apply_masks(
            stripped, subtract=[pair_seed] if victim < peer else [], add=[] if victim < peer else [pair_seed]
        )
    assert not np.array_equal(stripped, inputs[victim])
    assert np.count_nonzero(stripped == inputs[victim]) <= 2  # uniformly random against the input

    # the second half of the attack: V's seed shares, through another survivor set or another request
    with_victim = set(fed.sites)
    for s in others:
        with pytest.raises(SecAggProtocolError):
            fed.clients[s].consistency(_request(fed.clients[s], with_victim))
        with pytest.raises(SecAggProtocolError):
            fed.clients[s].unmask(_unmask(fed.clients[s], with_victim, signatures))
    # V itself, told it dropped, signs nothing
    with pytest.raises(SecAggSecurityError, match="did not arrive"):
        fed.clients[victim].consistency(_request(fed.clients[victim], story))
    assert fed.clients[victim].stage is Stage.FAILED


# --- two stories, colluders signing both -------------------------------------------------------------------

_HONEST_OTHERS = 4  # n = 7, c = 2: V, four other honest sites, two colluders


@pytest.mark.parametrize(
    "told_v_survived",
    [frozenset(group) for r in range(_HONEST_OTHERS + 1) for group in itertools.combinations(range(4), r)],
)
def test_colluders_signing_both_dropout_stories_never_give_the_server_both_shares_of_a_site(
    told_v_survived: frozenset[int],
) -> None:
    """n = 7, c = 2, t = 5 (2t > n + c). The server tells some honest sites "V survived" (they reveal V's
    self-mask-seed share) and the rest "V dropped" (they reveal V's key share); the two colluders sign both
    stories and hand over both of their shares of V. Whatever the split, at most one story gathers t
    signatures, so the server never holds s = t shares of both of V's secrets."""
    fed = make_federation(7, 5, collusion=2, length=8)
    config, digest = fed.config, fed.config.digest()
    victim, *honest, e1, e2 = fed.sites
    colluders = (e1, e2)
    bundles = fed.share(fed.advertise())
    inputs = fed.inputs(seed=1)
    for s in fed.sites:
        fed.clients[s].masked_input(bundles[s], inputs[s])
    seed = fed.clients[victim].graph_seed
    assert seed is not None
    stories = {"survived": set(fed.sites), "dropped": set(fed.sites) - {victim}}
    told = {h: "survived" if i in told_v_survived else "dropped" for i, h in enumerate(honest)}
    told[victim] = "survived"  # told it dropped, V would refuse to sign anything

    signed: dict[str, dict[str, bytes]] = {"survived": {}, "dropped": {}}
    for site, story in told.items():
        signed[story][site] = (
            fed.clients[site].consistency(_request(fed.clients[site], stories[story])).signature
        )
    for story, survivors in stories.items():
        for e in colluders:
            payload = _derive.consistency_payload(config, digest, seed, survivors)
            signed[story][e] = _derive.sign_payload(fed.keys[e], payload)

    responses = []
    for site, story in told.items():
        request = _unmask(fed.clients[site], stories[story], signed[story])
        if len(signed[story]) < config.threshold:
            with pytest.raises(RoundFailedError) as refused:
                fed.clients[site].unmask(request)
            assert refused.value.reason is FailureReason.TOO_FEW_SITES
        else:
            responses.append(fed.clients[site].unmask(request))
    seed_shares = len(_shares_of(responses, victim, ShareKind.SELF_MASK_SEED)) + len(colluders)
    key_shares = len(_shares_of(responses, victim, ShareKind.PAIRWISE_KEY)) + len(colluders)
    s = config.share_threshold
    assert not (seed_shares >= s and key_shares >= s), (told, seed_shares, key_shares)
    # and the story that did gather t signatures is the one every revealing site agreed on
    revealing = {told[r.site_id] for r in responses}
    assert len(revealing) <= 1


# --- replays ------------------------------------------------------------------------------------------------


def test_consistency_signatures_of_an_earlier_attempt_of_the_round_are_refused() -> None:
    """Attempt 1 of a round ran to its consistency stage; attempt 2 (same study, round, sites, keys; a new
    attempt id in the study) stalls there. The server fills attempt 2's unmask request with the attempt-1
    signatures of the other sites: refused, nothing revealed."""
    keys = {s: IdentityKey.generate() for s in ("site-00", "site-01", "site-02")}
    first = make_federation(3, 2, study="study-1/attempt-1", keys=keys)
    second = make_federation(3, 2, study="study-1/attempt-2", keys=keys)
    old = first.sign(first.mask(first.share(first.advertise()), first.inputs()))
    checks = second.mask(second.share(second.advertise()), second.inputs())
    a = second.clients["site-00"]
    own = a.consistency(checks["site-00"])
    survivors = set(checks["site-00"].survivors)
    stale = {sig.site_id: sig.signature for sig in old["site-00"].signatures if sig.site_id != "site-00"}
    with pytest.raises(SecAggSecurityError, match="does not sign this survivor set"):
        a.unmask(_unmask(a, survivors, {"site-00": own.signature, **stale}))
    assert a.stage is Stage.FAILED


def test_an_unmask_request_of_another_round_is_not_answered() -> None:
    keys = {s: IdentityKey.generate() for s in ("site-00", "site-01", "site-02")}
    round_1 = make_federation(3, 2, round_number=1, keys=keys)
    round_2 = make_federation(3, 2, round_number=2, keys=keys)
    requests_1 = round_1.sign(round_1.mask(round_1.share(round_1.advertise()), round_1.inputs()))
    round_2.sign(round_2.mask(round_2.share(round_2.advertise()), round_2.inputs()))
    with pytest.raises(SecAggProtocolError, match="another round"):
        round_2.clients["site-00"].unmask(requests_1["site-00"])
    assert round_2.clients["site-00"].stage is Stage.UNMASK  # nothing revealed; the right request still works


# --- key pinning: a peer advertising another site's key -----------------------------------------------------


@pytest.mark.parametrize("which", ["mask_public_key", "cipher_public_key"])
def test_a_colluder_advertising_an_honest_sites_key_as_its_own_is_refused(which: str) -> None:
    """A colluding site signs, with its own identity, an advertisement carrying the victim's ephemeral key;
    the server relays it instead of the colluder's (the server's own duplicate check is its choice)."""
    fed = make_federation(4, 3)
    directories = fed.advertise()
    victim, colluder, honest = fed.sites[0], fed.sites[3], fed.sites[1]
    ads = {a.site_id: a for a in directories[honest].advertisements}
    fresh = AgreementKey.generate().public_bytes()
    keys = {"cipher_public_key": fresh, "mask_public_key": fresh, which: getattr(ads[victim], which)}
    if which == "cipher_public_key":
        keys["mask_public_key"] = ads[colluder].mask_public_key
    else:
        keys["cipher_public_key"] = ads[colluder].cipher_public_key
    payload = _derive.advertisement_payload(
        fed.config, fed.config.digest(), colluder, keys["cipher_public_key"], keys["mask_public_key"]
    )
    copied = KeyAdvertisement(
        site_id=colluder,
        config_digest=fed.config.digest(),
        signature=_derive.sign_payload(fed.keys[colluder], payload),
        **keys,
    )
    forged = KeyDirectory(
        recipient=honest,
        config_digest=fed.config.digest(),
        advertisements=tuple(
            copied if a.site_id == colluder else a for a in directories[honest].advertisements
        ),
    )
    with pytest.raises(SecAggSecurityError, match="used twice"):
        fed.clients[honest].share_keys(forged)
    assert fed.clients[honest].stage is Stage.FAILED


# --- a malicious site at the unmask stage ------------------------------------------------------------------


def _reveal(fed, requests, liars: dict[str, bytes], victim: str, kind: ShareKind) -> None:
    """Every survivor answers the unmask request; each liar replaces its share of ``victim`` with bytes."""
    for s in fed.sites:
        response = fed.clients[s].unmask(requests[s])
        if s in liars:
            shares = tuple(
                dataclasses.replace(r, share=liars[s]) if r.owner == victim and r.kind is kind else r
                for r in response.shares
            )
            assert any(isinstance(r, RevealedShare) and r.share == liars[s] for r in shares)
            response = dataclasses.replace(response, shares=shares)
        fed.server.receive(response)


def test_a_site_revealing_a_corrupted_share_is_named_and_the_round_still_sums_right() -> None:
    """A malicious survivor reveals a wrong self-mask-seed share of an honest site (its share is among the t
    the server tries first). The server rebuilds the seed from another set of the shares, checked against
    the site's commitment, and names the liar: one site cannot fail every round unnamed."""
    fed = make_federation(5, 3)
    inputs = fed.inputs()
    requests = fed.sign(fed.mask(fed.share(fed.advertise()), inputs))
    liar, victim = fed.sites[0], fed.sites[1]  # the liar holds the smallest x
    _reveal(fed, requests, {liar: bytes(65) + b"\x01"}, victim, ShareKind.SELF_MASK_SEED)
    fed.server.close_stage()
    result = fed.server.result()
    assert np.array_equal(result.vector.astype(np.uint64), plain_sum(inputs, fed.sites))
    assert result.misbehaving == (liar,)


def test_too_many_wrong_shares_fail_the_round_cleanly_with_no_sum() -> None:
    """More liars than the spare shares cover: no set of t shares rebuilds the committed seed, and the round
    fails with nothing computed (no partial or wrong sum is released)."""
    fed = make_federation(5, 3)
    requests = fed.sign(fed.mask(fed.share(fed.advertise()), fed.inputs()))
    victim = fed.sites[1]
    liars = {s: bytes(65) + bytes([i + 1]) for i, s in enumerate(fed.sites) if s != victim}
    _reveal(fed, requests, liars, victim, ShareKind.SELF_MASK_SEED)
    with pytest.raises(RoundFailedError) as info:
        fed.server.close_stage()
    assert info.value.reason is FailureReason.INCONSISTENT_SHARES
    assert fed.server.stage is Stage.FAILED
    with pytest.raises(SecAggProtocolError):
        fed.server.result()
    assert not fed.server._masked  # the masked inputs are forgotten
    assert not fed.server._responses


def test_the_server_refuses_to_request_both_kinds_of_share_of_one_site() -> None:
    """The honest server's own bookkeeping: once it asked for V's seed shares it will not ask for its key
    shares too (the SecAggServer is what the orchestrator runs; a deviating orchestrator is the clients'
    problem, above)."""
    fed = make_federation(4, 3)
    fed.mask(fed.share(fed.advertise()), fed.inputs())
    server: SecAggServer = fed.server
    victim = fed.sites[0]
    assert server.share_kinds_requested()[victim] is ShareKind.SELF_MASK_SEED
    with pytest.raises(SecAggSecurityError, match="both kinds"):
        server._grant(victim, ShareKind.PAIRWISE_KEY)
    assert isinstance(server.config, SecAggConfig)


def test_verified_reconstruction_names_every_share_off_the_polynomial() -> None:
    secret = bytes(range(32))
    shares = split_secret(secret, [1, 2, 3, 4, 5, 6, 7], 4)
    shares[1] = bytes(65) + b"\x07"  # wrong value, among the first four tried
    shares[6] = b"short"  # not even a share
    got, wrong = reconstruct_verified(shares, 4, lambda s: s == secret)
    assert got == secret
    assert wrong == {1, 6}
    honest = split_secret(secret, [1, 2, 3, 4], 4)
    assert reconstruct_verified(honest, 4, lambda s: s == secret) == (secret, frozenset())
    with pytest.raises(ValueError, match="no set"):  # 3 right shares of a threshold of 4
        reconstruct_verified({**honest, 4: bytes(66)}, 4, lambda s: s == secret)

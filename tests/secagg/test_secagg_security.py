"""Guards against a lying server or peer: each one tries to break a guarantee and must be refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_federation import Federation, make_federation

from fedhealth.core import CryptoError
from fedhealth.crypto import AgreementKey, IdentityKey, sign_json
from fedhealth.secagg import (
    ConsistencyRequest,
    FailureReason,
    KeyAdvertisement,
    KeyDirectory,
    KeyReuseGuard,
    RevealedShare,
    RoundFailedError,
    SecAggMessageError,
    SecAggProtocolError,
    SecAggSecurityError,
    ShareBox,
    ShareBundle,
    ShareKind,
    Stage,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedhealth.secagg._derive import advertisement_payload, consistency_payload

A, B, C = "site-00", "site-01", "site-02"


def _replace_advert(directory: KeyDirectory, site: str, **changes: object) -> KeyDirectory:
    ads = tuple(
        dataclasses.replace(a, **changes) if a.site_id == site else a for a in directory.advertisements
    )
    return dataclasses.replace(directory, advertisements=ads)


def test_client_rejects_an_advertisement_with_a_bad_signature() -> None:
    fed = make_federation(3, 2)
    directories = fed.advertise()
    forged = _replace_advert(directories[A], B, signature=bytes(64))
    with pytest.raises(SecAggSecurityError) as info:
        fed.clients[A].share_keys(forged)
    assert isinstance(info.value, CryptoError)
    assert fed.clients[A].stage is Stage.FAILED


def test_client_detects_a_server_that_substitutes_a_sites_mask_key() -> None:
    fed = make_federation(3, 2)
    directories = fed.advertise()
    server_key = AgreementKey.generate().public_bytes()
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].share_keys(_replace_advert(directories[A], B, mask_public_key=server_key))


def test_client_detects_a_server_that_re_signs_substituted_keys_with_its_own_identity() -> None:
    fed = make_federation(3, 2)
    directories = fed.advertise()
    orchestrator = IdentityKey.generate()
    cipher, mask = AgreementKey.generate().public_bytes(), AgreementKey.generate().public_bytes()
    payload = advertisement_payload(fed.config, fed.config.digest(), B, cipher, mask)
    forged = _replace_advert(
        directories[A],
        B,
        cipher_public_key=cipher,
        mask_public_key=mask,
        signature=sign_json(orchestrator, payload),
    )
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].share_keys(forged)


def test_client_detects_a_server_that_alters_its_own_keys() -> None:
    fed = make_federation(3, 2)
    directories = fed.advertise()
    other = make_federation(3, 2, keys=fed.keys)
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].share_keys(
            _replace_advert(
                directories[A], A, **{"mask_public_key": other.clients[A].advertise_keys().mask_public_key}
            )
        )


def test_client_rejects_an_advertisement_replayed_from_another_round() -> None:
    fed = make_federation(3, 2, round_number=1)
    old = make_federation(3, 2, round_number=0, keys=fed.keys)
    old_advert = old.clients[B].advertise_keys()
    directories = fed.advertise()
    replayed = tuple(
        dataclasses.replace(old_advert, config_digest=fed.config.digest()) if a.site_id == B else a
        for a in directories[A].advertisements
    )
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].share_keys(dataclasses.replace(directories[A], advertisements=replayed))
    # and as sent, with the old round's digest
    fed2 = make_federation(3, 2, round_number=1, keys=fed.keys)
    directories2 = fed2.advertise()
    as_sent = tuple(old_advert if a.site_id == B else a for a in directories2[A].advertisements)
    with pytest.raises(SecAggSecurityError):
        fed2.clients[A].share_keys(dataclasses.replace(directories2[A], advertisements=as_sent))


def test_client_rejects_a_key_a_peer_reuses_in_a_later_round() -> None:
    guards = {s: KeyReuseGuard() for s in ("site-00", "site-01", "site-02")}
    first = make_federation(3, 2, round_number=0, guards=guards)
    directories = first.advertise()
    first.clients[A].share_keys(directories[A])
    reused = next(a for a in directories[A].advertisements if a.site_id == B)
    assert reused.mask_public_key in guards[A]

    second = make_federation(3, 2, round_number=1, keys=first.keys, guards=guards)
    fresh = second.advertise()
    # B signs the same ephemeral keys again, correctly, for the new round: a valid signature, a reused key
    digest = second.config.digest()
    payload = advertisement_payload(
        second.config, digest, B, reused.cipher_public_key, reused.mask_public_key
    )
    again = KeyAdvertisement(
        site_id=B,
        config_digest=digest,
        cipher_public_key=reused.cipher_public_key,
        mask_public_key=reused.mask_public_key,
        signature=sign_json(first.keys[B], payload),
    )
    ads = tuple(again if a.site_id == B else a for a in fresh[A].advertisements)
    with pytest.raises(SecAggSecurityError):
        second.clients[A].share_keys(dataclasses.replace(fresh[A], advertisements=ads))


def test_client_rejects_a_peer_using_one_key_for_both_purposes() -> None:
    fed = make_federation(3, 2)
    directories = fed.advertise()
    key = AgreementKey.generate().public_bytes()
    payload = advertisement_payload(fed.config, fed.config.digest(), B, key, key)
    signed = _replace_advert(
        directories[A],
        B,
        cipher_public_key=key,
        mask_public_key=key,
        signature=sign_json(fed.keys[B], payload),
    )
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].share_keys(signed)


def test_key_reuse_guard_records_nothing_when_it_refuses() -> None:
    guard = KeyReuseGuard()
    guard.remember([b"a" * 32])
    with pytest.raises(SecAggSecurityError):
        guard.remember([b"b" * 32, b"a" * 32])
    assert b"b" * 32 not in guard
    with pytest.raises(SecAggSecurityError):
        guard.remember([b"c" * 32, b"c" * 32])


def test_server_refuses_an_advertisement_reusing_another_sites_key() -> None:
    fed = make_federation(3, 2)
    advert_a = fed.clients[A].advertise_keys()
    fed.server.receive(advert_a)
    mask = AgreementKey.generate().public_bytes()
    payload = advertisement_payload(fed.config, fed.config.digest(), B, advert_a.cipher_public_key, mask)
    copycat = KeyAdvertisement(
        site_id=B,
        config_digest=fed.config.digest(),
        cipher_public_key=advert_a.cipher_public_key,
        mask_public_key=mask,
        signature=sign_json(fed.keys[B], payload),
    )
    with pytest.raises(SecAggSecurityError):
        fed.server.receive(copycat)
    assert fed.server.answered() == {A}


def test_server_with_identities_refuses_a_forged_advertisement() -> None:
    fed = make_federation(3, 2, server_checks_signatures=True)
    advert = fed.clients[A].advertise_keys()
    with pytest.raises(SecAggSecurityError):
        fed.server.receive(dataclasses.replace(advert, signature=bytes(64)))
    fed.server.receive(advert)
    assert fed.server.answered() == {A}


def test_client_rejects_a_tampered_share() -> None:
    fed = make_federation(3, 2)
    bundles = fed.share(fed.advertise())
    box = bundles[A].boxes[0]
    flipped = bytearray(box.ciphertext)
    flipped[20] ^= 1
    tampered = dataclasses.replace(
        bundles[A], boxes=(dataclasses.replace(box, ciphertext=bytes(flipped)), *bundles[A].boxes[1:])
    )
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].masked_input(tampered, np.zeros(fed.config.vector_length, dtype=np.uint32))
    assert fed.clients[A].stage is Stage.FAILED


def test_client_rejects_a_share_box_redirected_from_another_recipient() -> None:
    fed = make_federation(3, 2)
    bundles = fed.share(fed.advertise())
    # B's box for C, relabelled as B's box for A: the AEAD's associated data names the real recipient
    stolen = next(b for b in bundles[C].boxes if b.sender == B)
    relabelled = ShareBox(sender=B, recipient=A, ciphertext=stolen.ciphertext)
    boxes = tuple(relabelled if b.sender == B else b for b in bundles[A].boxes)
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].masked_input(
            dataclasses.replace(bundles[A], boxes=boxes), np.zeros(fed.config.vector_length, dtype=np.uint32)
        )


def test_client_rejects_a_box_from_a_site_whose_keys_it_never_saw() -> None:
    fed = make_federation(4, 3)
    directories = fed.advertise()
    bundles = fed.share(directories)
    # a second, unrelated round's box pretending to come from a peer
    intruder = ShareBox(sender="site-09", recipient=A, ciphertext=bytes(100))
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].masked_input(
            ShareBundle(recipient=A, config_digest=fed.config.digest(), boxes=(*bundles[A].boxes, intruder)),
            np.zeros(fed.config.vector_length, dtype=np.uint32),
        )


def _to_consistency(n: int, t: int, **kw: object) -> tuple[Federation, dict[str, ConsistencyRequest]]:
    fed = make_federation(n, t, **kw)  # type: ignore[arg-type]
    inputs = fed.inputs(0)
    checks = fed.mask(fed.share(fed.advertise()), inputs)
    return fed, checks


def _to_unmask(n: int, t: int) -> tuple[Federation, dict[str, UnmaskRequest]]:
    fed, checks = _to_consistency(n, t)
    return fed, fed.sign(checks)


def test_client_refuses_to_sign_fewer_than_threshold_survivors() -> None:
    fed, checks = _to_consistency(5, 3)
    lie = dataclasses.replace(checks[A], survivors=(A, B))
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].consistency(lie)
    assert info.value.reason is FailureReason.TOO_FEW_SITES
    assert fed.clients[A].stage is Stage.FAILED
    assert fed.clients[A].signed_survivors is None


def test_client_refuses_to_sign_when_told_it_dropped() -> None:
    fed, checks = _to_consistency(4, 3)
    lie = dataclasses.replace(checks[A], survivors=(B, C, "site-03"))
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].consistency(lie)
    assert fed.clients[A].stage is Stage.FAILED


def test_client_refuses_survivors_whose_keys_it_was_never_shown() -> None:
    fed = make_federation(5, 3)
    directories = fed.advertise(fed.sites[:4])  # site-04 never advertised
    checks = fed.mask(fed.share(directories), fed.inputs(0))
    lie = dataclasses.replace(checks[A], survivors=fed.sites)
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].consistency(lie)


def test_client_refuses_a_survivor_neighbour_it_did_not_mask_with() -> None:
    # the server withheld B's box from A (A masked with C and D only), then lists B as a survivor
    fed = make_federation(5, 3)
    bundles = fed.share(fed.advertise())
    narrowed = dataclasses.replace(bundles[A], boxes=tuple(b for b in bundles[A].boxes if b.sender != B))
    inputs = fed.inputs(0)
    fed.server.receive(fed.clients[A].masked_input(narrowed, inputs[A]))
    assert fed.clients[A].masked_with == {C, "site-03", "site-04"}
    checks = fed.mask(bundles, inputs, sites=fed.sites[1:])
    with pytest.raises(SecAggSecurityError) as info:
        fed.clients[A].consistency(checks[A])
    assert "did not mask with: ['site-01']" in str(info.value)
    assert fed.clients[A].stage is Stage.FAILED


def test_client_refuses_to_mask_with_fewer_than_threshold_boxes() -> None:
    # |U2| >= t: with itself the client must reach t sites whose shares it holds
    fed = make_federation(5, 4)
    bundles = fed.share(fed.advertise())
    kept = tuple(b for b in bundles[A].boxes if b.sender in {B, C})
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].masked_input(
            dataclasses.replace(bundles[A], boxes=kept), np.zeros(fed.config.vector_length, dtype=np.uint32)
        )
    assert info.value.reason is FailureReason.TOO_FEW_SITES
    assert "3 sites with this one, 4 needed" in str(info.value)
    assert fed.clients[A].stage is Stage.FAILED


def test_client_refuses_a_directory_with_fewer_than_threshold_sites() -> None:
    fed = make_federation(5, 4)
    directories = fed.advertise()
    short = dataclasses.replace(directories[A], advertisements=directories[A].advertisements[:3])
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].share_keys(short)
    assert info.value.reason is FailureReason.TOO_FEW_SITES


def test_client_refuses_keys_of_a_site_outside_the_round() -> None:
    fed = make_federation(3, 2)
    bigger = make_federation(4, 3, keys={**fed.keys, "site-03": IdentityKey.generate()})
    outsider = bigger.clients["site-03"].advertise_keys()
    directories = fed.advertise()
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].share_keys(
            dataclasses.replace(directories[A], advertisements=(*directories[A].advertisements, outsider))
        )


def test_a_site_shown_a_different_key_directory_cannot_open_its_peers_boxes() -> None:
    # the server leaves one advertisement out of A's directory: A derives another graph seed, and the boxes
    # its peers sealed under theirs do not open (A would otherwise mask with a set the server narrowed)
    fed = make_federation(5, 3)
    directories = fed.advertise()
    narrowed = tuple(a for a in directories[A].advertisements if a.site_id != "site-04")
    fed.clients[A].share_keys(dataclasses.replace(directories[A], advertisements=narrowed))
    shares = [fed.clients[s].share_keys(directories[s]) for s in fed.sites[1:]]
    assert fed.clients[A].graph_seed != fed.clients[B].graph_seed
    to_a = tuple(b for m in shares for b in m.boxes if b.recipient == A)
    bundle = ShareBundle(recipient=A, config_digest=fed.config.digest(), boxes=to_a)
    with pytest.raises(SecAggSecurityError) as info:
        fed.clients[A].masked_input(bundle, np.zeros(fed.config.vector_length, dtype=np.uint32))
    assert "another directory" in str(info.value)


def test_everyone_derives_the_graph_seed_from_all_advertisements() -> None:
    fed = make_federation(30, 16, full_graph_max_sites=10)
    directories = fed.advertise()
    assert all(len(d.advertisements) == 30 for d in directories.values())
    fed.share(directories)
    seeds = {fed.clients[s].graph_seed for s in fed.sites}
    assert seeds == {fed.server.graph_seed}
    # any one advertisement shown differently gives another seed; a second round gives another one too
    other = make_federation(30, 16, full_graph_max_sites=10, keys=fed.keys)
    other_directories = other.advertise()
    other.share(other_directories)
    assert other.server.graph_seed != fed.server.graph_seed


def test_unmask_request_over_another_set_than_the_signed_one_is_refused() -> None:
    fed, checks = _to_consistency(5, 3)
    requests = fed.sign(checks)
    other = tuple(s for s in fed.sites if s != "site-04")
    lie = dataclasses.replace(requests[A], survivors=other)
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].unmask(lie)
    assert fed.clients[A].stage is Stage.FAILED


def test_unmask_request_with_fewer_than_threshold_signatures_is_refused() -> None:
    fed, requests = _to_unmask(5, 4)
    short = dataclasses.replace(requests[A], signatures=requests[A].signatures[:3])
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].unmask(short)
    assert info.value.reason is FailureReason.TOO_FEW_SITES
    assert fed.clients[A].stage is Stage.FAILED


@pytest.mark.parametrize("forgery", ["zero", "server-key", "other-set", "non-survivor"])
def test_unmask_request_with_a_bad_signature_is_refused(forgery: str) -> None:
    fed, checks = _to_consistency(5, 3)
    survivors = tuple(s for s in fed.sites if s != "site-04")
    checks = {s: dataclasses.replace(c, survivors=survivors) for s, c in checks.items() if s in survivors}
    requests = fed.sign(checks)
    digest, seed = fed.config.digest(), fed.server.graph_seed
    assert seed is not None
    sigs = list(requests[A].signatures)
    if forgery == "zero":
        sigs[1] = SurvivorSignature(site_id=sigs[1].site_id, signature=bytes(64))
    elif forgery == "server-key":
        payload = consistency_payload(fed.config, digest, seed, survivors)
        sigs[1] = SurvivorSignature(
            site_id=sigs[1].site_id, signature=sign_json(IdentityKey.generate(), payload)
        )
    elif forgery == "other-set":
        payload = consistency_payload(fed.config, digest, seed, fed.sites)
        sigs[1] = SurvivorSignature(
            site_id=sigs[1].site_id, signature=sign_json(fed.keys[sigs[1].site_id], payload)
        )
    else:
        payload = consistency_payload(fed.config, digest, seed, survivors)
        sigs.append(SurvivorSignature(site_id="site-04", signature=sign_json(fed.keys["site-04"], payload)))
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].unmask(dataclasses.replace(requests[A], signatures=tuple(sigs)))
    assert fed.clients[A].stage is Stage.FAILED


def test_server_with_identities_refuses_a_forged_consistency_signature() -> None:
    fed = make_federation(3, 2, server_checks_signatures=True)
    checks = fed.mask(fed.share(fed.advertise()), fed.inputs(0))
    honest = fed.clients[A].consistency(checks[A])
    with pytest.raises(SecAggSecurityError):
        fed.server.receive(dataclasses.replace(honest, signature=bytes(64)))
    assert fed.server.answered() == frozenset()
    fed.server.receive(honest)
    fed.server.receive(honest)  # an identical re-send is a no-op
    assert fed.server.answered() == {A}


def test_server_fails_the_round_when_fewer_than_threshold_sign() -> None:
    fed, checks = _to_consistency(5, 4)
    with pytest.raises(RoundFailedError) as info:
        fed.sign(checks, sites=fed.sites[:3])
    assert info.value.reason is FailureReason.TOO_FEW_SITES
    assert fed.server.stage is Stage.FAILED


def test_before_reveal_runs_once_after_the_checks_and_a_refusal_there_reveals_nothing() -> None:
    fed, requests = _to_unmask(3, 2)
    calls: list[str] = []

    def record() -> None:
        calls.append(fed.clients[A].stage.value)

    fed.clients[A]._before_reveal = record
    response = fed.clients[A].unmask(requests[A])
    assert calls == ["unmask"]
    assert response.shares

    fed, requests = _to_unmask(3, 2)

    class AlreadyUnmasked(Exception):
        pass

    def refuse() -> None:
        raise AlreadyUnmasked

    fed.clients[A]._before_reveal = refuse
    with pytest.raises(AlreadyUnmasked):
        fed.clients[A].unmask(requests[A])
    assert fed.clients[A].stage is Stage.FAILED
    assert fed.clients[A]._held == {}
    with pytest.raises(SecAggProtocolError):
        fed.clients[A].unmask(requests[A])


def test_before_reveal_is_not_called_when_a_check_fails() -> None:
    fed, requests = _to_unmask(3, 2)
    calls: list[int] = []
    fed.clients[A]._before_reveal = lambda: calls.append(1)
    with pytest.raises(RoundFailedError):
        fed.clients[A].unmask(dataclasses.replace(requests[A], signatures=requests[A].signatures[:1]))
    assert calls == []


def test_client_reveals_seed_shares_of_survivors_and_key_shares_only_of_peers_it_masked_with() -> None:
    fed = make_federation(6, 4)
    directories = fed.advertise()
    bundles = fed.share(directories)
    inputs = fed.inputs(0)
    # site-05 never gets its masked input in: the others reveal its pairwise-key share
    checks = fed.mask(bundles, inputs, sites=fed.sites[:5])
    requests = fed.sign(checks)
    response = fed.clients[A].unmask(requests[A])
    kinds = {s.owner: s.kind for s in response.shares}
    assert kinds == {
        **dict.fromkeys(fed.sites[:5], ShareKind.SELF_MASK_SEED),
        "site-05": ShareKind.PAIRWISE_KEY,
    }


def test_sites_told_different_survivor_sets_reveal_nothing_without_t_signatures_over_theirs() -> None:
    # the server tells A, B that E dropped and C, D that E survived: neither set gathers t = 4 signatures from
    # honest sites (2 each); E's own signature covers only the set it was told
    fed, checks = _to_consistency(5, 4)
    e = "site-04"
    without_e = tuple(s for s in fed.sites if s != e)
    told = {A: without_e, B: without_e, C: fed.sites, "site-03": fed.sites, e: fed.sites}
    signatures = {
        s: fed.clients[s].consistency(dataclasses.replace(checks[s], survivors=told[s])) for s in fed.sites
    }
    for site in (A, B, C):
        over_same = tuple(
            SurvivorSignature(site_id=s, signature=signatures[s].signature)
            for s in sorted(signatures)
            if told[s] == told[site] and s in told[site]
        )
        request = UnmaskRequest(
            recipient=site, config_digest=fed.config.digest(), survivors=told[site], signatures=over_same
        )
        assert len(over_same) < 4
        with pytest.raises(RoundFailedError):
            fed.clients[site].unmask(request)
    # padding a request with the signatures over the other set does not help: they do not verify over this one
    with pytest.raises(SecAggSecurityError):
        fed.clients["site-03"].unmask(
            UnmaskRequest(
                recipient="site-03",
                config_digest=fed.config.digest(),
                survivors=fed.sites,
                signatures=tuple(
                    SurvivorSignature(site_id=s, signature=signatures[s].signature) for s in fed.sites
                ),
            )
        )


def test_server_refuses_to_store_a_share_it_did_not_ask_for() -> None:
    fed, requests = _to_unmask(3, 2)
    honest = fed.clients[A].unmask(requests[A])
    # a (buggy or colluding) site volunteers the pairwise-key share of a survivor: the server must not keep it
    extra = dataclasses.replace(
        honest,
        shares=tuple(
            dataclasses.replace(s, kind=ShareKind.PAIRWISE_KEY) if s.owner == B else s for s in honest.shares
        ),
    )
    with pytest.raises(SecAggSecurityError):
        fed.server.receive(extra)
    assert fed.server.answered() == frozenset()
    fed.server.receive(honest)


def test_disconnected_survivor_list_is_refused_by_clients() -> None:
    fed = make_federation(8, 5, 4, full_graph_max_sites=2, neighbourhood_size=2)
    directories = fed.advertise()
    graph = fed.server.graph
    bundles = fed.share(directories)
    # cut the ring at two places: the two cut sites' masked inputs never arrive
    ring = [A]
    while len(ring) < 8:
        ring.append(next(nb for nb in sorted(graph.of(ring[-1])) if nb not in ring))
    cut = {ring[3], ring[6]}  # A's neighbours ring[1] and ring[7] stay
    inputs = fed.inputs(0)
    for s in fed.sites:
        if s not in cut:
            fed.clients[s].masked_input(bundles[s], inputs[s])
    survivors = tuple(sorted(set(fed.sites) - cut))
    lie = ConsistencyRequest(recipient=A, config_digest=fed.config.digest(), survivors=survivors)
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].consistency(lie)
    assert info.value.reason is FailureReason.SURVIVORS_DISCONNECTED


def test_client_refuses_survivors_that_leave_too_few_of_its_share_holders() -> None:
    # 4-regular graph, share threshold 3: two of A's four neighbours listed as dropped leaves 3 holders (ok),
    # three leaves 2 (refused)
    fed = make_federation(12, 7, 4, full_graph_max_sites=4, neighbourhood_size=4)
    directories = fed.advertise()
    graph = fed.server.graph
    bundles = fed.share(directories)
    inputs = fed.inputs(0)
    for s in fed.sites:
        fed.clients[s].masked_input(bundles[s], inputs[s])
    gone = set(sorted(graph.of(A))[:3])
    survivors = tuple(sorted(set(fed.sites) - gone))
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].consistency(
            ConsistencyRequest(recipient=A, config_digest=fed.config.digest(), survivors=survivors)
        )
    assert info.value.reason is FailureReason.NEIGHBOURHOOD_TOO_SMALL


def test_misaddressed_message_is_refused_without_aborting_so_the_driver_can_retry() -> None:
    fed = make_federation(3, 2)
    directories = fed.advertise()
    with pytest.raises(SecAggProtocolError):
        fed.clients[A].share_keys(directories[B])
    assert fed.clients[A].stage is Stage.SHARE_KEYS
    fed.clients[A].share_keys(directories[A])
    assert fed.clients[A].stage is Stage.MASKED_INPUT


def test_unmask_response_cannot_carry_two_shares_of_one_owner() -> None:
    share = RevealedShare(owner=B, kind=ShareKind.SELF_MASK_SEED, share=bytes(66))
    other = RevealedShare(owner=B, kind=ShareKind.PAIRWISE_KEY, share=bytes(66))
    with pytest.raises(SecAggMessageError):
        UnmaskResponse(site_id=A, config_digest=bytes(32), shares=(share, other))

"""Guards against a lying server or peer: each one tries to break a guarantee and must be refused."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from secagg_federation import Federation, make_federation

from fedhealth.core import CryptoError
from fedhealth.crypto import AgreementKey, IdentityKey, sign_json
from fedhealth.secagg import (
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
    UnmaskRequest,
    UnmaskResponse,
)
from fedhealth.secagg._derive import advertisement_payload

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


def test_a_request_for_both_shares_of_one_site_cannot_be_built_or_decoded() -> None:
    fed = make_federation(3, 2)
    digest = fed.config.digest()
    with pytest.raises(SecAggSecurityError):
        UnmaskRequest(recipient=A, config_digest=digest, survivors=(A, B), dropped=(B,))
    honest = UnmaskRequest(recipient=A, config_digest=digest, survivors=(A, B), dropped=(C,)).to_json()
    honest["dropped"] = [B, C]
    with pytest.raises(SecAggSecurityError):
        UnmaskRequest.from_json(honest)


def _to_unmask(n: int, t: int) -> tuple[Federation, dict[str, UnmaskRequest]]:
    fed = make_federation(n, t)
    inputs = fed.inputs(0)
    requests = fed.mask(fed.share(fed.advertise()), inputs)
    return fed, requests


def test_client_refuses_to_unmask_when_fewer_than_threshold_survived() -> None:
    fed, requests = _to_unmask(5, 3)
    lie = dataclasses.replace(requests[A], survivors=(A, B), dropped=(C, "site-03", "site-04"))
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].unmask(lie)
    assert info.value.reason is FailureReason.TOO_FEW_SITES
    assert fed.clients[A].stage is Stage.FAILED


def test_client_refuses_to_unmask_when_told_it_dropped() -> None:
    fed, requests = _to_unmask(4, 3)
    lie = dataclasses.replace(requests[A], survivors=(B, C, "site-03"), dropped=(A,))
    with pytest.raises(SecAggSecurityError):
        fed.clients[A].unmask(lie)


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


def test_a_server_lying_about_who_dropped_never_gets_both_shares_of_a_site() -> None:
    # The server tells some clients that E survived and others that it dropped. Honest clients each reveal one
    # kind per peer, so with t > n/2 the two kinds come from disjoint sets and cannot both reach t.
    n, t = 5, 3
    target = "site-04"
    for split in itertools.product([True, False], repeat=n - 1):
        fed, requests = _to_unmask(n, t)
        others = [s for s in fed.sites if s != target]
        seed_shares, key_shares = 0, 0
        for site, told_alive in zip(others, split, strict=True):
            request = requests[site]
            if not told_alive:
                survivors = tuple(s for s in fed.sites if s != target)
                request = dataclasses.replace(request, survivors=survivors, dropped=(target,))
            response = fed.clients[site].unmask(request)
            kinds = {s.kind for s in response.shares if s.owner == target}
            assert len(kinds) == 1
            seed_shares += ShareKind.SELF_MASK_SEED in kinds
            key_shares += ShareKind.PAIRWISE_KEY in kinds
        # the target itself was told the truth (it sent its masked input), so it reveals its seed share
        own = fed.clients[target].unmask(requests[target])
        seed_shares += any(s.owner == target and s.kind is ShareKind.SELF_MASK_SEED for s in own.shares)
        assert not (seed_shares >= t and key_shares >= t)


def test_disconnected_survivor_list_is_refused_by_clients() -> None:
    fed = make_federation(8, 5, 4, full_graph_max_sites=2, neighbourhood_size=2)
    graph = fed.config.graph()
    requests = fed.mask(fed.share(fed.advertise()), fed.inputs(0))
    # cut the ring at two places by claiming two non-adjacent sites dropped
    ring = [A]
    while len(ring) < 8:
        ring.append(next(nb for nb in sorted(graph.of(ring[-1])) if nb not in ring))
    cut = (ring[2], ring[6])
    survivors = tuple(sorted(set(fed.sites) - set(cut)))
    lie = dataclasses.replace(requests[A], survivors=survivors, dropped=tuple(sorted(cut)))
    with pytest.raises(RoundFailedError) as info:
        fed.clients[A].unmask(lie)
    assert info.value.reason is FailureReason.SURVIVORS_DISCONNECTED


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

"""Every key, seed, signature payload and associated-data string of a round, in one place.

Each binds the protocol version, study, round and the configuration digest, plus its own purpose and the
parties (the ordered pair ``[lower id, higher id]`` for pairwise values), so nothing derived for one round,
pair or purpose is useful for another. Everything after the key advertisements (share boxes, pairwise masks,
consistency signatures) also binds the graph seed, which hashes every advertisement a site was shown: two
sites shown different key directories cannot open each other's boxes, mask with each other, or count each
other's consistency signatures. Contexts are serialized as canonical JSON (see
:func:`~fedhealth.secagg._crypto_extra.context_json`); signatures are Ed25519 over the same bytes that
:func:`fedhealth.crypto.sign_json` would sign.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fedhealth.crypto import AgreementKey, IdentityKey, PublicIdentity
from fedhealth.secagg._config import SecAggConfig
from fedhealth.secagg._crypto_extra import context_json, derive
from fedhealth.secagg._messages import KeyAdvertisement

GRAPH_SEED_DOMAIN = b"fedhealth-secagg-graph-seed/2\x00"  # fields are fixed-length or length-prefixed

Context = dict[str, str | int | list[str]]


def _context(config: SecAggConfig, digest: bytes, purpose: str) -> Context:
    return {
        "protocol": config.protocol_version,
        "study": config.study_id,
        "round": config.round,
        "config_digest": digest.hex(),
        "purpose": purpose,
    }


def advertisement_payload(
    config: SecAggConfig, digest: bytes, site_id: str, cipher_public_key: bytes, mask_public_key: bytes
) -> Context:
    """What a site signs with its identity key when it advertises its ephemeral keys."""
    return {
        **_context(config, digest, "secagg-advertise-keys"),
        "site": site_id,
        "cipher_public_key": cipher_public_key.hex(),
        "mask_public_key": mask_public_key.hex(),
    }


def graph_seed(digest: bytes, advertisements: Iterable[KeyAdvertisement]) -> bytes:
    """The neighbourhood-graph seed: sha256 over a domain string, the configuration digest and every field of
    every advertisement (site id, digest, both public keys, signature), sorted by site; the site id is
    length-prefixed and the other fields have fixed lengths, so the encoding is unambiguous.

    Every advertisement carries fresh random keys signed by its site, so the orchestrator cannot choose the
    seed; it can only choose which advertisements to show (docs/secure-aggregation.md says why that is
    harmless).
    """
    h = hashlib.sha256(GRAPH_SEED_DOMAIN)
    h.update(digest)
    for advert in sorted(advertisements, key=lambda a: a.site_id):
        site = advert.site_id.encode()
        h.update(len(site).to_bytes(2, "big"))
        h.update(site)
        h.update(advert.config_digest)
        h.update(advert.cipher_public_key)
        h.update(advert.mask_public_key)
        h.update(advert.signature)
    return h.digest()


def consistency_payload(
    config: SecAggConfig, digest: bytes, seed: bytes, survivors: Iterable[str]
) -> Context:
    """What a site signs in the consistency round: the survivor set it was told, bound to the round (study
    and attempt are in ``config.study_id``), the configuration digest and the graph seed."""
    return {
        **_context(config, digest, "secagg-consistency"),
        "graph_seed": seed.hex(),
        "survivors": sorted(survivors),
    }


def pair(a: str, b: str) -> list[str]:
    return [a, b] if a < b else [b, a]


def share_key(
    config: SecAggConfig,
    digest: bytes,
    seed: bytes,
    own: AgreementKey,
    peer_public: bytes,
    me: str,
    peer: str,
) -> bytes:
    """The AEAD key for share boxes between two sites (same both ways; the AD names the direction)."""
    secret = own.exchange(peer_public)
    context = {**_context(config, digest, "secagg-share-encryption"), "graph_seed": seed.hex()}
    return derive(secret, {**context, "pair": pair(me, peer)})


def pairwise_mask_seed(
    config: SecAggConfig,
    digest: bytes,
    seed: bytes,
    own: AgreementKey,
    peer_public: bytes,
    me: str,
    peer: str,
) -> bytes:
    """The seed of the mask two sites add with opposite signs (the lower id adds, the higher subtracts)."""
    secret = own.exchange(peer_public)
    context = {**_context(config, digest, "secagg-pairwise-mask"), "graph_seed": seed.hex()}
    return derive(secret, {**context, "pair": pair(me, peer)})


def self_mask_seed(config: SecAggConfig, digest: bytes, seed: bytes, site_id: str) -> bytes:
    """The AES key of a site's self mask, from the 32-byte seed it secret-shares."""
    return derive(seed, {**_context(config, digest, "secagg-self-mask"), "site": site_id})


def self_mask_commitment(config: SecAggConfig, digest: bytes, seed: bytes, site_id: str) -> bytes:
    """A hash commitment to the self-mask seed, so the server can check the seed it reconstructs."""
    prefix = context_json({**_context(config, digest, "secagg-self-mask-commitment"), "site": site_id})
    return hashlib.sha256(prefix + seed).digest()


def box_associated_data(
    config: SecAggConfig, digest: bytes, seed: bytes, sender: str, recipient: str
) -> bytes:
    """AEAD associated data of a share box: a box cannot be replayed to another round, pair, direction or
    key directory."""
    return context_json(
        {
            **_context(config, digest, "secagg-share-box"),
            "graph_seed": seed.hex(),
            "sender": sender,
            "recipient": recipient,
        }
    )


def sign_payload(key: IdentityKey, payload: Context) -> bytes:
    """Ed25519 signature of the payload's canonical JSON (what ``crypto.sign_json`` produces)."""
    return key.sign(context_json(payload))


def verify_payload(public: PublicIdentity, signature: bytes, payload: Context) -> None:
    """Raise :class:`fedhealth.core.CryptoError` unless ``signature`` signs the payload's canonical JSON."""
    public.verify(signature, context_json(payload))

"""Every key, seed, signature payload and associated-data string of a round, in one place.

Each binds the protocol version, study, round and the configuration digest, plus its own purpose and the
parties (the ordered pair ``[lower id, higher id]`` for pairwise values), so nothing derived for one round,
pair or purpose is useful for another. Contexts are serialized as canonical JSON (see
:func:`~fedhealth.secagg._crypto_extra.context_json`); signatures are Ed25519 over the same bytes that
:func:`fedhealth.crypto.sign_json` would sign.
"""

from __future__ import annotations

import hashlib

from fedhealth.crypto import AgreementKey, IdentityKey, PublicIdentity
from fedhealth.secagg._config import SecAggConfig
from fedhealth.secagg._crypto_extra import context_json, derive

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


def pair(a: str, b: str) -> list[str]:
    return [a, b] if a < b else [b, a]


def share_key(
    config: SecAggConfig, digest: bytes, own: AgreementKey, peer_public: bytes, me: str, peer: str
) -> bytes:
    """The AEAD key for share boxes between two sites (same both ways; the AD names the direction)."""
    secret = own.exchange(peer_public)
    return derive(secret, {**_context(config, digest, "secagg-share-encryption"), "pair": pair(me, peer)})


def pairwise_mask_seed(
    config: SecAggConfig, digest: bytes, own: AgreementKey, peer_public: bytes, me: str, peer: str
) -> bytes:
    """The seed of the mask two sites add with opposite signs (the lower id adds, the higher subtracts)."""
    secret = own.exchange(peer_public)
    return derive(secret, {**_context(config, digest, "secagg-pairwise-mask"), "pair": pair(me, peer)})


def self_mask_seed(config: SecAggConfig, digest: bytes, seed: bytes, site_id: str) -> bytes:
    """The AES key of a site's self mask, from the 32-byte seed it secret-shares."""
    return derive(seed, {**_context(config, digest, "secagg-self-mask"), "site": site_id})


def self_mask_commitment(config: SecAggConfig, digest: bytes, seed: bytes, site_id: str) -> bytes:
    """A hash commitment to the self-mask seed, so the server can check the seed it reconstructs."""
    prefix = context_json({**_context(config, digest, "secagg-self-mask-commitment"), "site": site_id})
    return hashlib.sha256(prefix + seed).digest()


def box_associated_data(config: SecAggConfig, digest: bytes, sender: str, recipient: str) -> bytes:
    """AEAD associated data of a share box: a box cannot be replayed to another round, pair or direction."""
    return context_json(
        {**_context(config, digest, "secagg-share-box"), "sender": sender, "recipient": recipient}
    )


def sign_payload(key: IdentityKey, payload: Context) -> bytes:
    """Ed25519 signature of the payload's canonical JSON (what ``crypto.sign_json`` produces)."""
    return key.sign(context_json(payload))


def verify_payload(public: PublicIdentity, signature: bytes, payload: Context) -> None:
    """Raise :class:`fedhealth.core.CryptoError` unless ``signature`` signs the payload's canonical JSON."""
    public.verify(signature, context_json(payload))

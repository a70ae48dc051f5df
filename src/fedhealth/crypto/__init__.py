"""Crypto: a few misuse-resistant recipes over pyca/cryptography.

Identity keys (Ed25519), key agreement (X25519), HKDF with bound context, AEAD (ChaCha20-Poly1305), an
AES-CTR keystream PRG and signatures. Verification raises :class:`fedhealth.core.CryptoError`; it never returns
a bool.
"""

from fedhealth.crypto._recipes import (
    KEY_BYTES,
    AgreementKey,
    IdentityKey,
    PublicIdentity,
    aead_decrypt,
    aead_encrypt,
    constant_time_equal,
    derive_key,
    keystream,
    keystream_uint32,
    random_bytes,
    sign_json,
    verify_json,
)

__all__ = [
    "KEY_BYTES",
    "AgreementKey",
    "IdentityKey",
    "PublicIdentity",
    "aead_decrypt",
    "aead_encrypt",
    "constant_time_equal",
    "derive_key",
    "keystream",
    "keystream_uint32",
    "random_bytes",
    "sign_json",
    "verify_json",
]

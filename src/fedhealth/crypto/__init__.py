"""Crypto: a few misuse-resistant recipes over pyca/cryptography.

Identity keys (Ed25519), key agreement (X25519), HKDF with bound context, AEAD (ChaCha20-Poly1305), an
AES-CTR keystream PRG, signatures, the federation's X.509 PKI and short-lived EdDSA access tokens.
Verification raises :class:`fedhealth.core.CryptoError`; it never returns a bool.
"""

from fedhealth.crypto._pki import (
    PemPair,
    certificate_fingerprint,
    create_ca,
    create_client_csr,
    issue_client_certificate,
    issue_server_certificate,
    sign_client_csr,
    write_private,
)
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
from fedhealth.crypto._stream import KeystreamReader
from fedhealth.crypto._tls import client_tls_for_url, pinned_tls_context
from fedhealth.crypto._tokens import Audience, TokenClaims, TokenExpiredError, TokenIssuer, TokenVerifier

__all__ = [
    "KEY_BYTES",
    "AgreementKey",
    "Audience",
    "IdentityKey",
    "KeystreamReader",
    "PemPair",
    "PublicIdentity",
    "TokenClaims",
    "TokenExpiredError",
    "TokenIssuer",
    "TokenVerifier",
    "aead_decrypt",
    "aead_encrypt",
    "certificate_fingerprint",
    "client_tls_for_url",
    "constant_time_equal",
    "create_ca",
    "create_client_csr",
    "derive_key",
    "issue_client_certificate",
    "issue_server_certificate",
    "keystream",
    "keystream_uint32",
    "pinned_tls_context",
    "random_bytes",
    "sign_client_csr",
    "sign_json",
    "verify_json",
    "write_private",
]

"""Safe recipes over pyca/cryptography. Primitives are used only here; callers get hard-to-misuse recipes.

- Every derived key binds its context (protocol, purpose, study, round, ordered parties) through HKDF's info,
  serialized as canonical JSON, so a key derived for one purpose is useless for another.
- Verification and decryption raise :class:`CryptoError` with an opaque message; they never return a bool.
- Randomness comes from the OS; deterministic construction from given bytes exists for known-answer tests and
  for keys loaded from storage.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedhealth.core import CryptoError, canonical_json, sha256_hex, write_private_file

KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 64 << 10  # a PKCS#8 PEM Ed25519 key is 119 bytes
NONCE_BYTES = 12
_OPAQUE = "cryptographic verification failed"


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare secrets without leaking where they differ."""
    return hmac.compare_digest(a, b)


# --- identity: Ed25519 -----------------------------------------------------------------------------------


class PublicIdentity:
    """An Ed25519 public key: verifies signatures, has a stable fingerprint."""

    __slots__ = ("_key", "_raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise CryptoError("an Ed25519 public key is 32 bytes")
        try:
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise CryptoError(_OPAQUE) from exc
        self._raw = bytes(raw)

    @property
    def raw(self) -> bytes:
        return self._raw

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the raw public key."""
        return sha256_hex(self._raw)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise :class:`CryptoError` unless ``signature`` is this key's signature of ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature as exc:
            raise CryptoError(_OPAQUE) from exc

    def crypto_key(self) -> Ed25519PublicKey:
        """The pyca object, for libraries that need it (X.509, JWT)."""
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicIdentity) and constant_time_equal(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicIdentity({self.fingerprint[:16]})"


class IdentityKey:
    """An Ed25519 signing key (a site's or the orchestrator's long-term identity)."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> IdentityKey:
        if len(raw) != KEY_BYTES:
            raise CryptoError("an Ed25519 private key is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def public(self) -> PublicIdentity:
        return PublicIdentity(
            self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def crypto_key(self) -> Ed25519PrivateKey:
        """The pyca object, for libraries that need it (X.509, JWT)."""
        return self._key

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM, readable by the owner only (mode 0600), atomically."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private_file(path, pem)

    @classmethod
    def load(cls, path: Path) -> IdentityKey:
        """Read a key written by :meth:`save`; refuse one that others can read, or that another account owns
        (it could replace the key with its own). Both are checked on the file as opened, so a file swapped in
        after the check is never the one read. What is not a regular file (a FIFO would block the reader), a
        file larger than a key, and one that is not an unencrypted Ed25519 private key in PEM (another kind of
        key, a public key, a password-protected key, garbage) are a :class:`CryptoError` too; a file that
        cannot be opened is the :class:`OSError` of its opening."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # before fdopen: a folder would be its IsADirectoryError
            os.close(fd)
            raise CryptoError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise CryptoError(f"{path} is readable by other users (mode {mode:o}); chmod 600 it")
            if info.st_uid != os.getuid():
                raise CryptoError(
                    f"{path} is owned by another account (uid {info.st_uid}, not {os.getuid()}); "
                    "refusing a key that account could replace"
                )
            pem = f.read(MAX_KEY_FILE_BYTES + 1)
        if len(pem) > MAX_KEY_FILE_BYTES:
            raise CryptoError(f"{path} is larger than a key ({MAX_KEY_FILE_BYTES} bytes at most)")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (
            ValueError,
            TypeError,
            UnsupportedAlgorithm,
        ):  # not PEM, a public key, a password-protected key
            key = None
        if not isinstance(key, Ed25519PrivateKey):
            raise CryptoError(
                f"{path} does not hold an Ed25519 private key (unencrypted PEM, as fedhealth writes its keys)"
            )
        return cls(key)


def sign_json(key: IdentityKey, payload: Mapping[str, object]) -> bytes:
    """Sign the canonical JSON of ``payload``."""
    return key.sign(canonical_json(dict(payload)))


def verify_json(public: PublicIdentity, signature: bytes, payload: Mapping[str, object]) -> None:
    """Verify a :func:`sign_json` signature; raises :class:`CryptoError`."""
    public.verify(signature, canonical_json(dict(payload)))


# --- key agreement: X25519 ------------------------------------------------------------------------------


class AgreementKey:
    """An X25519 key for one Diffie-Hellman agreement (ephemeral: one per protocol run)."""

    __slots__ = ("_key",)

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> AgreementKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> AgreementKey:
        if len(raw) != KEY_BYTES:
            raise CryptoError("an X25519 private key is 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def exchange(self, peer_public: bytes) -> bytes:
        """The raw shared secret with ``peer_public``: feed it to :func:`derive_key`, never use it as is."""
        if len(peer_public) != KEY_BYTES:
            raise CryptoError(_OPAQUE)
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # low-order point: all-zero shared secret
            raise CryptoError(_OPAQUE) from exc


# --- derivation, encryption, keystream ------------------------------------------------------------------


def derive_key(secret: bytes, context: Mapping[str, object], *, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` with ``context`` (canonical JSON) bound in as the info string."""
    if not context.get("purpose"):
        raise CryptoError("a derivation context must name its purpose")
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=canonical_json(dict(context))
    ).derive(secret)


def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 with a fresh random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Open a box from :func:`aead_encrypt`; raises :class:`CryptoError` on any tampering."""
    if len(sealed) < NONCE_BYTES + 16:
        raise CryptoError(_OPAQUE)
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise CryptoError(_OPAQUE) from exc


def keystream(seed: bytes, n_bytes: int) -> bytes:
    """``n_bytes`` of AES-256-CTR keystream under ``seed`` (a 32-byte key used for this one stream)."""
    if len(seed) != KEY_BYTES:
        raise CryptoError("a keystream seed is 32 bytes")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    return encryptor.update(b"\x00" * n_bytes) + encryptor.finalize()


def keystream_uint32(seed: bytes, count: int) -> np.ndarray:
    """``count`` uniformly random uint32 values from the AES-CTR keystream under ``seed``."""
    return np.frombuffer(keystream(seed, 4 * count), dtype="<u4").astype(np.uint32, copy=False)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)

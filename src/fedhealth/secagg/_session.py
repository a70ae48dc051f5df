"""What both sides of a collective session share: the configuration, the call format, the session keys'
adverts, the failure reasons and the uint64 masks (the protocol is described in
:mod:`fedhealth.secagg._collective`)."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from fedhealth.core import ConfigError, canonical_json, is_valid_name
from fedhealth.crypto import KEY_BYTES
from fedhealth.secagg._crypto_extra import context_json
from fedhealth.secagg._errors import SecAggMessageError, SecAggProtocolError
from fedhealth.secagg._fixedpoint import check_range, encode_into

COLLECTIVE_PROTOCOL = "fedhealth-collective/1"
MIN_SITES = 3
MAX_SITES = 10_000
# 512 MiB of uint64: the orchestrator's default upload limit; far above any histogram a recipe sums
MAX_VECTOR_LENGTH = 1 << 26
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
SETUP_INDEX = 0

_MAGIC = b"FHCS"
_HEADER = struct.Struct("<4sBBH")  # magic, op, flags (reserved, 0), reserved: 8 bytes keep vectors aligned
HEADER_BYTES = _HEADER.size
_CHUNK = 1 << 15  # uint64 entries per masking step: 256 KiB, so the target chunk stays in cache
_ZERO_NONCE = b"\x00" * 16
_ZEROS = memoryview(bytes(8 * _CHUNK))  # what a mask stream encrypts: its keystream is the mask
BROADCAST_DOMAIN = b"fedhealth-collective-broadcast/1\x00"


class CollectiveOp(IntEnum):
    """What a call does; every participant must send the same op for an index."""

    SETUP = 1
    SUM = 2
    BROADCAST = 3
    BARRIER = 4
    END = 5
    SEAL = 6  # the leader's sealed group secret: relayed like a broadcast, never kept as a result


class SessionFailure(StrEnum):
    """Why a session stopped without a result (nothing unmasked is ever revealed)."""

    SITE_LOST = "site_lost"
    """A participant did not take part in a collective in time, or its task ended."""
    PROTOCOL_VIOLATION = "protocol_violation"
    """A participant sent what the session's rules refuse (another op, length or index than the others)."""
    SECURITY = "security"
    """A signature or key did not verify: a participant or the relay is lying."""
    ABORTED = "aborted"
    """The driver stopped the session (deadline, study cancelled, shutdown)."""


class SessionFailedError(SecAggProtocolError):
    """The session cannot go on; it failed cleanly and revealed nothing unmasked."""

    def __init__(self, reason: SessionFailure, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


# --- configuration ------------------------------------------------------------------------------------------


def participants_problem(n: int, collusion: int) -> str | None:
    """Why ``n`` sites tolerating ``collusion`` colluders cannot hold a collective session, or None.

    A sum over every participant minus one's own input is the sum of the others: with 2 sites that is the
    other site's vector, and with ``c`` colluders the orchestrator learns the sum of the ``n - c`` others.
    """
    if n < MIN_SITES:
        return (
            f"a collective session needs at least {MIN_SITES} sites, got {n} "
            "(with 2, the sum reveals the other site's vector)"
        )
    if collusion < 0:
        return f"the collusion bound must be at least 0, got {collusion}"
    if n - collusion < 2:
        return (
            f"{n} sites tolerating {collusion} colluding sites leave {n - collusion} honest site(s): a sum "
            "must cover at least 2 sites outside the collusion bound"
        )
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveConfig:
    """One session's public parameters; every advert signs its digest, every derivation binds it."""

    study_id: str
    round: int
    attempt: str
    spec_hash: str
    sites: tuple[str, ...]
    collusion: int = 0
    protocol_version: str = COLLECTIVE_PROTOCOL

    def __post_init__(self) -> None:
        if not isinstance(self.study_id, str) or not 0 < len(self.study_id) <= 128:
            raise ConfigError("study_id must be a non-empty string of at most 128 characters")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ConfigError("round must be a non-negative integer")
        if not isinstance(self.attempt, str) or not 0 < len(self.attempt) <= 64:
            raise ConfigError("attempt must be a non-empty string of at most 64 characters")
        if not isinstance(self.spec_hash, str) or len(self.spec_hash) != 64:
            raise ConfigError("spec_hash must be the 64-character sha256 hex of the approved spec")
        if not isinstance(self.sites, tuple) or not all(isinstance(s, str) for s in self.sites):
            raise ConfigError("sites must be a tuple of site ids")
        bad = [s for s in self.sites if not is_valid_name(s)]
        if bad:
            raise ConfigError(f"invalid site ids: {bad}")
        if list(self.sites) != sorted(set(self.sites)):
            raise ConfigError("sites must be sorted and distinct")
        if len(self.sites) > MAX_SITES:
            raise ConfigError(f"a collective session has at most {MAX_SITES} sites")
        if isinstance(self.collusion, bool) or not isinstance(self.collusion, int):
            raise ConfigError("collusion must be an integer")
        problem = participants_problem(len(self.sites), self.collusion)
        if problem is not None:
            raise ConfigError(problem)
        if self.protocol_version != COLLECTIVE_PROTOCOL:
            raise ConfigError(f"unsupported protocol version {self.protocol_version!r}")

    @property
    def n(self) -> int:
        return len(self.sites)

    @property
    def leader(self) -> str:
        """The site whose broadcasts the others receive: the first by name."""
        return self.sites[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol_version": self.protocol_version,
            "study_id": self.study_id,
            "round": self.round,
            "attempt": self.attempt,
            "spec_hash": self.spec_hash,
            "sites": list(self.sites),
            "collusion": self.collusion,
        }

    def digest(self) -> bytes:
        """sha256 of the canonical JSON: the session's identity, bound into every key, signature and tag."""
        return hashlib.sha256(canonical_json(self.to_json())).digest()


# --- wire ---------------------------------------------------------------------------------------------------


def encode_call(op: CollectiveOp, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """A call's body: an 8-byte header (magic, op) and the payload (for a sum: little-endian uint64)."""
    return _HEADER.pack(_MAGIC, op, 0, 0) + bytes(payload)


def decode_call(body: bytes | bytearray | memoryview) -> tuple[CollectiveOp, memoryview]:
    """The op and a view of the payload; :class:`SecAggMessageError` for anything else."""
    if len(body) < HEADER_BYTES:
        raise SecAggMessageError("a collective call starts with an 8-byte header")
    magic, op, flags, reserved = _HEADER.unpack_from(body)
    if magic != _MAGIC or flags or reserved:
        raise SecAggMessageError("not a collective call (bad magic or reserved bits)")
    try:
        kind = CollectiveOp(op)
    except ValueError:
        raise SecAggMessageError(f"unknown collective op {op}") from None
    return kind, memoryview(body)[HEADER_BYTES:]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionAdvert:
    """A site's ephemeral X25519 key for one session, signed by its identity key with the config digest."""

    site_id: str
    config_digest: bytes
    public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.site_id, str) or not is_valid_name(self.site_id):
            raise SecAggMessageError("site_id is not a valid site id")
        for name, length in (("config_digest", 32), ("public_key", PUBLIC_KEY_BYTES)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != length:
                raise SecAggMessageError(f"{name} must be {length} bytes")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise SecAggMessageError(f"signature must be {SIGNATURE_BYTES} bytes")

    def to_json(self) -> dict[str, str]:
        return {
            "site_id": self.site_id,
            "config_digest": self.config_digest.hex(),
            "public_key": self.public_key.hex(),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: object) -> SessionAdvert:
        if not isinstance(data, dict) or set(data) != {"site_id", "config_digest", "public_key", "signature"}:
            raise SecAggMessageError("an advert has exactly site_id, config_digest, public_key and signature")
        try:
            return cls(
                site_id=data["site_id"],
                config_digest=bytes.fromhex(data["config_digest"]),
                public_key=bytes.fromhex(data["public_key"]),
                signature=bytes.fromhex(data["signature"]),
            )
        except (TypeError, ValueError) as exc:
            raise SecAggMessageError(f"malformed advert: {exc}") from exc

    def to_bytes(self) -> bytes:
        return context_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SessionAdvert:
        return cls.from_json(load_json(data))

    def signed_payload(self) -> bytes:
        return advert_payload(self.config_digest, self.site_id, self.public_key)


def advert_payload(config_digest: bytes, site: str, public_key: bytes) -> bytes:
    """What a site signs when it advertises its session key."""
    return context_json(
        {
            "protocol": COLLECTIVE_PROTOCOL,
            "purpose": "collective-advertise",
            "config_digest": config_digest.hex(),
            "site": site,
            "public_key": public_key.hex(),
        }
    )


def load_json(data: bytes | memoryview) -> Any:
    if len(data) > 16 << 20:
        raise SecAggMessageError("a collective control message is at most 16 MiB")
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SecAggMessageError("a collective control message must be JSON") from exc


def adverts_digest(config_digest: bytes, adverts: list[SessionAdvert]) -> bytes:
    h = hashlib.sha256(b"fedhealth-collective-adverts/1\x00")
    h.update(config_digest)
    for advert in adverts:  # sorted by site by the caller; every field fixed-length but the prefixed id
        site = advert.site_id.encode()
        h.update(len(site).to_bytes(2, "big"))
        h.update(site)
        h.update(advert.public_key)
        h.update(advert.signature)
    return h.digest()


def broadcast_message(config_digest: bytes, index: int, payload: bytes | memoryview) -> bytes:
    return BROADCAST_DOMAIN + config_digest + index.to_bytes(8, "big") + bytes(payload)


# --- masks --------------------------------------------------------------------------------------------------


def apply_masks64(target: NDArray[np.uint64], add: list[bytes], subtract: list[bytes]) -> None:
    """``target += sum(PRG(k) for k in add) - sum(PRG(k) for k in subtract)`` mod 2^64, in place, where
    ``PRG(k)`` is the AES-256-CTR keystream under ``k`` read as little-endian uint64 (each key keys exactly
    one stream, so the zero counter block is safe)."""
    if target.dtype != np.uint64 or target.ndim != 1 or not target.flags.writeable:
        raise ValueError("masks apply to writeable 1-D uint64 vectors")
    _Masker(add, subtract, min(_CHUNK, max(target.size, 1))).apply(target)


class _Masker:
    """The mask streams of one call, advanced chunk by chunk with every stream together, so each chunk of
    the target is read and written while it sits in cache and nothing larger than a chunk is allocated.
    ``words`` (at least ``8 * width + 15`` bytes) is where a stream's next words are drawn."""

    def __init__(
        self, add: list[bytes], subtract: list[bytes], width: int, words: bytearray | None = None
    ) -> None:
        self.streams = [(_aes_ctr(k), np.add) for k in add] + [(_aes_ctr(k), np.subtract) for k in subtract]
        self.width = width
        self.scratch = bytearray(8 * width + 15) if words is None else words

    def apply(self, part: NDArray[np.uint64]) -> None:
        """Add the streams' next ``part.size`` words to ``part`` (call it on the target's chunks in order)."""
        for offset in range(0, part.size, self.width):
            piece = part[offset : offset + self.width]
            count = piece.size
            block = _ZEROS[: 8 * count]  # a view: no copy
            words = np.frombuffer(self.scratch, dtype="<u8", count=count)
            for encryptor, op in self.streams:
                encryptor.update_into(block, self.scratch)
                op(piece, words, out=piece)


class CallBuffer:
    """Memory a site reuses for its call bodies: faulting in a fresh 8 MB for every call of a long session
    costs as much as masking it. A body built here is valid until the next one of the same size. It also
    holds the chunk-sized scratch space a body is built with."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.values = np.empty(_CHUNK, dtype=np.float64)  # one chunk of scaled values
        self.words = bytearray(8 * _CHUNK + 15)  # one chunk of a mask stream (update_into wants 15 more)

    def take(self, size: int) -> bytearray:
        if len(self._data) != size:
            self._data = bytearray(size)  # a new one: views of the old may still be alive
        return self._data


def masked_sum_call(
    values: NDArray[np.float64],
    n_sites: int,
    add: list[bytes],
    subtract: list[bytes],
    buffer: CallBuffer | None = None,
) -> bytes | memoryview:
    """A sum call's body: the header, then ``values`` (flat float64) in fixed point with the masks added and
    subtracted, built chunk by chunk in one buffer (range check, scaling, rounding and masks on each chunk
    while it is in cache). Raises :class:`~fedhealth.secagg.FixedPointRangeError` before anything is used
    up. With ``buffer`` (resized as needed) the body is written there and a view of it is returned, so a
    caller making many calls allocates (and faults in) no new memory for each."""
    n = values.size
    if n > MAX_VECTOR_LENGTH:
        raise SecAggMessageError(f"secure_sum takes at most {MAX_VECTOR_LENGTH} values")
    for start in range(0, n, _CHUNK):  # every value first: a refused vector consumes no key or index
        check_range(values[start : start + _CHUNK], n_sites, start)
    size = HEADER_BYTES + 8 * n
    target = bytearray(size) if buffer is None else buffer.take(size)
    _HEADER.pack_into(target, 0, _MAGIC, CollectiveOp.SUM, 0, 0)
    ring = np.frombuffer(target, dtype="<u8", offset=HEADER_BYTES, count=n)
    width = min(_CHUNK, max(n, 1))
    scratch = np.empty(width, dtype=np.float64) if buffer is None else buffer.values
    masker = (
        _Masker(add, subtract, width, None if buffer is None else buffer.words) if add or subtract else None
    )
    for start in range(0, n, _CHUNK):
        part = ring[start : start + _CHUNK]
        encode_into(values[start : start + _CHUNK], part, scratch)
        if masker is not None:
            masker.apply(part)
    return bytes(target) if buffer is None else memoryview(target)


def _aes_ctr(key: bytes) -> Any:
    if len(key) != KEY_BYTES:
        raise ValueError("a mask key is 32 bytes")
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()

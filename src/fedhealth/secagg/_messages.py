"""The messages of one SecAgg+ round: frozen values with explicit, pickle-free encodings.

Small messages are canonical JSON with base64 for bytes (``to_json``/``from_json``,
``to_bytes``/``from_bytes``). The masked vector travels as raw little-endian uint32:
:meth:`MaskedInput.to_bytes` (a short JSON header then the raw array) or :meth:`MaskedInput.to_safetensors`,
so the upload is 4 bytes per parameter plus a constant.
Every message names the round by the digest of its :class:`~fedhealth.secagg.SecAggConfig`; a message carrying
another round's digest is refused by the party that receives it.

    client -> server   KeyAdvertisement   EncryptedShares   MaskedInput   ConsistencySignature  UnmaskResponse
    server -> client   KeyDirectory       ShareBundle       ConsistencyRequest  UnmaskRequest
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeAlias

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import (
    InputError,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    is_valid_name,
)
from fedhealth.secagg._errors import SecAggMessageError
from fedhealth.secagg._shamir import SHARE_BYTES

DIGEST_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
COMMITMENT_BYTES = 32
MAX_JSON_BYTES = 64 << 20
# config.MAX_SITES: a directory or survivor list never names more sites than a round has
MAX_DIRECTORY = 10_000
_MASKED_MAGIC = b"FHSAMI01"


# --- field helpers ---------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise SecAggMessageError(f"{what} must be base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SecAggMessageError(f"{what} is not valid base64") from exc
    if length is not None and len(raw) != length:
        raise SecAggMessageError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def _field(data: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise SecAggMessageError(f"missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise SecAggMessageError(f"field {key!r} must be {kind.__name__}")
    return value


def _check_site(value: object, what: str) -> None:
    if not isinstance(value, str) or not is_valid_name(value):
        raise SecAggMessageError(f"{what} is not a valid site id")


def _check_bytes(value: object, what: str, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise SecAggMessageError(f"{what} must be {length} bytes")


def _canonical(value: dict[str, Any]) -> bytes:
    # core.canonical_json's format (sorted keys, no whitespace, UTF-8) without its recursive finiteness check:
    # these dicts hold only strings, integers, lists and dicts, and the check was most of the encoding time
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _load_json(data: bytes, kind: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise SecAggMessageError("message too large")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SecAggMessageError("message is not JSON") from exc
    if not isinstance(obj, dict):
        raise SecAggMessageError("message must be a JSON object")
    if obj.get("kind") != kind:
        raise SecAggMessageError(f"expected a {kind} message, got {obj.get('kind')!r}")
    return obj


class _JsonMessage:
    """Shared byte encoding of the JSON messages."""

    __slots__ = ()
    KIND: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return _canonical(self.to_json())


# --- client -> server: key advertisement -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyAdvertisement(_JsonMessage):
    """A site's two ephemeral X25519 public keys, signed by its identity key together with the round."""

    KIND: ClassVar[str] = "secagg.key_advertisement"
    site_id: str
    config_digest: bytes
    cipher_public_key: bytes
    mask_public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_site(self.site_id, "site_id")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        _check_bytes(self.cipher_public_key, "cipher_public_key", PUBLIC_KEY_BYTES)
        _check_bytes(self.mask_public_key, "mask_public_key", PUBLIC_KEY_BYTES)
        _check_bytes(self.signature, "signature", SIGNATURE_BYTES)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "site_id": self.site_id,
            "config_digest": _b64(self.config_digest),
            "cipher_public_key": _b64(self.cipher_public_key),
            "mask_public_key": _b64(self.mask_public_key),
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyAdvertisement:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        return cls(
            site_id=_field(data, "site_id", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            cipher_public_key=_unb64(
                _field(data, "cipher_public_key", str), "cipher_public_key", PUBLIC_KEY_BYTES
            ),
            mask_public_key=_unb64(_field(data, "mask_public_key", str), "mask_public_key", PUBLIC_KEY_BYTES),
            signature=_unb64(_field(data, "signature", str), "signature", SIGNATURE_BYTES),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvertisement:
        return cls.from_json(_load_json(data, cls.KIND))


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyDirectory(_JsonMessage):
    """Server -> one site: every advertisement that arrived in time (U1, its own too), sorted by site.

    Each client verifies all of them and hashes them into the neighbourhood-graph seed."""

    KIND: ClassVar[str] = "secagg.key_directory"
    recipient: str
    config_digest: bytes
    advertisements: tuple[KeyAdvertisement, ...]

    def __post_init__(self) -> None:
        _check_site(self.recipient, "recipient")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        if not isinstance(self.advertisements, tuple) or not all(
            isinstance(a, KeyAdvertisement) for a in self.advertisements
        ):
            raise SecAggMessageError("advertisements must be a tuple of KeyAdvertisement")
        if len(self.advertisements) > MAX_DIRECTORY:
            raise SecAggMessageError(f"at most {MAX_DIRECTORY} advertisements")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "recipient": self.recipient,
            "config_digest": _b64(self.config_digest),
            "advertisements": [a.to_json() for a in self.advertisements],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyDirectory:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        items = _field(data, "advertisements", list)
        if not all(isinstance(a, dict) for a in items):
            raise SecAggMessageError("advertisements must be objects")
        return cls(
            recipient=_field(data, "recipient", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            advertisements=tuple(KeyAdvertisement.from_json(a) for a in items),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyDirectory:
        return cls.from_json(_load_json(data, cls.KIND))


# --- share keys ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareBox:
    """One site's Shamir shares for one neighbour, sealed with AEAD under their pairwise share key."""

    sender: str
    recipient: str
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_site(self.sender, "sender")
        _check_site(self.recipient, "recipient")
        if not isinstance(self.ciphertext, bytes) or len(self.ciphertext) > 4096:
            raise SecAggMessageError("ciphertext must be at most 4096 bytes")

    def to_json(self) -> dict[str, Any]:
        return {"sender": self.sender, "recipient": self.recipient, "ciphertext": _b64(self.ciphertext)}

    @classmethod
    def from_json(cls, data: object) -> ShareBox:
        if not isinstance(data, dict):
            raise SecAggMessageError("a share box must be an object")
        return cls(
            sender=_field(data, "sender", str),
            recipient=_field(data, "recipient", str),
            ciphertext=_unb64(_field(data, "ciphertext", str), "ciphertext"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedShares(_JsonMessage):
    """Client -> server: sealed shares for each neighbour, and a hash commitment to the self-mask seed.

    The commitment lets the server check the seed it reconstructs; it reveals nothing about a 256-bit random
    seed.
    """

    KIND: ClassVar[str] = "secagg.encrypted_shares"
    site_id: str
    config_digest: bytes
    self_mask_commitment: bytes
    boxes: tuple[ShareBox, ...]

    def __post_init__(self) -> None:
        _check_site(self.site_id, "site_id")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        _check_bytes(self.self_mask_commitment, "self_mask_commitment", COMMITMENT_BYTES)
        if not isinstance(self.boxes, tuple) or not all(isinstance(b, ShareBox) for b in self.boxes):
            raise SecAggMessageError("boxes must be a tuple of ShareBox")
        if any(b.sender != self.site_id for b in self.boxes):
            raise SecAggMessageError("every box must be sent by the message's site")
        recipients = [b.recipient for b in self.boxes]
        if len(set(recipients)) != len(recipients):
            raise SecAggMessageError("two boxes for one recipient")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "site_id": self.site_id,
            "config_digest": _b64(self.config_digest),
            "self_mask_commitment": _b64(self.self_mask_commitment),
            "boxes": [b.to_json() for b in self.boxes],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EncryptedShares:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        return cls(
            site_id=_field(data, "site_id", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            self_mask_commitment=_unb64(
                _field(data, "self_mask_commitment", str), "self_mask_commitment", COMMITMENT_BYTES
            ),
            boxes=tuple(ShareBox.from_json(b) for b in _field(data, "boxes", list)),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShares:
        return cls.from_json(_load_json(data, cls.KIND))


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareBundle(_JsonMessage):
    """Server -> one site: the boxes its neighbours addressed to it; it masks with their senders."""

    KIND: ClassVar[str] = "secagg.share_bundle"
    recipient: str
    config_digest: bytes
    boxes: tuple[ShareBox, ...]

    def __post_init__(self) -> None:
        _check_site(self.recipient, "recipient")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        if not isinstance(self.boxes, tuple) or not all(isinstance(b, ShareBox) for b in self.boxes):
            raise SecAggMessageError("boxes must be a tuple of ShareBox")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "recipient": self.recipient,
            "config_digest": _b64(self.config_digest),
            "boxes": [b.to_json() for b in self.boxes],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShareBundle:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        return cls(
            recipient=_field(data, "recipient", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            boxes=tuple(ShareBox.from_json(b) for b in _field(data, "boxes", list)),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        return cls.from_json(_load_json(data, cls.KIND))


# --- masked input ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MaskedInput:
    """Client -> server: the masked vector, raw little-endian uint32 (4 bytes per entry).

    ``vector`` is read-only. Use :meth:`to_bytes` (a short JSON header, then the raw array) or
    :meth:`to_safetensors` (tensor ``masked_input``, the header fields as metadata) on the wire.
    """

    KIND: ClassVar[str] = "secagg.masked_input"
    TENSOR: ClassVar[str] = "masked_input"
    site_id: str
    config_digest: bytes
    vector: NDArray[np.uint32]

    def __post_init__(self) -> None:
        _check_site(self.site_id, "site_id")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        v = self.vector
        if not isinstance(v, np.ndarray) or v.dtype != np.uint32 or v.ndim != 1 or v.size == 0:
            raise SecAggMessageError("a masked input is a non-empty 1-D uint32 vector")

    def _header(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "site_id": self.site_id,
            "config_digest": _b64(self.config_digest),
            "length": int(self.vector.size),
        }

    def to_bytes(self) -> bytes:
        header = _canonical(self._header())
        raw = np.ascontiguousarray(self.vector, dtype="<u4")
        return b"".join((_MASKED_MAGIC, struct.pack("<I", len(header)), header, raw.data.cast("B")))

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        """Decode without copying the vector (it views ``data``)."""
        if len(data) < len(_MASKED_MAGIC) + 4 or not data.startswith(_MASKED_MAGIC):
            raise SecAggMessageError("not a masked-input message")
        start = len(_MASKED_MAGIC) + 4
        (header_len,) = struct.unpack("<I", data[len(_MASKED_MAGIC) : start])
        if header_len > 4096 or start + header_len > len(data):
            raise SecAggMessageError("masked-input header length out of range")
        header = _load_json(data[start : start + header_len], cls.KIND)
        length = _field(header, "length", int)
        body = memoryview(data)[start + header_len :]
        if length < 1 or len(body) != 4 * length:
            raise SecAggMessageError(
                f"masked input body holds {len(body)} bytes, header says {length} entries"
            )
        return cls(
            site_id=_field(header, "site_id", str),
            config_digest=_unb64(_field(header, "config_digest", str), "config_digest", DIGEST_BYTES),
            vector=np.frombuffer(body, dtype="<u4").astype(np.uint32, copy=False),
        )

    def to_safetensors(self) -> bytes:
        meta = {"kind": self.KIND, "site_id": self.site_id, "config_digest": self.config_digest.hex()}
        return encode_tensors({self.TENSOR: np.ascontiguousarray(self.vector, dtype="<u4")}, meta)

    @classmethod
    def from_safetensors(cls, data: bytes, vector_length: int) -> MaskedInput:
        try:
            tensors, meta = decode_tensors(
                data, [TensorSpec(name=cls.TENSOR, shape=(vector_length,), dtype="uint32")]
            )
        except InputError as exc:
            raise SecAggMessageError(f"not a masked-input payload: {exc}") from exc
        if meta.get("kind") != cls.KIND:
            raise SecAggMessageError("not a masked-input payload")
        try:
            digest = bytes.fromhex(meta.get("config_digest", ""))
        except ValueError as exc:
            raise SecAggMessageError("config_digest is not hex") from exc
        return cls(site_id=meta.get("site_id", ""), config_digest=digest, vector=tensors[cls.TENSOR])


# --- unmask ----------------------------------------------------------------------------------------------


class ShareKind(Enum):
    """Which secret a revealed share belongs to. The server gets at most one kind per site."""

    SELF_MASK_SEED = "self_mask_seed"
    """Of a site whose masked input arrived: removes its self mask."""
    PAIRWISE_KEY = "pairwise_key"
    """Of a site that dropped before its masked input arrived: removes its pairwise masks."""


def _check_site_list(group: object, name: str) -> None:
    if not isinstance(group, tuple):
        raise SecAggMessageError(f"{name} must be a tuple")
    if len(group) > MAX_DIRECTORY:
        raise SecAggMessageError(f"{name} names more than {MAX_DIRECTORY} sites")
    for s in group:
        _check_site(s, name)
    if list(group) != sorted(set(group)):
        raise SecAggMessageError(f"{name} must be sorted and distinct")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistencyRequest(_JsonMessage):
    """Server -> each site whose masked input arrived: the survivor set U3 (sorted), for the site to check and
    sign (Bonawitz et al. 2017, ConsistencyCheck)."""

    KIND: ClassVar[str] = "secagg.consistency_request"
    recipient: str
    config_digest: bytes
    survivors: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_site(self.recipient, "recipient")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        _check_site_list(self.survivors, "survivors")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "recipient": self.recipient,
            "config_digest": _b64(self.config_digest),
            "survivors": list(self.survivors),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConsistencyRequest:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        return cls(
            recipient=_field(data, "recipient", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            survivors=tuple(_field(data, "survivors", list)),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencyRequest:
        return cls.from_json(_load_json(data, cls.KIND))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistencySignature(_JsonMessage):
    """Site -> server: the site's Ed25519 identity signature over the survivor set it was told (see
    ``_derive.consistency_payload``)."""

    KIND: ClassVar[str] = "secagg.consistency_signature"
    site_id: str
    config_digest: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_site(self.site_id, "site_id")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        _check_bytes(self.signature, "signature", SIGNATURE_BYTES)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "site_id": self.site_id,
            "config_digest": _b64(self.config_digest),
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConsistencySignature:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        return cls(
            site_id=_field(data, "site_id", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            signature=_unb64(_field(data, "signature", str), "signature", SIGNATURE_BYTES),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencySignature:
        return cls.from_json(_load_json(data, cls.KIND))


@dataclass(frozen=True, slots=True, kw_only=True)
class SurvivorSignature:
    """One site's consistency signature, as the server forwards it in an :class:`UnmaskRequest`."""

    site_id: str
    signature: bytes

    def __post_init__(self) -> None:
        _check_site(self.site_id, "site_id")
        _check_bytes(self.signature, "signature", SIGNATURE_BYTES)

    def to_json(self) -> dict[str, Any]:
        return {"site_id": self.site_id, "signature": _b64(self.signature)}

    @classmethod
    def from_json(cls, data: object) -> SurvivorSignature:
        if not isinstance(data, dict):
            raise SecAggMessageError("a survivor signature must be an object")
        return cls(
            site_id=_field(data, "site_id", str),
            signature=_unb64(_field(data, "signature", str), "signature", SIGNATURE_BYTES),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskRequest(_JsonMessage):
    """Server -> each site that signed: the survivor set and the consistency signatures over it.

    There is no list of dropped sites: each client reveals pairwise-key shares of exactly the peers it masked
    with that are not survivors, and self-mask-seed shares of the survivors, so it never reveals both kinds
    for one site.
    """

    KIND: ClassVar[str] = "secagg.unmask_request"
    recipient: str
    config_digest: bytes
    survivors: tuple[str, ...]
    signatures: tuple[SurvivorSignature, ...]

    def __post_init__(self) -> None:
        _check_site(self.recipient, "recipient")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        _check_site_list(self.survivors, "survivors")
        if not isinstance(self.signatures, tuple) or not all(
            isinstance(s, SurvivorSignature) for s in self.signatures
        ):
            raise SecAggMessageError("signatures must be a tuple of SurvivorSignature")
        signers = [s.site_id for s in self.signatures]
        if signers != sorted(set(signers)):
            raise SecAggMessageError("signatures must be sorted by site and at most one per site")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "recipient": self.recipient,
            "config_digest": _b64(self.config_digest),
            "survivors": list(self.survivors),
            "signatures": [s.to_json() for s in self.signatures],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UnmaskRequest:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        return cls(
            recipient=_field(data, "recipient", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            survivors=tuple(_field(data, "survivors", list)),
            signatures=tuple(SurvivorSignature.from_json(s) for s in _field(data, "signatures", list)),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        return cls.from_json(_load_json(data, cls.KIND))


@dataclass(frozen=True, slots=True, kw_only=True)
class RevealedShare:
    """One Shamir share a site reveals to the server: of ``owner``'s secret of kind ``kind``."""

    owner: str
    kind: ShareKind
    share: bytes

    def __post_init__(self) -> None:
        _check_site(self.owner, "owner")
        if not isinstance(self.kind, ShareKind):
            raise SecAggMessageError("kind must be a ShareKind")
        _check_bytes(self.share, "share", SHARE_BYTES)

    def to_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "kind": self.kind.value, "share": _b64(self.share)}

    @classmethod
    def from_json(cls, data: object) -> RevealedShare:
        if not isinstance(data, dict):
            raise SecAggMessageError("a revealed share must be an object")
        try:
            kind = ShareKind(_field(data, "kind", str))
        except ValueError as exc:
            raise SecAggMessageError("unknown share kind") from exc
        return cls(
            owner=_field(data, "owner", str),
            kind=kind,
            share=_unb64(_field(data, "share", str), "share", SHARE_BYTES),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskResponse(_JsonMessage):
    """Client -> server: the shares the request entitles the server to, at most one kind per owner."""

    KIND: ClassVar[str] = "secagg.unmask_response"
    site_id: str
    config_digest: bytes
    shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _check_site(self.site_id, "site_id")
        _check_bytes(self.config_digest, "config_digest", DIGEST_BYTES)
        if not isinstance(self.shares, tuple) or not all(isinstance(s, RevealedShare) for s in self.shares):
            raise SecAggMessageError("shares must be a tuple of RevealedShare")
        owners = [s.owner for s in self.shares]
        if len(set(owners)) != len(owners):
            raise SecAggMessageError("at most one share per owner")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "site_id": self.site_id,
            "config_digest": _b64(self.config_digest),
            "shares": [s.to_json() for s in self.shares],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UnmaskResponse:
        if data.get("kind") != cls.KIND:
            raise SecAggMessageError(f"expected a {cls.KIND} message")
        return cls(
            site_id=_field(data, "site_id", str),
            config_digest=_unb64(_field(data, "config_digest", str), "config_digest", DIGEST_BYTES),
            shares=tuple(RevealedShare.from_json(s) for s in _field(data, "shares", list)),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        return cls.from_json(_load_json(data, cls.KIND))


ClientMessage: TypeAlias = (
    KeyAdvertisement | EncryptedShares | MaskedInput | ConsistencySignature | UnmaskResponse
)
ServerMessage: TypeAlias = KeyDirectory | ShareBundle | ConsistencyRequest | UnmaskRequest

_JSON_KINDS: dict[str, Any] = {
    cls.KIND: cls
    for cls in (
        KeyAdvertisement,
        KeyDirectory,
        EncryptedShares,
        ShareBundle,
        ConsistencyRequest,
        ConsistencySignature,
        UnmaskRequest,
        UnmaskResponse,
    )
}


def decode_message(data: bytes) -> ClientMessage | ServerMessage:
    """Decode any SecAgg+ message from :meth:`to_bytes` output, by its kind."""
    if data.startswith(_MASKED_MAGIC):
        return MaskedInput.from_bytes(data)
    if len(data) > MAX_JSON_BYTES:
        raise SecAggMessageError("message too large")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SecAggMessageError("message is not JSON") from exc
    if not isinstance(obj, dict) or obj.get("kind") not in _JSON_KINDS:
        raise SecAggMessageError("unknown message kind")
    message: ClientMessage | ServerMessage = _JSON_KINDS[obj["kind"]].from_json(obj)
    return message

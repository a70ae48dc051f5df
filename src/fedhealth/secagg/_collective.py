"""Collective sessions: a fixed set of sites runs many short synchronous collectives (masked sum, broadcast
from the leader, barrier) inside one task, as sans-IO state machines for a site and for the relay.

A session, as a driver sees it::

    site = CollectiveSite(config, "a", identity, peers)        # each site
    relay = CollectiveRelay(config, identities)               # the orchestrator
    relay.receive("a", 0, site.advertise())  ... (every site) -> relay.result(0) -> site.establish(result)
    body = site.prepare_sum(values);   relay.receive("a", site.pending_index, body) ...
    total = site.complete_sum(relay.result(index))           # float64, the sum over every site
    ...
    body = site.prepare_end();  ...;  site.complete_end(relay.result(index))

Index 0 is the set-up; each collective after it takes the next index, the same at every site. What the relay
learns is what it relays: the signed ephemeral keys, masked vectors (uniformly random to it), their sums,
the leader's broadcasts, and nothing else (docs/secure-aggregation.md, "Collective sessions").

- **Set-up.** Each site advertises an ephemeral X25519 key signed by its identity key over the session's
  configuration digest (protocol, study, round, attempt, approved spec hash, participants, collusion bound).
  The relay gathers every participant's advert and hands all of them to every site; a site verifies each
  against the identity the approved spec vouches for, refuses a missing, extra, unsigned or repeated one, and
  derives one seed per peer: HKDF of the X25519 secret with the configuration digest, the ordered pair and a
  hash of every advert it was shown.
- **Masks.** Call ``i``'s mask for the pair (a, b) is the AES-256-CTR keystream, read as little-endian uint64,
  under a key HKDF derives from the pair's *chain* and ``i``; the lower site name adds it, the higher
  subtracts it, so the masks cancel in the sum of all participants and in no smaller sum. Each index is used
  once: a site issues indices strictly in sequence and refuses to go back.
- **Chain.** After every call a site folds what it received into each pair's chain (an AES-GMAC tag of the
  result under a key of that pair and call, then HMAC). Two sites that were sent different results
  (equivocation) therefore derive different masks from then on: every later sum is uniformly random to the
  relay, and the session's closing exchange (each site MACs its final chain for each peer) fails at every
  honest site. Equivocation can spoil a session's result; it cannot turn into a sum over fewer sites.
- **Broadcast.** The leader (the first site by name) signs its payload with its identity key over the
  configuration digest and the index; the others check the signature, so the relay cannot forge or replay one.
- **No dropout recovery.** A site that stops answering fails the whole session (see :class:`CollectiveRelay`):
  the masks of a sum with a missing site never cancel, and no secret is ever shared that could make them.
- **At least 3 sites**, and at least 2 outside the collusion bound: with 2, each site learns the other's
  vector from the sum.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from numpy.typing import NDArray

from fedhealth.core import ConfigError, CryptoError
from fedhealth.crypto import KEY_BYTES, AgreementKey, IdentityKey, PublicIdentity, constant_time_equal
from fedhealth.secagg._client import KeyReuseGuard
from fedhealth.secagg._crypto_extra import derive
from fedhealth.secagg._errors import SecAggMessageError, SecAggProtocolError, SecAggSecurityError
from fedhealth.secagg._fixedpoint import decode_fixed, encode_fixed
from fedhealth.secagg._session import (
    COLLECTIVE_PROTOCOL,
    HEADER_BYTES,
    SETUP_INDEX,
    SIGNATURE_BYTES,
    CallBuffer,
    CollectiveConfig,
    CollectiveOp,
    SessionAdvert,
    advert_payload,
    adverts_digest,
    broadcast_message,
    encode_call,
    load_json,
    masked_sum_call,
)

_GMAC_NONCE = b"\x00" * 12  # every GMAC key is derived for one call and one pair and used once
_END_DOMAIN = b"fedhealth-collective-end/1\x00"
_CALL_DOMAIN = b"fedhealth-collective-call/1\x00"
_CHAIN_DOMAIN = b"fedhealth-collective-chain/1\x00"
_SEAL_DOMAIN = b"fedhealth-collective-group-seal/1\x00"
_TAGS_DOMAIN = b"fedhealth-collective-sum-tags/1\x00"
SUM_TAGS = 64  # check values per checked sum: an altered sum passes each with probability <= 1/2


# --- the site -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    index: int
    op: CollectiveOp
    shape: tuple[int, ...] = ()
    length: int = 0
    # per peer: the GMAC key that folds this call's result into the pair's chain
    mac_keys: dict[str, bytes] = field(default_factory=dict)
    # per peer: the key the group secret travels under in this call (the group-key call only)
    seal_keys: dict[str, bytes] = field(default_factory=dict)
    values: NDArray[np.uint64] | None = None  # a checked sum: this site's values on the ring


class CollectiveSite:
    """One site's side of one session.

    ``peers`` maps every participant (this site too) to the identity the approved spec vouches for. Each call
    is a ``prepare_*`` that returns the body to send for :attr:`pending_index`, then a ``complete_*`` with the
    relay's result. A call while another is pending, a result for another op, or any check that fails raises
    and leaves the site unusable (it fails closed: a :class:`SecAggSecurityError` for evidence of lying, a
    :class:`SecAggMessageError` or :class:`SecAggProtocolError` otherwise). Not thread-safe: one session, one
    caller.
    """

    def __init__(
        self,
        config: CollectiveConfig,
        site: str,
        identity: IdentityKey,
        peers: Mapping[str, PublicIdentity],
        *,
        key_guard: KeyReuseGuard | None = None,
    ) -> None:
        if site not in config.sites:
            raise ConfigError(f"{site!r} is not a participant of this session")
        if set(peers) != set(config.sites):
            raise ConfigError("peers must name exactly the session's participants")
        if peers[site] != identity.public():
            raise ConfigError("this site's identity is not the one its peers expect")
        self.config = config
        self.site = site
        self._digest = config.digest()
        self._identity = identity
        self._peers = dict(peers)
        self._guard = key_guard
        self._agreement = AgreementKey.generate()
        self._chains: dict[str, bytes] = {}
        self._next = SETUP_INDEX
        self._pending: _Pending | None = None
        self._broken: str | None = None
        self._ended = False
        self._completed = 0
        self._group_secret: bytes | None = None

    # --- state -------------------------------------------------------------------------------------------

    @property
    def pending_index(self) -> int:
        """The index of the call in flight (what the transport posts to)."""
        if self._pending is None:
            raise SecAggProtocolError("no call is pending")
        return self._pending.index

    @property
    def calls(self) -> int:
        """Collectives completed between the set-up and the end."""
        return self._completed

    def _ready(self, op: CollectiveOp) -> None:
        if self._broken is not None:
            raise SecAggProtocolError(f"the session is over at this site: {self._broken}")
        if self._ended:
            raise SecAggProtocolError("the session has ended")
        if self._pending is not None:
            raise SecAggProtocolError(f"call {self._pending.index} is still pending")
        if op is CollectiveOp.SETUP:
            if self._next != SETUP_INDEX:
                raise SecAggProtocolError("the session is set up already")
        elif self._next == SETUP_INDEX or not self._chains:
            raise SecAggProtocolError("the session is not set up yet")

    def _claim(self, pending: _Pending) -> None:
        # Indices only go forward, one at a time: no index (and so no mask key) is ever used twice. The
        # caller makes the call pending once its body is built.
        assert pending.index == self._next
        self._next += 1

    def _begin(self, op: CollectiveOp) -> _Pending:
        self._ready(op)
        pending = _Pending(index=self._next, op=op)
        self._claim(pending)
        return pending

    def _take(self, op: CollectiveOp) -> _Pending:
        pending = self._pending
        if pending is None or pending.op is not op:
            raise SecAggProtocolError(f"no {op.name.lower()} call is pending")
        self._pending = None
        return pending

    def _fail(self, exc: Exception) -> Exception:
        self._broken = str(exc)
        self._pending = None
        self._chains.clear()  # the pair secrets go with the session
        self._group_secret = None
        return exc

    # --- set-up ------------------------------------------------------------------------------------------

    def advertise(self) -> bytes:
        """The set-up call's body: this site's signed ephemeral key."""
        pending = self._begin(CollectiveOp.SETUP)
        public = self._agreement.public_bytes()
        if self._guard is not None:
            self._guard.remember([public])
        advert = SessionAdvert(
            site_id=self.site,
            config_digest=self._digest,
            public_key=public,
            signature=self._identity.sign(advert_payload(self._digest, self.site, public)),
        )
        self._pending = pending
        return encode_call(CollectiveOp.SETUP, advert.to_bytes())

    def establish(self, result: bytes) -> None:
        """Check every participant's advert (the relay's set-up result) and derive the pair seeds."""
        self._take(CollectiveOp.SETUP)
        try:
            adverts = parse_adverts(result)
            verify_adverts(self.config, self._digest, adverts, self._peers)
            mine = adverts[self.config.sites.index(self.site)]
            if mine.public_key != self._agreement.public_bytes():
                raise SecAggSecurityError("the set-up result carries another key for this site")
            others = [a.public_key for a in adverts if a.site_id != self.site]
            if self._guard is not None:
                self._guard.remember(others)
            transcript = adverts_digest(self._digest, adverts)
            for advert in adverts:
                if advert.site_id == self.site:
                    continue
                secret = self._agreement.exchange(advert.public_key)
                self._chains[advert.site_id] = derive(
                    secret,
                    {
                        "protocol": COLLECTIVE_PROTOCOL,
                        "purpose": "collective-pair-seed",
                        "config_digest": self._digest.hex(),
                        "adverts": transcript.hex(),
                        "pair": _pair(self.site, advert.site_id),
                    },
                )
        except (SecAggProtocolError, SecAggMessageError, CryptoError) as exc:
            raise self._fail(exc) from None

    # --- calls -------------------------------------------------------------------------------------------

    def _call_keys(self, pending: _Pending) -> dict[str, bytes]:
        """Per peer: 32 bytes of mask key then 32 bytes of GMAC key for this call: HKDF-Expand (RFC 5869,
        HMAC-SHA256) of the pair's chain with the session digest, the index and the op as info."""
        info = _CALL_DOMAIN + self._digest + pending.index.to_bytes(8, "big") + bytes([pending.op])
        keys = {peer: _expand64(chain, info) for peer, chain in self._chains.items()}
        pending.mac_keys = {peer: k[KEY_BYTES:] for peer, k in keys.items()}
        return keys

    def _fold(self, pending: _Pending, result: bytes | memoryview) -> None:
        """Bind what this site received into every pair's chain (see the module docstring)."""
        for peer, mac_key in pending.mac_keys.items():
            tag = AESGCM(mac_key).encrypt(_GMAC_NONCE, b"", result)
            self._chains[peer] = hmac.digest(self._chains[peer], _CHAIN_DOMAIN + tag, "sha256")

    def prepare_sum(
        self, values: NDArray[Any], *, masked: bool = True, buffer: CallBuffer | None = None
    ) -> bytes | memoryview:
        """The body of a secure sum of ``values`` (any shape, real): fixed point, then masked.

        ``masked=False`` sends the values in clear (the benchmark's baseline only: never for a site's data).
        With ``buffer`` the body is built there and returned as a view (valid until the buffer is reused).
        Raises :class:`~fedhealth.secagg.FixedPointRangeError` for values the ring cannot hold; the call is
        then not started and the index is not used.
        """
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":
            raise SecAggMessageError("secure_sum takes real numbers")
        flat = np.ascontiguousarray(array, dtype=np.float64).reshape(-1)
        self._ready(CollectiveOp.SUM)
        pending = _Pending(index=self._next, op=CollectiveOp.SUM, shape=array.shape, length=flat.size)
        keys = self._call_keys(pending)
        add = [k[:KEY_BYTES] for p, k in keys.items() if self.site < p] if masked else []
        subtract = [k[:KEY_BYTES] for p, k in keys.items() if p < self.site] if masked else []
        body = masked_sum_call(flat, self.config.n, add, subtract, buffer)  # raises before using the index
        self._claim(pending)
        self._pending = pending
        return body

    def complete_sum(self, result: bytes | memoryview) -> NDArray[np.float64]:
        """The sum over every participant, float64 in the shape given to :meth:`prepare_sum`."""
        pending = self._take(CollectiveOp.SUM)
        if len(result) != 8 * pending.length:
            raise self._fail(SecAggMessageError("the sum has another length than the vector summed"))
        self._fold(pending, result)
        self._completed += 1
        ring = np.frombuffer(result, dtype="<u8").astype(np.uint64, copy=False)
        return decode_fixed(ring).reshape(pending.shape)

    def prepare_broadcast(self, data: bytes | None) -> bytes:
        """The leader passes the bytes to send (signed here), every other site None."""
        is_leader = self.site == self.config.leader
        if is_leader != (data is not None):
            raise SecAggProtocolError(
                "the leader broadcasts bytes and the other sites pass None"
                if is_leader
                else f"only the leader ({self.config.leader}) broadcasts; pass None"
            )
        pending = self._begin(CollectiveOp.BROADCAST)
        self._call_keys(pending)
        body = b""
        if data is not None:
            payload = bytes(data)
            body = payload + self._identity.sign(broadcast_message(self._digest, pending.index, payload))
        self._pending = pending
        return encode_call(CollectiveOp.BROADCAST, body)

    def complete_broadcast(self, result: bytes | memoryview) -> bytes:
        """The leader's payload, after checking its signature for this session and index."""
        return self._complete_broadcast(result)[1]

    def _complete_broadcast(
        self, result: bytes | memoryview, op: CollectiveOp = CollectiveOp.BROADCAST
    ) -> tuple[_Pending, bytes]:
        pending = self._take(op)
        if len(result) < SIGNATURE_BYTES:
            raise self._fail(SecAggMessageError("a broadcast carries the leader's signature"))
        payload, signature = bytes(result[:-SIGNATURE_BYTES]), bytes(result[-SIGNATURE_BYTES:])
        try:
            self._peers[self.config.leader].verify(
                signature, broadcast_message(self._digest, pending.index, payload)
            )
        except CryptoError:
            raise self._fail(
                SecAggSecurityError("the broadcast is not signed by the session's leader for this call")
            ) from None
        self._fold(pending, result)
        self._completed += 1
        return pending, payload

    # --- checked sums --------------------------------------------------------------------------------------

    @property
    def has_group_secret(self) -> bool:
        return self._group_secret is not None

    def prepare_group_secret(self) -> bytes:
        """The call that gives every participant one secret the relay never holds (the key of checked sums):
        the leader draws 32 random bytes and sends them to each peer sealed (AES-256-GCM) under a key of
        their pair for this call, signed like any broadcast; every site passes the same call."""
        is_leader = self.site == self.config.leader
        pending = self._begin(CollectiveOp.SEAL)
        keys = self._call_keys(pending)
        pending.seal_keys = {
            peer: hmac.digest(k[:KEY_BYTES], _SEAL_DOMAIN, "sha256") for peer, k in keys.items()
        }
        body = b""
        if is_leader:
            secret = os.urandom(KEY_BYTES)
            aad = self._digest + pending.index.to_bytes(8, "big")
            sealed = {
                peer: AESGCM(key).encrypt(_GMAC_NONCE, secret, aad).hex()
                for peer, key in sorted(pending.seal_keys.items())
            }
            payload = json.dumps(sealed, sort_keys=True).encode()
            body = payload + self._identity.sign(broadcast_message(self._digest, pending.index, payload))
            self._group_secret = secret
        self._pending = pending
        return encode_call(CollectiveOp.SEAL, body)

    def complete_group_secret(self, result: bytes | memoryview) -> None:
        """Open this site's sealed copy of the leader's secret (the leader keeps its own)."""
        pending, payload = self._complete_broadcast(result, CollectiveOp.SEAL)
        if self.site == self.config.leader:
            return
        try:
            sealed = json.loads(payload)
            blob = bytes.fromhex(sealed[self.site]) if isinstance(sealed, dict) else b""
            aad = self._digest + pending.index.to_bytes(8, "big")
            secret = AESGCM(pending.seal_keys[self.config.leader]).decrypt(_GMAC_NONCE, blob, aad)
        except (ValueError, KeyError, TypeError, InvalidTag):
            raise self._fail(
                SecAggSecurityError("the leader's group secret does not open for this site")
            ) from None
        if len(secret) != KEY_BYTES:
            raise self._fail(SecAggSecurityError("the leader's group secret is not 32 bytes"))
        self._group_secret = secret

    def _tag_weights(self, index: int, length: int) -> NDArray[np.uint64]:
        """SUM_TAGS x ``length`` ring elements, uniform and secret from the relay: an AES-256-CTR keystream
        under a key of the group secret and the call's index."""
        assert self._group_secret is not None
        key = hmac.digest(
            self._group_secret, _TAGS_DOMAIN + self._digest + index.to_bytes(8, "big"), "sha256"
        )
        stream = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
        raw = stream.update(bytes(8 * SUM_TAGS * length))
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64).reshape(SUM_TAGS, length)

    def prepare_checked_sum(
        self, values: NDArray[Any], *, buffer: CallBuffer | None = None
    ) -> bytes | memoryview:
        """A secure sum the relay cannot alter unnoticed: the values, then SUM_TAGS check values (each a
        secret random linear combination of this site's values on the ring, masked like them). The sum of
        the check values is the same combination of the summed values, which every site verifies; a relay
        without the group secret makes an altered sum pass with probability at most 2^-64."""
        if self._group_secret is None:
            raise SecAggProtocolError("a checked sum needs the session's group secret first")
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":
            raise SecAggMessageError("secure_sum takes real numbers")
        flat = np.ascontiguousarray(array, dtype=np.float64).reshape(-1)
        ring = encode_fixed(flat, self.config.n)  # the very encoding the sum uses; raises before any index
        body = self.prepare_sum(np.concatenate([flat, np.zeros(SUM_TAGS)]), buffer=buffer)
        pending = self._pending
        assert pending is not None
        pending.shape, pending.values = array.shape, ring
        tags = (self._tag_weights(pending.index, flat.size) * ring).sum(axis=1, dtype=np.uint64)
        target = memoryview(bytearray(body)) if isinstance(body, bytes) else body
        words = np.frombuffer(target, dtype="<u8", offset=HEADER_BYTES, count=flat.size + SUM_TAGS)
        words[flat.size :] += tags  # on top of the masks: the ring adds in any order
        return bytes(target) if isinstance(body, bytes) else target

    def complete_checked_sum(self, result: bytes | memoryview) -> NDArray[np.float64]:
        """The checked sum over every participant, after verifying its check values."""
        pending = self._pending
        if pending is None or pending.values is None:
            raise SecAggProtocolError("no checked sum is pending")
        length, shape = pending.values.size, pending.shape
        pending.shape = (length + SUM_TAGS,)
        total = self.complete_sum(result)  # length checked, chains folded
        ring = np.frombuffer(result, dtype="<u8").astype(np.uint64)
        expected = (self._tag_weights(pending.index, length) * ring[:length]).sum(axis=1, dtype=np.uint64)
        if not np.array_equal(expected, ring[length:]):
            raise self._fail(
                SecAggSecurityError(
                    "the sum is not the one the sites sent (its check values disagree): the relay altered it"
                )
            )
        return total[:length].reshape(shape)

    def prepare_barrier(self) -> bytes:
        pending = self._begin(CollectiveOp.BARRIER)
        self._call_keys(pending)
        self._pending = pending
        return encode_call(CollectiveOp.BARRIER)

    def complete_barrier(self, result: bytes | memoryview) -> None:
        pending = self._take(CollectiveOp.BARRIER)
        if len(result):
            raise self._fail(SecAggMessageError("a barrier's result is empty"))
        self._fold(pending, result)
        self._completed += 1

    def prepare_end(self) -> bytes:
        """The closing call: one MAC of this site's final chain per peer (the relay cannot forge them)."""
        pending = self._begin(CollectiveOp.END)
        tags = {peer: self._end_tag(peer, self.site).hex() for peer in sorted(self._chains)}
        self._pending = pending
        return encode_call(
            CollectiveOp.END, json.dumps({"site": self.site, "tags": tags}, sort_keys=True).encode()
        )

    def _end_tag(self, peer: str, sender: str) -> bytes:
        message = _END_DOMAIN + self._digest + sender.encode() + b"\x00"
        return hmac.digest(self._chains[peer], message, "sha256")

    def complete_end(self, result: bytes | memoryview) -> None:
        """Check every peer's closing MAC: a mismatch means two sites were sent different results."""
        self._take(CollectiveOp.END)
        try:
            ends = load_json(result)
            if not isinstance(ends, list) or len(ends) != self.config.n:
                raise SecAggMessageError("the end result lists one entry per participant")
            seen = set()
            for entry in ends:
                if not isinstance(entry, dict) or not isinstance(entry.get("tags"), dict):
                    raise SecAggMessageError("malformed end entry")
                sender = entry.get("site")
                if sender not in self.config.sites or sender in seen:
                    raise SecAggMessageError("the end result names an unknown or repeated site")
                seen.add(sender)
                if sender == self.site:
                    continue
                claimed = entry["tags"].get(self.site)
                if not isinstance(claimed, str) or not constant_time_equal(
                    claimed.encode(), self._end_tag(sender, sender).hex().encode()
                ):
                    raise SecAggSecurityError(
                        f"this site and {sender} were sent different results in this session "
                        "(the relay equivocated, or a result was altered): its result is not to be trusted"
                    )
        except (SecAggMessageError, SecAggSecurityError) as exc:
            raise self._fail(exc) from None
        self._ended = True
        self._chains.clear()


def _expand64(prk: bytes, info: bytes) -> bytes:
    """HKDF-Expand (RFC 5869) with HMAC-SHA256 to 64 bytes; ``prk`` is a uniformly random 32-byte key."""
    first = hmac.digest(prk, info + b"\x01", "sha256")
    return first + hmac.digest(prk, first + info + b"\x02", "sha256")


def _pair(a: str, b: str) -> list[str]:
    return [a, b] if a < b else [b, a]


def parse_adverts(result: bytes | memoryview) -> list[SessionAdvert]:
    """The set-up result: a JSON list of adverts."""
    data = load_json(result)
    if not isinstance(data, list):
        raise SecAggMessageError("the set-up result is a list of adverts")
    return [SessionAdvert.from_json(item) for item in data]


def verify_adverts(
    config: CollectiveConfig,
    digest: bytes,
    adverts: list[SessionAdvert],
    identities: Mapping[str, PublicIdentity],
) -> None:
    """Exactly one advert per participant, sorted by site, each for this session and signed by its site;
    no two keys alike. Raises :class:`SecAggSecurityError` (or :class:`SecAggMessageError`)."""
    names = [a.site_id for a in adverts]
    if names != list(config.sites):
        raise SecAggSecurityError(
            "the set-up result must carry exactly one advert per participant, sorted by site "
            f"(expected {list(config.sites)}, got {names})"
        )
    keys = [a.public_key for a in adverts]
    if len(set(keys)) != len(keys):
        raise SecAggSecurityError("two participants advertised the same session key")
    for advert in adverts:
        if not constant_time_equal(advert.config_digest, digest):
            raise SecAggSecurityError(f"{advert.site_id}'s advert is for another session")
        try:
            identities[advert.site_id].verify(advert.signature, advert.signed_payload())
        except CryptoError:
            raise SecAggSecurityError(
                f"{advert.site_id}'s advert is not signed by its identity key"
            ) from None

"""The SecAgg+ client: one site's side of one round, as a pure state machine.

Each stage is one method that takes the server's message, checks all of it, and only then returns the site's
next message and advances. A call outside the transition table raises :class:`SecAggProtocolError` and
changes nothing, as does a misaddressed message (so the driver may retry with the right one). Evidence of a
lying server or peer (a bad signature, a substituted or reused key, a tampered share, a request for both
shares of one site) raises :class:`SecAggSecurityError`; a request the client must not answer (fewer than t
survivors, survivors that split the graph) raises :class:`RoundFailedError`. Both abort the client for good:
it fails closed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import CryptoError, InputError
from fedhealth.crypto import (
    AgreementKey,
    IdentityKey,
    PublicIdentity,
    aead_decrypt,
    aead_encrypt,
    random_bytes,
)
from fedhealth.secagg import _derive
from fedhealth.secagg._config import SecAggConfig
from fedhealth.secagg._crypto_extra import apply_masks
from fedhealth.secagg._errors import FailureReason, RoundFailedError, SecAggProtocolError, SecAggSecurityError
from fedhealth.secagg._messages import (
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RevealedShare,
    ShareBox,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from fedhealth.secagg._shamir import SHARE_BYTES, split_secret
from fedhealth.secagg._stages import CLIENT_TRANSITIONS, ClientAction, Stage, next_stage

_ServerMessage = KeyDirectory | ShareBundle | UnmaskRequest


class KeyReuseGuard:
    """Remembers every ephemeral public key a site has used or seen, and refuses any key a second time.

    Give one guard to every round a site's process runs, so a peer (or a server replaying an old
    advertisement) cannot reuse a key across rounds. It holds 32 bytes per key, in memory; it is thread-safe.
    """

    __slots__ = ("_lock", "_seen")

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()

    def remember(self, keys: Iterable[bytes]) -> None:
        """Record ``keys``; raise :class:`SecAggSecurityError` (recording none) if any was seen or repeats."""
        batch = list(keys)
        with self._lock:
            if len(set(batch)) != len(batch) or any(k in self._seen for k in batch):
                raise SecAggSecurityError("an ephemeral public key was used twice")
            self._seen.update(batch)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._seen


class SecAggClient:
    """One site in one SecAgg+ round.

    ``peers`` maps every site of the round to its long-term identity (the orchestrator's enrollment records,
    which the agent pins); each peer's advertised keys must carry that identity's signature.
    """

    def __init__(
        self,
        config: SecAggConfig,
        site_id: str,
        identity_key: IdentityKey,
        peers: Mapping[str, PublicIdentity],
        *,
        key_guard: KeyReuseGuard | None = None,
    ) -> None:
        if site_id not in config.sites:
            raise SecAggProtocolError(f"{site_id!r} is not a site of this round")
        missing = sorted(set(config.sites) - set(peers))
        if missing:
            raise SecAggProtocolError(f"no identity for sites {missing}")
        if peers[site_id] != identity_key.public():
            raise SecAggProtocolError("the identity key does not match the site's registered identity")
        self._config = config
        self._site = site_id
        self._identity = identity_key
        self._peers = dict(peers)
        self._guard = key_guard if key_guard is not None else KeyReuseGuard()
        self._digest = config.digest()
        self._graph = config.graph()
        self._stage = Stage.ADVERTISE_KEYS
        self._cipher_key: AgreementKey | None = None
        self._mask_key: AgreementKey | None = None
        self._peer_keys: dict[str, KeyAdvertisement] = {}
        self._box_keys: dict[str, bytes] = {}  # peer -> AEAD key for share boxes
        self._self_seed: bytes | None = None
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (self-mask-seed share, pairwise-key share)
        self._own_advertisement: KeyAdvertisement | None = None

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def site_id(self) -> str:
        return self._site

    @property
    def config(self) -> SecAggConfig:
        return self._config

    def _begin(self, action: ClientAction) -> Stage:
        return next_stage(CLIENT_TRANSITIONS, self._stage, action, f"client {self._site}")

    def _wipe(self) -> None:
        self._cipher_key = None
        self._mask_key = None
        self._self_seed = None
        self._box_keys.clear()
        self._held.clear()

    @contextmanager
    def _fail_closed(self) -> Iterator[None]:
        try:
            yield
        except (SecAggSecurityError, RoundFailedError):
            self._wipe()
            self._stage = Stage.FAILED
            raise

    def _check_addressed(self, message: _ServerMessage, kind: type[_ServerMessage]) -> None:
        if not isinstance(message, kind):
            raise SecAggProtocolError(f"expected a {kind.__name__}, got {type(message).__name__}")
        recipient, digest = message.recipient, message.config_digest
        if recipient != self._site:
            raise SecAggProtocolError(f"message for {recipient!r} delivered to {self._site!r}")
        if digest != self._digest:
            raise SecAggProtocolError("message belongs to another round or configuration")

    def abort(self) -> None:
        """Leave the round (the driver gave up); the client forgets its secrets."""
        self._stage = self._begin(ClientAction.ABORT)
        self._wipe()

    # --- stage 1: advertise keys ----------------------------------------------------------------------------

    def advertise_keys(self) -> KeyAdvertisement:
        """Fresh X25519 keys for share encryption and for pairwise masks, signed with the round bound in."""
        nxt = self._begin(ClientAction.ADVERTISE_KEYS)
        cipher_key, mask_key = AgreementKey.generate(), AgreementKey.generate()
        cipher_pk, mask_pk = cipher_key.public_bytes(), mask_key.public_bytes()
        payload = _derive.advertisement_payload(self._config, self._digest, self._site, cipher_pk, mask_pk)
        advert = KeyAdvertisement(
            site_id=self._site,
            config_digest=self._digest,
            cipher_public_key=cipher_pk,
            mask_public_key=mask_pk,
            signature=_derive.sign_payload(self._identity, payload),
        )
        self._guard.remember([cipher_pk, mask_pk])
        self._cipher_key, self._mask_key, self._own_advertisement = cipher_key, mask_key, advert
        self._stage = nxt
        return advert

    # --- stage 2: share keys --------------------------------------------------------------------------------

    def _verify_advertisement(self, advert: KeyAdvertisement) -> None:
        payload = _derive.advertisement_payload(
            self._config, self._digest, advert.site_id, advert.cipher_public_key, advert.mask_public_key
        )
        try:
            _derive.verify_payload(self._peers[advert.site_id], advert.signature, payload)
        except CryptoError as exc:
            raise SecAggSecurityError(
                f"the keys advertised for {advert.site_id!r} are not signed by it"
            ) from exc

    def share_keys(self, directory: KeyDirectory) -> EncryptedShares:
        """Verify the neighbours' signed keys, then secret-share the self-mask seed and mask private key."""
        nxt = self._begin(ClientAction.SHARE_KEYS)
        self._check_addressed(directory, KeyDirectory)
        assert self._cipher_key is not None  # set by advertise_keys
        assert self._mask_key is not None
        with self._fail_closed():
            neighbours = self._graph.of(self._site)
            adverts: dict[str, KeyAdvertisement] = {}
            for advert in directory.advertisements:
                if advert.site_id in adverts:
                    raise SecAggSecurityError(f"two advertisements for {advert.site_id!r}")
                if advert.config_digest != self._digest:
                    raise SecAggSecurityError(f"the advertisement of {advert.site_id!r} is for another round")
                adverts[advert.site_id] = advert
            if adverts.pop(self._site, None) != self._own_advertisement:
                raise SecAggSecurityError("the server did not relay this site's own keys unchanged")
            strangers = sorted(set(adverts) - neighbours)
            if strangers:
                raise SecAggSecurityError(f"keys from sites that are not neighbours: {strangers}")
            for advert in adverts.values():
                self._verify_advertisement(advert)
            holders = sorted({self._site, *adverts}, key=self._config.x_of)
            if len(holders) < self._config.share_threshold:
                raise RoundFailedError(
                    FailureReason.NEIGHBOURHOOD_TOO_SMALL,
                    f"{len(holders)} share holders, {self._config.share_threshold} needed",
                )
            peer_keys = [k for a in adverts.values() for k in (a.cipher_public_key, a.mask_public_key)]
            self_seed = random_bytes(32)
            xs = [self._config.x_of(h) for h in holders]
            t = self._config.share_threshold
            seed_shares = split_secret(self_seed, xs, t)
            key_shares = split_secret(self._mask_key.private_bytes(), xs, t)
            boxes = []
            box_keys = {}
            for holder, x in zip(holders, xs, strict=True):
                if holder == self._site:
                    continue
                try:
                    key = _derive.share_key(
                        self._config,
                        self._digest,
                        self._cipher_key,
                        adverts[holder].cipher_public_key,
                        self._site,
                        holder,
                    )
                except CryptoError as exc:
                    raise SecAggSecurityError(f"the share key advertised by {holder!r} is unusable") from exc
                box_keys[holder] = key
                ad = _derive.box_associated_data(self._config, self._digest, self._site, holder)
                sealed = aead_encrypt(key, seed_shares[x] + key_shares[x], ad)
                boxes.append(ShareBox(sender=self._site, recipient=holder, ciphertext=sealed))
            # all checks passed: commit (the guard is last, so a refused directory leaves no trace in it)
            self._guard.remember(peer_keys)
        own_x = self._config.x_of(self._site)
        self._peer_keys = adverts
        self._box_keys = box_keys
        self._self_seed = self_seed
        self._held = {self._site: (seed_shares[own_x], key_shares[own_x])}
        self._stage = nxt
        return EncryptedShares(
            site_id=self._site,
            config_digest=self._digest,
            self_mask_commitment=_derive.self_mask_commitment(
                self._config, self._digest, self_seed, self._site
            ),
            boxes=tuple(boxes),
        )

    # --- stage 3: masked input ------------------------------------------------------------------------------

    def masked_input(self, bundle: ShareBundle, vector: NDArray[np.uint32]) -> MaskedInput:
        """Open the neighbours' shares, then mask ``vector`` (already quantized, see VectorCodec)."""
        nxt = self._begin(ClientAction.MASKED_INPUT)
        if (
            not isinstance(vector, np.ndarray)
            or vector.dtype != np.uint32
            or vector.shape != (self._config.vector_length,)
        ):
            raise InputError(f"the input is a uint32 vector of length {self._config.vector_length}")
        self._check_addressed(bundle, ShareBundle)
        assert self._mask_key is not None  # set by advertise_keys
        assert self._self_seed is not None  # set by share_keys
        with self._fail_closed():
            opened: dict[str, tuple[bytes, bytes]] = {}
            for box in bundle.boxes:
                sender = box.sender
                if box.recipient != self._site:
                    raise SecAggSecurityError(f"a box from {sender!r} is addressed to {box.recipient!r}")
                if sender not in self._peer_keys or sender in opened:
                    raise SecAggSecurityError(f"unexpected or repeated box from {sender!r}")
                try:
                    ad = _derive.box_associated_data(self._config, self._digest, sender, self._site)
                    plain = aead_decrypt(self._box_keys[sender], box.ciphertext, ad)
                except CryptoError as exc:
                    raise SecAggSecurityError(f"the shares from {sender!r} were tampered with") from exc
                if len(plain) != 2 * SHARE_BYTES:
                    raise SecAggSecurityError(f"the shares from {sender!r} are malformed")
                opened[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
            if len(opened) + 1 < self._config.share_threshold:
                raise RoundFailedError(
                    FailureReason.NEIGHBOURHOOD_TOO_SMALL,
                    f"{len(opened) + 1} share holders, {self._config.share_threshold} needed",
                )
            seeds: list[tuple[bytes, bool]] = []  # (pairwise seed, this site has the lower id)
            for peer in sorted(opened):
                try:
                    seed = _derive.pairwise_mask_seed(
                        self._config,
                        self._digest,
                        self._mask_key,
                        self._peer_keys[peer].mask_public_key,
                        self._site,
                        peer,
                    )
                except CryptoError as exc:
                    raise SecAggSecurityError(f"the mask key advertised by {peer!r} is unusable") from exc
                seeds.append((seed, self._site < peer))
        masked = np.zeros(vector.shape, dtype=np.uint32)  # calloc'd: the chunked pass writes each page once
        self_seed = _derive.self_mask_seed(self._config, self._digest, self._self_seed, self._site)
        apply_masks(
            masked,
            add=[self_seed, *(seed for seed, lower in seeds if lower)],
            subtract=[seed for seed, lower in seeds if not lower],
            vectors=[vector],
        )
        self._held.update(opened)
        self._self_seed = None  # only its shares are needed from here on
        self._cipher_key = None
        self._mask_key = None
        self._box_keys.clear()
        self._stage = nxt
        return MaskedInput(site_id=self._site, config_digest=self._digest, vector=masked)

    # --- stage 4: unmask ------------------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, for each peer whose shares this site holds, the one share the server is entitled to."""
        nxt = self._begin(ClientAction.UNMASK)
        self._check_addressed(request, UnmaskRequest)
        with self._fail_closed():
            survivors, dropped = set(request.survivors), set(request.dropped)
            unknown = sorted((survivors | dropped) - set(self._config.sites))
            if unknown:
                raise SecAggSecurityError(f"the request names sites outside the round: {unknown}")
            if survivors & dropped:  # UnmaskRequest refuses this on construction; kept as a second lock
                raise SecAggSecurityError("the server asks for both shares of one site")
            if self._site not in survivors:
                raise SecAggSecurityError("the server claims this site's masked input did not arrive")
            if len(survivors) < self._config.threshold:
                raise RoundFailedError(
                    FailureReason.TOO_FEW_SITES,
                    f"{len(survivors)} masked inputs arrived, {self._config.threshold} needed",
                )
            if not self._graph.is_connected(survivors):
                raise RoundFailedError(
                    FailureReason.SURVIVORS_DISCONNECTED,
                    "unmasking would reveal sums of parts of the federation",
                )
            shares = []
            for owner in sorted(self._held):
                seed_share, key_share = self._held[owner]
                if owner in survivors:
                    shares.append(RevealedShare(owner=owner, kind=ShareKind.SELF_MASK_SEED, share=seed_share))
                elif owner in dropped:
                    shares.append(RevealedShare(owner=owner, kind=ShareKind.PAIRWISE_KEY, share=key_share))
        self._wipe()
        self._stage = nxt
        return UnmaskResponse(site_id=self._site, config_digest=self._digest, shares=tuple(shares))

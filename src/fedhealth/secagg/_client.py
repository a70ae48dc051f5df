"""The SecAgg+ client: one site's side of one round, as a pure state machine.

Each stage is one method that takes the server's message, checks all of it, and only then returns the site's
next message and advances. A call outside the transition table raises :class:`SecAggProtocolError` and
changes nothing, as does a misaddressed message (so the driver may retry with the right one). Evidence of a
lying server or peer (a bad signature, a substituted or reused key, a tampered share, a survivor set naming a
neighbour this site did not mask with, an unmask request over another set than the one it signed) raises
:class:`SecAggSecurityError`; a request the client must not answer (fewer than t survivors or signatures, too
few of its share holders left, survivors that split the graph) raises :class:`RoundFailedError`. Both abort
the client for good: it fails closed.

What a client checks before it reveals anything (docs/secure-aggregation.md gives the argument):

- share keys: every advertisement in the directory is signed by its site for this round; at least t sites
  advertised; its neighbours in the graph those advertisements seed, plus itself, reach the share threshold.
- masked input: the boxes it opened, plus itself, reach the share threshold (t with the full graph:
  Bonawitz's |U2| >= t). It masks with exactly those senders and remembers them.
- consistency: it is a survivor; at least t survivors; every survivor it saw advertise; every survivor that
  is its neighbour is a peer it masked with (U3 within U2); its share holders among the survivors reach the
  share threshold; the survivors are connected. Then it signs the set.
- unmask: the request's set is exactly the one it signed, and carries at least t valid signatures over it
  from distinct survivors (every entry must name a survivor; it verifies in order until t are valid, and an
  invalid one before that is refused). Then ``before_reveal`` runs, then it reveals the self-mask-seed shares
  it holds of survivors and the pairwise-key shares of the peers it masked with that are not survivors: never
  both kinds for one site.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from fedhealth.secagg._config import NeighbourhoodGraph, SecAggConfig, graph_for
from fedhealth.secagg._crypto_extra import apply_masks
from fedhealth.secagg._errors import FailureReason, RoundFailedError, SecAggProtocolError, SecAggSecurityError
from fedhealth.secagg._messages import (
    ConsistencyRequest,
    ConsistencySignature,
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

_ServerMessage = KeyDirectory | ShareBundle | ConsistencyRequest | UnmaskRequest


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

    ``peers`` maps every site of the round to its long-term identity (the enrolment records the agent pins
    and checks against the approved spec); each peer's advertised keys and consistency signature must carry
    that identity's signature. ``before_reveal`` runs after every unmask check has passed and just before the
    shares are released; if it raises, the client fails closed and reveals nothing (the agent records there,
    durably, that it unmasked this round, and refuses a second time).
    """

    def __init__(
        self,
        config: SecAggConfig,
        site_id: str,
        identity_key: IdentityKey,
        peers: Mapping[str, PublicIdentity],
        *,
        key_guard: KeyReuseGuard | None = None,
        before_reveal: Callable[[], None] | None = None,
    ) -> None:
        if site_id not in config.sites:
            raise SecAggProtocolError(f"{site_id!r} is not a site of this round")
        missing = sorted(set(config.sites) - set(peers))
        if missing:
            raise SecAggProtocolError(f"no identity for sites {missing}")
        if peers[site_id] != identity_key.public():
            raise SecAggProtocolError("the identity key does not match the site's registered identity")
        self._config = config
        self._sites = frozenset(config.sites)
        self._site = site_id
        self._identity = identity_key
        self._peers = dict(peers)
        self._guard = key_guard if key_guard is not None else KeyReuseGuard()
        self._before_reveal = before_reveal
        self._digest = config.digest()
        self._stage = Stage.ADVERTISE_KEYS
        self._cipher_key: AgreementKey | None = None
        self._mask_key: AgreementKey | None = None
        self._own_advertisement: KeyAdvertisement | None = None
        self._seed: bytes | None = None  # the graph seed, from the directory
        self._graph: NeighbourhoodGraph | None = None
        self._u1: frozenset[str] = frozenset()  # the sites whose keys this site was shown
        self._peer_keys: dict[str, KeyAdvertisement] = {}  # neighbours in the directory
        self._box_keys: dict[str, bytes] = {}  # peer -> AEAD key for share boxes
        self._self_seed: bytes | None = None
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (self-mask-seed share, pairwise-key share)
        self._masked_with: frozenset[str] = frozenset()
        self._signed: tuple[str, ...] | None = None
        self._own_signature = b""

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

    @property
    def graph_seed(self) -> bytes | None:
        """The neighbourhood-graph seed this site derived from its key directory (None before)."""
        return self._seed

    @property
    def graph(self) -> NeighbourhoodGraph | None:
        """The neighbourhood graph this site derived from its key directory (None before)."""
        return self._graph

    @property
    def masked_with(self) -> frozenset[str]:
        """The peers whose pairwise masks this site added to its input (empty before its masked input)."""
        return self._masked_with

    @property
    def signed_survivors(self) -> tuple[str, ...] | None:
        """The survivor set this site signed in the consistency stage (None before)."""
        return self._signed

    def _begin(self, action: ClientAction) -> Stage:
        return next_stage(CLIENT_TRANSITIONS, self._stage, action, f"client {self._site}")

    def _wipe(self) -> None:
        self._cipher_key = None
        self._mask_key = None
        self._self_seed = None
        self._box_keys.clear()
        self._held.clear()

    def _fail(self) -> None:
        self._wipe()
        self._stage = Stage.FAILED

    @contextmanager
    def _fail_closed(self) -> Iterator[None]:
        try:
            yield
        except (SecAggSecurityError, RoundFailedError):
            self._fail()
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
        """Verify every signed advertisement, derive the graph from them, then secret-share the self-mask seed
        and the mask private key with this site's neighbours."""
        nxt = self._begin(ClientAction.SHARE_KEYS)
        self._check_addressed(directory, KeyDirectory)
        assert self._cipher_key is not None  # set by advertise_keys
        assert self._mask_key is not None
        config, t, s = self._config, self._config.threshold, self._config.share_threshold
        with self._fail_closed():
            adverts: dict[str, KeyAdvertisement] = {}
            for advert in directory.advertisements:
                if advert.site_id in adverts:
                    raise SecAggSecurityError(f"two advertisements for {advert.site_id!r}")
                if advert.site_id not in self._sites:
                    raise SecAggSecurityError(
                        f"keys from {advert.site_id!r}, which is not a site of this round"
                    )
                if advert.config_digest != self._digest:
                    raise SecAggSecurityError(f"the advertisement of {advert.site_id!r} is for another round")
                adverts[advert.site_id] = advert
            if adverts.get(self._site) != self._own_advertisement:
                raise SecAggSecurityError("the server did not relay this site's own keys unchanged")
            for site, advert in adverts.items():
                if site != self._site:
                    self._verify_advertisement(advert)
            if len(adverts) < t:
                raise RoundFailedError(
                    FailureReason.TOO_FEW_SITES, f"{len(adverts)} sites advertised keys, {t} needed"
                )
            seed = _derive.graph_seed(self._digest, adverts.values())
            graph = graph_for(config, seed)
            holders = sorted(graph.holders(self._site) & set(adverts), key=config.x_of)
            if len(holders) < s:
                raise RoundFailedError(
                    FailureReason.NEIGHBOURHOOD_TOO_SMALL, f"{len(holders)} share holders, {s} needed"
                )
            peer_keys = [
                k
                for site, a in adverts.items()
                if site != self._site
                for k in (a.cipher_public_key, a.mask_public_key)
            ]
            self_seed = random_bytes(32)
            xs = [config.x_of(h) for h in holders]
            seed_shares = split_secret(self_seed, xs, s)
            key_shares = split_secret(self._mask_key.private_bytes(), xs, s)
            boxes = []
            box_keys = {}
            for holder, x in zip(holders, xs, strict=True):
                if holder == self._site:
                    continue
                try:
                    key = _derive.share_key(
                        config,
                        self._digest,
                        seed,
                        self._cipher_key,
                        adverts[holder].cipher_public_key,
                        self._site,
                        holder,
                    )
                except CryptoError as exc:
                    raise SecAggSecurityError(f"the share key advertised by {holder!r} is unusable") from exc
                box_keys[holder] = key
                ad = _derive.box_associated_data(config, self._digest, seed, self._site, holder)
                sealed = aead_encrypt(key, seed_shares[x] + key_shares[x], ad)
                boxes.append(ShareBox(sender=self._site, recipient=holder, ciphertext=sealed))
            # all checks passed: commit (the guard is last, so a refused directory leaves no trace in it)
            self._guard.remember(peer_keys)
        own_x = config.x_of(self._site)
        self._seed, self._graph, self._u1 = seed, graph, frozenset(adverts)
        self._peer_keys = {h: adverts[h] for h in holders if h != self._site}
        self._box_keys = box_keys
        self._self_seed = self_seed
        self._held = {self._site: (seed_shares[own_x], key_shares[own_x])}
        self._stage = nxt
        return EncryptedShares(
            site_id=self._site,
            config_digest=self._digest,
            self_mask_commitment=_derive.self_mask_commitment(config, self._digest, self_seed, self._site),
            boxes=tuple(boxes),
        )

    # --- stage 3: masked input ------------------------------------------------------------------------------

    def masked_input(self, bundle: ShareBundle, vector: NDArray[np.uint32]) -> MaskedInput:
        """Open the neighbours' shares, then mask ``vector`` (already quantized, see VectorCodec) with the
        senders of the boxes it opened, provided they and this site reach the share threshold."""
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
        assert self._seed is not None
        config, seed = self._config, self._seed
        with self._fail_closed():
            opened: dict[str, tuple[bytes, bytes]] = {}
            for box in bundle.boxes:
                sender = box.sender
                if box.recipient != self._site:
                    raise SecAggSecurityError(f"a box from {sender!r} is addressed to {box.recipient!r}")
                if sender not in self._peer_keys or sender in opened:
                    raise SecAggSecurityError(f"unexpected or repeated box from {sender!r}")
                try:
                    ad = _derive.box_associated_data(config, self._digest, seed, sender, self._site)
                    plain = aead_decrypt(self._box_keys[sender], box.ciphertext, ad)
                except CryptoError as exc:
                    raise SecAggSecurityError(
                        f"the shares from {sender!r} were tampered with, or sealed under another directory"
                    ) from exc
                if len(plain) != 2 * SHARE_BYTES:
                    raise SecAggSecurityError(f"the shares from {sender!r} are malformed")
                opened[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
            have, need = len(opened) + 1, config.share_threshold
            if have < need:
                # Bonawitz's |U2| >= t (the full graph's share threshold is t): masking with fewer peers would
                # let a server that withheld boxes unmask this input from fewer sites
                reason = (
                    FailureReason.TOO_FEW_SITES
                    if config.full_graph
                    else FailureReason.NEIGHBOURHOOD_TOO_SMALL
                )
                raise RoundFailedError(
                    reason, f"shares from {len(opened)} peers: {have} sites with this one, {need} needed"
                )
            seeds: list[tuple[bytes, bool]] = []  # (pairwise seed, this site has the lower id)
            for peer in sorted(opened):
                try:
                    pair_seed = _derive.pairwise_mask_seed(
                        config,
                        self._digest,
                        seed,
                        self._mask_key,
                        self._peer_keys[peer].mask_public_key,
                        self._site,
                        peer,
                    )
                except CryptoError as exc:
                    raise SecAggSecurityError(f"the mask key advertised by {peer!r} is unusable") from exc
                seeds.append((pair_seed, self._site < peer))
        # a copy, not zeros plus the vector: a zeroed vector is fresh pages from the kernel (a fault and a
        # clearing per page, a tenth of the masking's time at 1e6), where a copy reuses freed heap memory
        masked = vector.copy()
        self_seed = _derive.self_mask_seed(config, self._digest, self._self_seed, self._site)
        apply_masks(
            masked,
            add=[self_seed, *(pair_seed for pair_seed, lower in seeds if lower)],
            subtract=[pair_seed for pair_seed, lower in seeds if not lower],
        )
        self._held.update(opened)
        self._masked_with = frozenset(opened)
        self._self_seed = None  # only its shares are needed from here on
        self._cipher_key = None
        self._mask_key = None
        self._box_keys.clear()
        self._stage = nxt
        return MaskedInput(site_id=self._site, config_digest=self._digest, vector=masked)

    # --- stage 4: consistency -------------------------------------------------------------------------------

    def _check_survivors(self, survivors: frozenset[str]) -> None:
        """Everything a survivor set must satisfy before this site signs it (it reveals for no other set)."""
        assert self._graph is not None  # set by share_keys
        config, graph = self._config, self._graph
        if self._site not in survivors:
            raise SecAggSecurityError("the server claims this site's masked input did not arrive")
        unseen = sorted(survivors - self._u1)  # also catches names outside the round
        if unseen:
            raise SecAggSecurityError(f"survivors whose keys this site was never shown: {unseen}")
        unmasked = sorted((survivors & graph.of(self._site)) - self._masked_with)
        if unmasked:
            # an honest server lists only sites whose shares reached everyone; a survivor this site did not
            # mask with is how a server isolates a victim (issue 10, finding 1)
            raise SecAggSecurityError(f"survivors this site did not mask with: {unmasked}")
        if len(survivors) < config.threshold:
            raise RoundFailedError(
                FailureReason.TOO_FEW_SITES,
                f"{len(survivors)} masked inputs arrived, {config.threshold} needed",
            )
        holders = len(graph.holders(self._site) & survivors)
        if holders < config.share_threshold:
            raise RoundFailedError(
                FailureReason.NEIGHBOURHOOD_TOO_SMALL,
                f"{holders} of this site's share holders survived, {config.share_threshold} needed",
            )
        if not graph.is_connected(survivors):
            raise RoundFailedError(
                FailureReason.SURVIVORS_DISCONNECTED, "unmasking would reveal sums of parts of the federation"
            )

    def consistency(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Check the survivor set the server reports, then sign it (Bonawitz et al.'s ConsistencyCheck)."""
        nxt = self._begin(ClientAction.CONSISTENCY)
        self._check_addressed(request, ConsistencyRequest)
        assert self._seed is not None  # set by share_keys
        with self._fail_closed():
            self._check_survivors(frozenset(request.survivors))
        payload = _derive.consistency_payload(self._config, self._digest, self._seed, request.survivors)
        signature = _derive.sign_payload(self._identity, payload)
        self._signed, self._own_signature = request.survivors, signature
        self._stage = nxt
        return ConsistencySignature(site_id=self._site, config_digest=self._digest, signature=signature)

    # --- stage 5: unmask ------------------------------------------------------------------------------------

    def _check_signatures(self, request: UnmaskRequest) -> None:
        assert self._seed is not None  # set by share_keys
        if request.survivors != self._signed:
            raise SecAggSecurityError("the unmask request's survivors differ from the set this site signed")
        survivors, t = set(request.survivors), self._config.threshold
        strangers = sorted(e.site_id for e in request.signatures if e.site_id not in survivors)
        if strangers:
            raise SecAggSecurityError(
                f"consistency signatures from sites that are not survivors: {strangers}"
            )
        if len(request.signatures) < t:
            raise RoundFailedError(
                FailureReason.TOO_FEW_SITES,
                f"{len(request.signatures)} sites signed the survivor set, {t} needed",
            )
        payload = _derive.consistency_payload(self._config, self._digest, self._seed, request.survivors)
        for valid, entry in enumerate(request.signatures, start=1):  # sorted, distinct (the message checks)
            if entry.site_id == self._site:
                ok = entry.signature == self._own_signature  # no need to verify what it signed itself
            else:
                try:
                    _derive.verify_payload(self._peers[entry.site_id], entry.signature, payload)
                    ok = True
                except CryptoError:
                    ok = False
            if not ok:
                raise SecAggSecurityError(
                    f"the consistency signature of {entry.site_id!r} does not sign this survivor set"
                )
            if valid == t:  # t valid signatures over its own set are all a reveal needs
                return

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, for each peer whose shares this site holds, the one share the signed survivor set entitles
        the server to."""
        nxt = self._begin(ClientAction.UNMASK)
        self._check_addressed(request, UnmaskRequest)
        with self._fail_closed():
            self._check_signatures(request)
        if self._before_reveal is not None:
            try:
                self._before_reveal()
            except BaseException:
                self._fail()  # fail closed: nothing is revealed, now or later
                raise
        survivors = frozenset(request.survivors)
        shares = []
        for owner in sorted(self._held):
            seed_share, key_share = self._held[owner]
            if owner in survivors:
                shares.append(RevealedShare(owner=owner, kind=ShareKind.SELF_MASK_SEED, share=seed_share))
            elif owner in self._masked_with:
                shares.append(RevealedShare(owner=owner, kind=ShareKind.PAIRWISE_KEY, share=key_share))
        self._wipe()
        self._stage = nxt
        return UnmaskResponse(site_id=self._site, config_digest=self._digest, shares=tuple(shares))

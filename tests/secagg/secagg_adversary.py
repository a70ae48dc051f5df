"""A malicious SecAgg+ server with colluding sites, driving real clients, and what it can compute afterwards.

:class:`Adversary` plays the server (and the colluders) of one round against real :class:`SecAggClient`
objects for the honest sites. It controls delivery completely: which advertisements each site's directory
holds, which share boxes each site receives (colluders craft valid boxes of their own for any site), which
survivor set each site is asked to sign, and which signatures reach each site at unmask (it forwards every
valid signature it holds over the set the site signed, and signs anything with the colluders' identity keys).
Colluders give it all their secrets and every share honest sites sealed for them.

:func:`closure` then computes what it knows: which honest self-mask seeds and mask private keys it can
rebuild (at least ``share_threshold`` shares, checked against the commitment or the advertised public key).
:func:`revealable` turns that into the sums of honest inputs it can compute. A masked input is
``y_X = x_X + PRG(self_X) + sum over the peers Y that X masked with of +-PRG(s_XY)``. A linear combination
``sum a_X y_X`` reveals something only if every unknown PRG term cancels (a * U for uniform U hides a * x on
its own): so ``a_X = 0`` where X's self seed is unknown or X masked with Y but Y did not mask with X (or Y's
masked input is not held) and neither key is known; and ``a_X = a_Y`` across a mask both masked with and
neither key is known. The sums it learns are the sums over the connected components of the second relation
that contain no site of the first kind. :func:`unmask_sum` computes such a sum from the adversary's knowledge
alone, which checks the model against the real cryptography.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
from numpy.typing import NDArray

from fedhealth.crypto import AgreementKey, IdentityKey, aead_decrypt, aead_encrypt, constant_time_equal
from fedhealth.secagg import (
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    NeighbourhoodGraph,
    RoundFailedError,
    SecAggClient,
    SecAggConfig,
    SecAggSecurityError,
    ShareBox,
    ShareBundle,
    ShareKind,
    SurvivorSignature,
    UnmaskRequest,
    _derive,
    graph_for,
)
from fedhealth.secagg._crypto_extra import apply_masks
from fedhealth.secagg._shamir import SHARE_BYTES, reconstruct_secret, split_secret


class Colluder:
    """A site that works for the server: its keys, its own shares and what it opens are the server's."""

    def __init__(self, config: SecAggConfig, site: str, identity: IdentityKey) -> None:
        self.config, self.site, self.identity = config, site, identity
        self.digest = config.digest()
        self.cipher, self.mask = AgreementKey.generate(), AgreementKey.generate()
        payload = _derive.advertisement_payload(
            config, self.digest, site, self.cipher.public_bytes(), self.mask.public_bytes()
        )
        self.advert = KeyAdvertisement(
            site_id=site,
            config_digest=self.digest,
            cipher_public_key=self.cipher.public_bytes(),
            mask_public_key=self.mask.public_bytes(),
            signature=_derive.sign_payload(identity, payload),
        )
        xs = [config.x_of(s) for s in config.sites]
        t = config.share_threshold
        self._seed_shares = split_secret(secrets.token_bytes(32), xs, t)
        self._key_shares = split_secret(self.mask.private_bytes(), xs, t)

    def box_for(self, recipient: str, recipient_advert: KeyAdvertisement, seed: bytes) -> ShareBox:
        """A box the recipient opens (sealed under the recipient's graph seed, whatever it is)."""
        key = _derive.share_key(
            self.config,
            self.digest,
            seed,
            self.cipher,
            recipient_advert.cipher_public_key,
            self.site,
            recipient,
        )
        ad = _derive.box_associated_data(self.config, self.digest, seed, self.site, recipient)
        x = self.config.x_of(recipient)
        sealed = aead_encrypt(key, self._seed_shares[x] + self._key_shares[x], ad)
        return ShareBox(sender=self.site, recipient=recipient, ciphertext=sealed)

    def open(self, box: ShareBox, sender_advert: KeyAdvertisement, seed: bytes) -> tuple[bytes, bytes]:
        key = _derive.share_key(
            self.config,
            self.digest,
            seed,
            self.cipher,
            sender_advert.cipher_public_key,
            self.site,
            box.sender,
        )
        ad = _derive.box_associated_data(self.config, self.digest, seed, box.sender, self.site)
        plain = aead_decrypt(key, box.ciphertext, ad)
        return plain[:SHARE_BYTES], plain[SHARE_BYTES:]

    def sign(self, seed: bytes, survivors: Iterable[str]) -> bytes:
        payload = _derive.consistency_payload(self.config, self.digest, seed, survivors)
        return _derive.sign_payload(self.identity, payload)


_STOPS = (SecAggSecurityError, RoundFailedError)


@dataclass
class Adversary:
    """One round played by a malicious server; call the stages in order, each with its lies."""

    config: SecAggConfig
    colluding: frozenset[str]
    length_seed: int = 0
    key_seed: int | None = None  # deterministic keys (reproducible graphs, for hypothesis); None: random
    keys: dict[str, IdentityKey] = field(init=False)
    clients: dict[str, SecAggClient] = field(init=False)
    colluders: dict[str, Colluder] = field(init=False)
    inputs: dict[str, NDArray[np.uint32]] = field(init=False)
    adverts: dict[str, KeyAdvertisement] = field(init=False, default_factory=dict)
    directory_of: dict[str, frozenset[str]] = field(init=False, default_factory=dict)
    seed_of: dict[str, bytes] = field(init=False, default_factory=dict)
    shares: dict[str, EncryptedShares] = field(init=False, default_factory=dict)
    masked: dict[str, NDArray[np.uint32]] = field(init=False, default_factory=dict)
    signed: dict[str, tuple[str, ...]] = field(init=False, default_factory=dict)
    signatures: dict[str, bytes] = field(init=False, default_factory=dict)
    points: dict[tuple[str, ShareKind], dict[int, bytes]] = field(init=False, default_factory=dict)
    stopped: dict[str, Exception] = field(init=False, default_factory=dict)
    revealers: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        config = self.config
        self._counter = 0
        with self._keys():
            self.keys = {s: self._identity() for s in config.sites}
            publics = {s: k.public() for s, k in self.keys.items()}
            self.clients = {s: SecAggClient(config, s, self.keys[s], publics) for s in self.honest}
            self.colluders = {c: Colluder(config, c, self.keys[c]) for c in sorted(self.colluding)}
        rng = np.random.default_rng(self.length_seed)
        self.inputs = {
            s: rng.integers(0, 2**32, config.vector_length, dtype=np.uint64).astype(np.uint32)
            for s in self.honest
        }
        self._alive = set(self.honest)

    def _bytes(self) -> bytes:
        self._counter += 1
        return hashlib.sha256(f"{self.key_seed}/{self._counter}".encode()).digest()

    def _identity(self) -> IdentityKey:
        return (
            IdentityKey.generate() if self.key_seed is None else IdentityKey.from_private_bytes(self._bytes())
        )

    @contextmanager
    def _keys(self) -> Iterator[None]:
        """With ``key_seed``, ephemeral keys made inside come from a counter, not the OS."""
        if self.key_seed is None:
            yield
            return
        with mock.patch.object(AgreementKey, "generate", side_effect=self._agreement_key):
            yield

    def _agreement_key(self) -> AgreementKey:
        return AgreementKey.from_private_bytes(self._bytes())

    @property
    def honest(self) -> tuple[str, ...]:
        return tuple(s for s in self.config.sites if s not in self.colluding)

    @property
    def digest(self) -> bytes:
        return self.config.digest()

    def graph_of(self, site: str) -> NeighbourhoodGraph:
        """The graph an honest site derived (after it shared keys)."""
        return graph_for(self.config, self.seed_of[site])

    def _stop(self, site: str, error: Exception) -> None:
        self.stopped[site] = error
        self._alive.discard(site)

    def _quiet(self, silent: Iterable[str]) -> None:
        for site in silent:
            self._alive.discard(site)

    # --- the stages, as the server drives them -------------------------------------------------------------

    def advertise(self, silent: Iterable[str] = ()) -> None:
        self._quiet(silent)
        with self._keys():
            for site in sorted(self._alive):
                self.adverts[site] = self.clients[site].advertise_keys()
        for site, colluder in self.colluders.items():
            self.adverts[site] = colluder.advert

    def share(self, hidden: Mapping[str, Iterable[str]] | None = None, silent: Iterable[str] = ()) -> None:
        """Deliver each honest site the advertisements except ``hidden[site]``."""
        hidden = hidden or {}
        self._quiet(silent)
        for site in sorted(self._alive):
            shown = {s for s in self.adverts if s not in set(hidden.get(site, ()))}
            directory = KeyDirectory(
                recipient=site,
                config_digest=self.digest,
                advertisements=tuple(self.adverts[s] for s in sorted(shown)),
            )
            try:
                message = self.clients[site].share_keys(directory)
            except _STOPS as exc:
                self._stop(site, exc)
                continue
            seed = self.clients[site].graph_seed
            assert seed is not None
            self.shares[site], self.seed_of[site], self.directory_of[site] = message, seed, frozenset(shown)
            for box in message.boxes:
                if box.recipient in self.colluders:  # the colluder opens it for the server
                    seed_share, key_share = self.colluders[box.recipient].open(box, self.adverts[site], seed)
                    x = self.config.x_of(box.recipient)
                    self.points.setdefault((site, ShareKind.SELF_MASK_SEED), {})[x] = seed_share
                    self.points.setdefault((site, ShareKind.PAIRWISE_KEY), {})[x] = key_share

    def mask(
        self,
        withheld: Mapping[str, Iterable[str]] | None = None,
        silent: Iterable[str] = (),
        *,
        cross_seed: bool = False,
    ) -> None:
        """Deliver each honest site the boxes addressed to it except those of ``withheld[site]``; colluders
        send a box to every site that lists them as a neighbour. Boxes sealed under another graph seed would
        only make the site abort, so they are left out unless ``cross_seed``."""
        withheld = withheld or {}
        self._quiet(silent)
        for site in sorted(self._alive):
            keep = set(self.config.sites) - set(withheld.get(site, ()))
            boxes = [
                box
                for sender, message in sorted(self.shares.items())
                if sender in keep and (cross_seed or self.seed_of[sender] == self.seed_of[site])
                for box in message.boxes
                if box.recipient == site
            ]
            neighbours = self.graph_of(site).of(site) & self.directory_of[site]
            boxes += [
                self.colluders[c].box_for(site, self.adverts[site], self.seed_of[site])
                for c in sorted(neighbours & set(self.colluders) & keep)
            ]
            bundle = ShareBundle(recipient=site, config_digest=self.digest, boxes=tuple(boxes))
            try:
                self.masked[site] = self.clients[site].masked_input(bundle, self.inputs[site]).vector
            except _STOPS as exc:
                self._stop(site, exc)

    def default_survivors(self) -> tuple[str, ...]:
        """What an honest server would report: every site whose masked input it holds (colluders count)."""
        return tuple(sorted({*self.masked, *self.colluders}))

    def consistency(
        self, told: Mapping[str, Iterable[str]] | None = None, silent: Iterable[str] = ()
    ) -> None:
        """Ask each honest site to sign ``told[site]`` (default: the honest survivor set)."""
        told = told or {}
        self._quiet(silent)
        for site in sorted(self._alive):
            survivors = tuple(sorted(set(told.get(site, self.default_survivors()))))
            request = ConsistencyRequest(recipient=site, config_digest=self.digest, survivors=survivors)
            try:
                self.signatures[site] = self.clients[site].consistency(request).signature
            except _STOPS as exc:
                self._stop(site, exc)
                continue
            self.signed[site] = survivors

    def signatures_over(self, seed: bytes, survivors: tuple[str, ...]) -> tuple[SurvivorSignature, ...]:
        """Every valid signature the server holds or can make over (seed, survivors), from survivors."""
        out = {
            s: sig
            for s, sig in self.signatures.items()
            if self.signed[s] == survivors and self.seed_of[s] == seed and s in survivors
        }
        for c, colluder in self.colluders.items():
            if c in survivors:
                out[c] = colluder.sign(seed, survivors)
        return tuple(SurvivorSignature(site_id=s, signature=out[s]) for s in sorted(out))

    def unmask(self, silent: Iterable[str] = (), asked: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """Send each signer the set it signed with every signature over it (or ``asked[site]`` instead, a lie
        it must refuse), and keep every share it reveals."""
        asked = asked or {}
        self._quiet(silent)
        for site in sorted(self._alive):
            survivors = asked.get(site, self.signed[site])
            request = UnmaskRequest(
                recipient=site,
                config_digest=self.digest,
                survivors=survivors,
                signatures=self.signatures_over(self.seed_of[site], survivors),
            )
            try:
                response = self.clients[site].unmask(request)
            except _STOPS as exc:
                self._stop(site, exc)
                continue
            self.revealers.add(site)
            for share in response.shares:
                self.points.setdefault((share.owner, share.kind), {})[self.config.x_of(site)] = share.share

    def run(self) -> Knowledge:
        """An honest round (no lies), for checking the model itself."""
        self.advertise()
        self.share()
        self.mask()
        self.consistency()
        self.unmask()
        return closure(self)


# --- what the server knows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knowledge:
    seeds: Mapping[str, bytes]  # honest site -> self-mask seed the server rebuilt
    keys: Mapping[str, AgreementKey]  # honest site -> mask private key the server rebuilt


def closure(adv: Adversary) -> Knowledge:
    """Rebuild every honest secret for which the server holds at least share_threshold shares."""
    t = adv.config.share_threshold
    seeds: dict[str, bytes] = {}
    keys: dict[str, AgreementKey] = {}
    for (owner, kind), points in adv.points.items():
        if owner in adv.colluders or len(points) < t:
            continue
        secret = reconstruct_secret(points, t)
        if kind is ShareKind.SELF_MASK_SEED:
            commitment = _derive.self_mask_commitment(adv.config, adv.digest, secret, owner)
            assert constant_time_equal(commitment, adv.shares[owner].self_mask_commitment), owner
            seeds[owner] = secret
        else:
            key = AgreementKey.from_private_bytes(secret)
            assert key.public_bytes() == adv.adverts[owner].mask_public_key, owner
            keys[owner] = key
    return Knowledge(seeds=seeds, keys=keys)


def _edge_known(adv: Adversary, known: Knowledge, a: str, b: str) -> bool:
    return b in adv.colluders or a in known.keys or b in known.keys


def revealable(adv: Adversary, known: Knowledge) -> list[frozenset[str]]:
    """The sets of honest sites whose input sums the server can compute (the minimal ones: unions of these
    are computable too, nothing finer is)."""
    held = set(adv.masked)
    parent = {s: s for s in held}

    def find(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    blocked = {s for s in held if s not in known.seeds}
    for x in held:
        for y in adv.clients[x].masked_with:
            if _edge_known(adv, known, x, y):
                continue
            if y in held and x in adv.clients[y].masked_with:
                parent[find(x)] = find(y)
            else:
                blocked.add(x)  # an unknown mask only x's input carries
    groups: dict[str, set[str]] = {}
    for s in held:
        groups.setdefault(find(s), set()).add(s)
    return [frozenset(g) for g in groups.values() if not g & blocked]


def unmask_sum(adv: Adversary, known: Knowledge, group: Iterable[str]) -> NDArray[np.uint32]:
    """The sum of the group's inputs, computed from the masked inputs and the rebuilt secrets only."""
    config, digest = adv.config, adv.digest
    total = np.zeros(config.vector_length, dtype=np.uint32)
    add: list[bytes] = []
    subtract: list[bytes] = []
    members = sorted(group)
    for x in members:
        subtract.append(_derive.self_mask_seed(config, digest, known.seeds[x], x))
        seed = adv.seed_of[x]
        for y in sorted(adv.clients[x].masked_with):
            if not _edge_known(adv, known, x, y):
                continue  # cancels inside the group
            if y in adv.colluders:
                own, other = adv.colluders[y].mask, adv.adverts[x].mask_public_key
            elif x in known.keys:
                own, other = known.keys[x], adv.adverts[y].mask_public_key
            else:
                own, other = known.keys[y], adv.adverts[x].mask_public_key
            pair_seed = _derive.pairwise_mask_seed(config, digest, seed, own, other, x, y)
            (subtract if x < y else add).append(pair_seed)  # undo what x did with it
    apply_masks(total, add=add, subtract=subtract, vectors=[adv.masked[x] for x in members])
    return total


def plain_sum(adv: Adversary, group: Iterable[str]) -> NDArray[np.uint32]:
    total = np.zeros(adv.config.vector_length, dtype=np.uint64)
    for s in group:
        total += adv.inputs[s]
    return (total % (1 << 32)).astype(np.uint32)


def violations(adv: Adversary) -> list[tuple[frozenset[str], bool]]:
    """Revealable groups smaller than the guarantee (share_threshold - colluders: t - c with the full graph,
    s - c with neighbourhoods), each with whether the server's computation really gives their input sum."""
    known = closure(adv)
    bound = adv.config.share_threshold - len(adv.colluders)
    out: list[tuple[frozenset[str], bool]] = []
    for group in revealable(adv, known):
        exact = np.array_equal(unmask_sum(adv, known, group), plain_sum(adv, group))
        assert exact, f"the model says {sorted(group)} is revealable but the computation disagrees"
        if len(group) < bound:
            out.append((group, exact))
    return out

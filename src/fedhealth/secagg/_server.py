"""The SecAgg+ server: collects each stage's messages and, at the end, outputs only the sum.

The driver (the orchestrator) calls :meth:`SecAggServer.receive` for each upload and
:meth:`SecAggServer.close_stage` when the stage's deadline passes or :meth:`SecAggServer.awaiting` is empty;
the server goes on with whoever answered. Sites whose secrets could no longer be reconstructed are left out
at the first two stages (as if they had dropped), so a dropout during key set-up never stalls the round. When
fewer than ``threshold`` sites remain, or a neighbourhood is too thin, ``close_stage`` raises
:class:`RoundFailedError`, the server forgets every masked input and share, and nothing is revealed.

After the masked inputs it runs the consistency round: it sends the survivor set U3 to each survivor,
collects their signatures (checked on receipt when it knows the identities), and sends the survivors and all
signatures to each signer. Clients reveal nothing without t valid signatures over the set they signed.

The server asks each site for at most one kind of share per owner and refuses to store a share of the other
kind, so it never holds both the self-mask seed and the pairwise key of one site. The neighbourhood graph's
seed comes from the advertisements it relays (all of them, to every site), never from the server itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import CryptoError
from fedhealth.crypto import AgreementKey, PublicIdentity, constant_time_equal
from fedhealth.secagg import _derive
from fedhealth.secagg._config import NeighbourhoodGraph, SecAggConfig, graph_for
from fedhealth.secagg._crypto_extra import apply_masks
from fedhealth.secagg._errors import FailureReason, RoundFailedError, SecAggProtocolError, SecAggSecurityError
from fedhealth.secagg._messages import (
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    ServerMessage,
    ShareBox,
    ShareBundle,
    ShareKind,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedhealth.secagg._shamir import reconstruct_verified
from fedhealth.secagg._stages import SERVER_TRANSITIONS, ServerAction, Stage, next_stage

_M = TypeVar("_M", KeyAdvertisement, EncryptedShares, MaskedInput, ConsistencySignature, UnmaskResponse)

_RECEIVE = {
    KeyAdvertisement: ServerAction.RECEIVE_ADVERTISEMENT,
    EncryptedShares: ServerAction.RECEIVE_SHARES,
    MaskedInput: ServerAction.RECEIVE_MASKED_INPUT,
    ConsistencySignature: ServerAction.RECEIVE_CONSISTENCY,
    UnmaskResponse: ServerAction.RECEIVE_UNMASK_RESPONSE,
}


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class AggregateResult:
    """The server's only output: the ring sum of the contributors' vectors; decode it with a VectorCodec."""

    vector: NDArray[np.uint32]
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    # survivors that revealed a share off its owner's polynomial (a wrong share): the sum is right all the
    # same, rebuilt from the right shares. A name is a lead, not proof: the share's dealer (its owner) may
    # have dealt it wrong to an honest holder, which the server cannot tell apart
    misbehaving: tuple[str, ...] = ()


class SecAggServer:
    """The aggregating side of one SecAgg+ round.

    With ``identities`` the server also checks advertisement and consistency signatures on receipt, so a
    forged upload is refused at once instead of making every client abort; clients check them regardless.
    """

    def __init__(
        self, config: SecAggConfig, *, identities: Mapping[str, PublicIdentity] | None = None
    ) -> None:
        if identities is not None:
            missing = sorted(set(config.sites) - set(identities))
            if missing:
                raise SecAggProtocolError(f"no identity for sites {missing}")
        self._config = config
        self._identities = dict(identities) if identities is not None else None
        self._digest = config.digest()
        self._seed: bytes | None = None
        self._graph: NeighbourhoodGraph | None = None
        self.misbehaving: set[str] = set()  # survivors that revealed a wrong share (see _recover)
        self._stage = Stage.ADVERTISE_KEYS
        self._expected: frozenset[str] = frozenset(config.sites)
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._shares: dict[str, EncryptedShares] = {}
        self._masked: dict[str, MaskedInput] = {}
        self._signatures: dict[str, ConsistencySignature] = {}
        self._responses: dict[str, UnmaskResponse] = {}
        self._u1: frozenset[str] = frozenset()
        self._u2: frozenset[str] = frozenset()
        self._u3: frozenset[str] = frozenset()
        self._requested: dict[str, ShareKind] = {}  # owner -> the one kind of share the server may ever hold
        self._result: AggregateResult | None = None
        self._failure: RoundFailedError | None = None

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def config(self) -> SecAggConfig:
        return self._config

    @property
    def graph_seed(self) -> bytes | None:
        """The graph seed of the advertisements the server relayed (None before the first stage closed)."""
        return self._seed

    @property
    def graph(self) -> NeighbourhoodGraph:
        """The round's neighbourhood graph; known once the advertise stage has closed."""
        if self._graph is None:
            raise SecAggProtocolError("the graph is known once the advertise stage has closed")
        return self._graph

    @property
    def failure(self) -> RoundFailedError | None:
        """Why the round failed, once it has."""
        return self._failure

    def expected(self) -> frozenset[str]:
        """The sites that may answer the current stage."""
        return self._expected if self._stage in _COLLECTING else frozenset()

    def answered(self) -> frozenset[str]:
        """The sites whose message for the current stage has arrived."""
        stores: dict[Stage, Mapping[str, object]] = {
            Stage.ADVERTISE_KEYS: self._adverts,
            Stage.SHARE_KEYS: self._shares,
            Stage.MASKED_INPUT: self._masked,
            Stage.CONSISTENCY: self._signatures,
            Stage.UNMASK: self._responses,
        }
        return frozenset(stores.get(self._stage, {}))

    def awaiting(self) -> frozenset[str]:
        """Expected sites that have not answered yet: the driver may close the stage once this is empty."""
        return self.expected() - self.answered()

    def share_kinds_requested(self) -> Mapping[str, ShareKind]:
        """For each site, the single kind of its shares the server asked for (for audit and tests)."""
        return dict(self._requested)

    def _wipe(self) -> None:
        self._shares.clear()
        self._masked.clear()
        self._signatures.clear()
        self._responses.clear()

    def _fail(self, reason: FailureReason, detail: str) -> RoundFailedError:
        error = RoundFailedError(reason, detail)
        self._failure = error
        self._stage = Stage.FAILED
        self._expected = frozenset()
        self._wipe()
        return error

    def abort(self, detail: str = "aborted by the driver") -> None:
        next_stage(SERVER_TRANSITIONS, self._stage, ServerAction.ABORT, "server")
        self._fail(FailureReason.ABORTED, detail)

    def result(self) -> AggregateResult:
        next_stage(SERVER_TRANSITIONS, self._stage, ServerAction.READ_RESULT, "server")
        assert self._result is not None
        return self._result

    # --- receiving -----------------------------------------------------------------------------------------

    def receive(self, message: ClientMessage) -> None:
        """Accept one site's message for the current stage.

        An identical re-send is a no-op (retries are safe); a different second message, an unknown or
        unexpected site, or another round's message raises :class:`SecAggProtocolError`, and an advertisement
        whose keys are reused (or, with ``identities``, badly signed) raises :class:`SecAggSecurityError`;
        neither is kept.
        """
        action = _RECEIVE.get(type(message))
        if action is None:
            raise SecAggProtocolError(f"the server does not receive {type(message).__name__}")
        next_stage(SERVER_TRANSITIONS, self._stage, action, "server")
        site = message.site_id
        if message.config_digest != self._digest:
            raise SecAggProtocolError(f"the message from {site!r} belongs to another round")
        if site not in self._expected:
            raise SecAggProtocolError(f"{site!r} is not expected at stage {self._stage.value}")
        if isinstance(message, KeyAdvertisement):
            self._store(self._adverts, site, message, message == self._adverts.get(site))
            return
        if isinstance(message, EncryptedShares):
            self._check_shares(message)
            self._store(self._shares, site, message, message == self._shares.get(site))
            return
        if isinstance(message, MaskedInput):
            if message.vector.shape != (self._config.vector_length,):
                raise SecAggProtocolError(f"the masked input of {site!r} has the wrong length")
            prior = self._masked.get(site)
            same = prior is not None and np.array_equal(prior.vector, message.vector)
            self._store(self._masked, site, message, same)
            return
        if isinstance(message, ConsistencySignature):
            same = message == self._signatures.get(site)
            if not same:
                self._check_consistency(message)
            self._store(self._signatures, site, message, same)
            return
        self._check_response(message)
        self._store(self._responses, site, message, message == self._responses.get(site))

    def _store(self, store: dict[str, _M], site: str, message: _M, same: bool) -> None:
        if site in store:
            if same:
                return
            raise SecAggProtocolError(
                f"{site!r} already sent a different message at stage {self._stage.value}"
            )
        if isinstance(message, KeyAdvertisement):
            self._check_advertisement(message)
        store[site] = message

    def _check_advertisement(self, advert: KeyAdvertisement) -> None:
        keys = {advert.cipher_public_key, advert.mask_public_key}
        if len(keys) != 2 or any(
            keys & {a.cipher_public_key, a.mask_public_key} for a in self._adverts.values()
        ):
            raise SecAggSecurityError(f"{advert.site_id!r} advertises a key already in use")
        if self._identities is not None:
            payload = _derive.advertisement_payload(
                self._config, self._digest, advert.site_id, advert.cipher_public_key, advert.mask_public_key
            )
            try:
                _derive.verify_payload(self._identities[advert.site_id], advert.signature, payload)
            except CryptoError as exc:
                raise SecAggSecurityError(
                    f"the keys advertised for {advert.site_id!r} are not signed by it"
                ) from exc

    def _check_consistency(self, message: ConsistencySignature) -> None:
        if self._identities is None:
            return
        assert self._seed is not None
        payload = _derive.consistency_payload(self._config, self._digest, self._seed, self._u3)
        try:
            _derive.verify_payload(self._identities[message.site_id], message.signature, payload)
        except CryptoError as exc:
            raise SecAggSecurityError(
                f"the consistency signature of {message.site_id!r} does not sign the survivor set"
            ) from exc

    def _check_shares(self, message: EncryptedShares) -> None:
        want = self.graph.of(message.site_id) & self._u1
        got = {b.recipient for b in message.boxes}
        if got != want:
            raise SecAggProtocolError(
                f"{message.site_id!r} must send shares to exactly {sorted(want)}, got {sorted(got)}"
            )

    def _check_response(self, message: UnmaskResponse) -> None:
        site = message.site_id
        for share in message.shares:
            # the owner first: a name outside U2 (even outside the round) is a protocol error, not a KeyError
            if share.owner not in self._u2 or site not in self.graph.holders(share.owner):
                raise SecAggProtocolError(f"{site!r} cannot hold a share of {share.owner!r}")
            if self._requested.get(share.owner) is not share.kind:
                # never store the other kind: holding both would unmask that site's input
                raise SecAggSecurityError(
                    f"{site!r} revealed a {share.kind.value} share of {share.owner!r} unasked"
                )

    # --- closing stages ------------------------------------------------------------------------------------

    def close_stage(self) -> dict[str, ServerMessage]:
        """End the current stage with whoever answered; returns the message for each site that goes on.

        Closing the unmask stage returns no messages; the sum is then available from :meth:`result`.
        Raises :class:`RoundFailedError` (and forgets everything) when the round cannot go on.
        """
        nxt = next_stage(SERVER_TRANSITIONS, self._stage, ServerAction.CLOSE_STAGE, "server")
        if self._stage is Stage.ADVERTISE_KEYS:
            out = self._close_advertise()
        elif self._stage is Stage.SHARE_KEYS:
            out = self._close_share()
        elif self._stage is Stage.MASKED_INPUT:
            out = self._close_masked()
        elif self._stage is Stage.CONSISTENCY:
            out = self._close_consistency()
        else:
            self._close_unmask()
            out = {}
        self._stage = nxt
        return out

    def _prune(self, present: frozenset[str]) -> frozenset[str]:
        """Drop sites that keep fewer than share_threshold holders among ``present``, until none does."""
        t = self._config.share_threshold
        alive = set(present)
        changed = True
        while changed:
            thin = {s for s in alive if len(self.graph.holders(s) & alive) < t}
            alive -= thin
            changed = bool(thin)
        return frozenset(alive)

    def _require(self, present: frozenset[str], what: str) -> None:
        if len(present) < self._config.threshold:
            raise self._fail(
                FailureReason.TOO_FEW_SITES, f"{len(present)} sites {what}, {self._config.threshold} needed"
            )

    def _close_advertise(self) -> dict[str, ServerMessage]:
        self._require(frozenset(self._adverts), "advertised keys")
        # every site is shown every advertisement: the graph seed hashes them all, so all agree on the graph
        everyone = tuple(self._adverts[s] for s in sorted(self._adverts))
        self._seed = _derive.graph_seed(self._digest, everyone)
        self._graph = graph_for(self._config, self._seed)
        self._u1 = frozenset(self._adverts)
        # a site with too few share holders could not share its secrets: leave it out rather than wait
        going_on = self._prune(self._u1)
        self._require(going_on, "advertised keys with enough neighbours")
        self._expected = going_on
        return {
            site: KeyDirectory(recipient=site, config_digest=self._digest, advertisements=everyone)
            for site in sorted(going_on)
        }

    def _close_share(self) -> dict[str, ServerMessage]:
        self._require(frozenset(self._shares), "shared keys")
        u2 = self._prune(frozenset(self._shares))
        self._require(u2, "shared keys with enough neighbours")
        self._u2 = u2
        self._expected = u2
        inbox: dict[str, list[ShareBox]] = {site: [] for site in u2}
        for sender in sorted(u2):
            for box in self._shares[sender].boxes:
                if box.recipient in u2:
                    inbox[box.recipient].append(box)
        return {
            site: ShareBundle(recipient=site, config_digest=self._digest, boxes=tuple(inbox[site]))
            for site in sorted(u2)
        }

    def _close_masked(self) -> dict[str, ServerMessage]:
        u3 = frozenset(self._masked)
        self._require(u3, "sent masked inputs")
        graph = self.graph
        if not graph.is_connected(u3):
            raise self._fail(
                FailureReason.SURVIVORS_DISCONNECTED, "the survivors split the neighbourhood graph"
            )
        t = self._config.share_threshold
        dropped = self._u2 - u3
        needed = set(u3) | {j for j in dropped if graph.of(j) & u3}
        thin = sorted(s for s in needed if len(graph.holders(s) & u3) < t)
        if thin:
            raise self._fail(FailureReason.NEIGHBOURHOOD_TOO_SMALL, f"too few share holders left for {thin}")
        for owner in sorted(u3):
            self._grant(owner, ShareKind.SELF_MASK_SEED)
        for owner in sorted(dropped):
            self._grant(owner, ShareKind.PAIRWISE_KEY)
        self._u3 = u3
        self._expected = u3
        survivors = tuple(sorted(u3))
        return {
            site: ConsistencyRequest(recipient=site, config_digest=self._digest, survivors=survivors)
            for site in survivors
        }

    def _close_consistency(self) -> dict[str, ServerMessage]:
        signers = frozenset(self._signatures)
        self._require(signers, "signed the survivor set")
        survivors = tuple(sorted(self._u3))
        signatures = tuple(
            SurvivorSignature(site_id=s, signature=self._signatures[s].signature) for s in sorted(signers)
        )
        self._expected = signers
        return {
            site: UnmaskRequest(
                recipient=site, config_digest=self._digest, survivors=survivors, signatures=signatures
            )
            for site in sorted(signers)
        }

    def _grant(self, owner: str, kind: ShareKind) -> None:
        prior = self._requested.setdefault(owner, kind)
        if prior is not kind:
            raise SecAggSecurityError(f"refusing to request both kinds of share of {owner!r}")

    def _collect(self, owner: str, kind: ShareKind) -> dict[int, bytes]:
        points: dict[int, bytes] = {}
        for responder, response in self._responses.items():
            for share in response.shares:
                if share.owner == owner and share.kind is kind:
                    points[self._config.x_of(responder)] = share.share
        return points

    def _recover(self, owner: str, points: dict[int, bytes], verify: Callable[[bytes], bool]) -> bytes:
        """``owner``'s secret from the revealed shares, checked against its commitment (or public key). A
        survivor that revealed a wrong share neither stops the round nor goes unnamed: another set of the
        shares rebuilds the secret, and the holders of shares off its polynomial are recorded in
        :attr:`misbehaving` (the round still needs ``t`` right shares)."""
        try:
            secret, wrong = reconstruct_verified(points, self._config.share_threshold, verify)
        except ValueError:
            raise self._fail(
                FailureReason.INCONSISTENT_SHARES,
                f"the shares of {owner!r} are inconsistent: no {self._config.share_threshold} of the "
                f"{len(points)} revealed rebuild its committed secret",
            ) from None
        holders = {self._config.x_of(site): site for site in self._config.sites}
        self.misbehaving.update(holders[x] for x in wrong if x in holders)
        return secret

    def _close_unmask(self) -> None:
        self._require(frozenset(self._responses), "answered the unmask request")
        t = self._config.share_threshold
        u3, dropped = self._u3, self._u2 - self._u3
        self_seeds: dict[str, bytes] = {}
        for owner in sorted(u3):
            points = self._collect(owner, ShareKind.SELF_MASK_SEED)
            if len(points) < t:
                raise self._fail(
                    FailureReason.NEIGHBOURHOOD_TOO_SMALL, f"{len(points)} shares of {owner!r}, {t} needed"
                )
            committed = self._shares[owner].self_mask_commitment

            def matches(seed: bytes, owner: str = owner, committed: bytes = committed) -> bool:
                commitment = _derive.self_mask_commitment(self._config, self._digest, seed, owner)
                return constant_time_equal(commitment, committed)

            self_seeds[owner] = self._recover(owner, points, matches)
        graph, graph_seed = self.graph, self._seed
        assert graph_seed is not None
        dropped_keys: dict[str, AgreementKey] = {}
        for owner in sorted(j for j in dropped if graph.of(j) & u3):
            points = self._collect(owner, ShareKind.PAIRWISE_KEY)
            if len(points) < t:
                raise self._fail(
                    FailureReason.NEIGHBOURHOOD_TOO_SMALL, f"{len(points)} shares of {owner!r}, {t} needed"
                )
            advertised = self._adverts[owner].mask_public_key

            def is_key(secret: bytes, advertised: bytes = advertised) -> bool:
                try:
                    return constant_time_equal(
                        AgreementKey.from_private_bytes(secret).public_bytes(), advertised
                    )
                except CryptoError:
                    return False

            dropped_keys[owner] = AgreementKey.from_private_bytes(self._recover(owner, points, is_key))

        contributors = sorted(u3)
        # the first input copied rather than added to zeros: fresh zeroed pages cost more than the copy
        total = self._masked[contributors[0]].vector.copy()
        add: list[bytes] = []
        subtract = [
            _derive.self_mask_seed(self._config, self._digest, self_seed, site)
            for site, self_seed in self_seeds.items()
        ]
        for owner, key in dropped_keys.items():
            for survivor in sorted(graph.of(owner) & u3):
                try:
                    pair_seed = _derive.pairwise_mask_seed(
                        self._config,
                        self._digest,
                        graph_seed,
                        key,
                        self._adverts[survivor].mask_public_key,
                        owner,
                        survivor,
                    )
                except CryptoError:
                    raise self._fail(
                        FailureReason.INCONSISTENT_SHARES, f"unusable key of {survivor!r}"
                    ) from None
                # the survivor added its mask with `owner` if it has the lower id, subtracted it otherwise
                (subtract if survivor < owner else add).append(pair_seed)
        rest = [self._masked[site].vector for site in contributors[1:]]
        apply_masks(total, add=add, subtract=subtract, vectors=rest)
        self._result = AggregateResult(
            vector=total,
            contributors=tuple(sorted(u3)),
            dropped=tuple(s for s in self._config.sites if s not in u3),
            misbehaving=tuple(sorted(self.misbehaving)),
        )
        self._expected = frozenset()
        self._wipe()


_COLLECTING = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY,
    Stage.UNMASK,
)

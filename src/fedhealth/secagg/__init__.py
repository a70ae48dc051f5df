"""Secure aggregation: SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017) as sans-IO state machines.

Client and server consume messages and return messages; no sockets, clock or database. Tests drive them in
memory; the agent and the orchestrator drive them over HTTPS. The package owns the protocol (stages and their
transition table, signed ephemeral keys, Shamir shares sealed between site pairs, AES-CTR masks), the vector
codec that quantizes a site's contribution into the 32-bit ring, and the compute benchmark.

A round, as a driver sees it::

    server = SecAggServer(config)                       # orchestrator
    client = SecAggClient(config, site, key, identities)  # each agent
    server.receive(client.advertise_keys());  directories = server.close_stage()
    server.receive(client.share_keys(directories[site]));  bundles = server.close_stage()
    server.receive(client.masked_input(bundles[site], codec.encode(values)));  checks = server.close_stage()
    server.receive(client.consistency(checks[site]));  requests = server.close_stage()
    server.receive(client.unmask(requests[site]));  server.close_stage()
    sums = codec.decode(server.result().vector, len(server.result().contributors))

Driving it over HTTPS:

- Orchestrator: one :class:`SecAggServer` per round, in one process's memory. Call ``receive`` per upload (an
  identical re-send is a no-op, so retries are safe) and ``close_stage`` once ``awaiting()`` is empty or the
  stage deadline passes; deliver each returned message to its site. :class:`RoundFailedError` carries a
  :class:`FailureReason`; the server has then forgotten every masked input and share.
- Agent: one :class:`SecAggClient` per round, kept in memory (its ephemeral secrets are never persisted; a
  restart mid-round means the site dropped), and one long-lived :class:`KeyReuseGuard` per site process. Pin
  the peers' identities from enrollment. Stage methods are not idempotent: cache each outgoing message and
  re-send it on a transport retry. Pass ``before_reveal`` to record, durably, that the site unmasked this
  (study, round) before any share leaves it.
- Wire: ``to_bytes``/``from_bytes`` (or :func:`decode_message`) for every message; the masked input also as
  safetensors (:meth:`MaskedInput.to_safetensors`, tensor ``masked_input``, uint32).
- Values: build the round with ``vector_length=codec.length`` and a :class:`VectorCodec` whose
  ``max_contributors`` is the number of sites, so the sum cannot wrap.

Collective sessions (many short synchronous collectives over a fixed set of sites inside one task) are the
package's second protocol: :class:`CollectiveSite` and :class:`CollectiveRelay`, fixed point in the 2^64 ring
(:func:`encode_fixed`), pairwise masks fresh per call and no dropout recovery (``_collective.py`` describes
it).
"""

from fedhealth.secagg._client import KeyReuseGuard, SecAggClient
from fedhealth.secagg._codec import Segment, SegmentKind, VectorCodec
from fedhealth.secagg._collective import SUM_TAGS, CollectiveSite
from fedhealth.secagg._collective_relay import CollectiveRelay
from fedhealth.secagg._config import (
    PROTOCOL_VERSION,
    NeighbourhoodGraph,
    SecAggConfig,
    default_degree,
    graph_for,
    min_degree,
    min_threshold,
    neighbourhood_problem,
    sparse_share_threshold,
    threshold_problem,
)
from fedhealth.secagg._errors import (
    FailureReason,
    RoundFailedError,
    SecAggMessageError,
    SecAggProtocolError,
    SecAggSecurityError,
)
from fedhealth.secagg._fixedpoint import FixedPointRangeError, decode_fixed, encode_fixed, value_bound
from fedhealth.secagg._messages import (
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RevealedShare,
    ServerMessage,
    ShareBox,
    ShareBundle,
    ShareKind,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from fedhealth.secagg._server import AggregateResult, SecAggServer
from fedhealth.secagg._session import (
    COLLECTIVE_PROTOCOL,
    SETUP_INDEX,
    CallBuffer,
    CollectiveConfig,
    CollectiveOp,
    SessionAdvert,
    SessionFailedError,
    SessionFailure,
    decode_call,
    encode_call,
    participants_problem,
)
from fedhealth.secagg._session import (
    MIN_SITES as COLLECTIVE_MIN_SITES,
)
from fedhealth.secagg._simulate import InMemoryRound, RoundReport, run_in_memory, simulate_round
from fedhealth.secagg._stages import CLIENT_TRANSITIONS, SERVER_TRANSITIONS, ClientAction, ServerAction, Stage

__all__ = [
    "CLIENT_TRANSITIONS",
    "COLLECTIVE_MIN_SITES",
    "COLLECTIVE_PROTOCOL",
    "PROTOCOL_VERSION",
    "SERVER_TRANSITIONS",
    "SETUP_INDEX",
    "SUM_TAGS",
    "AggregateResult",
    "CallBuffer",
    "ClientAction",
    "ClientMessage",
    "CollectiveConfig",
    "CollectiveOp",
    "CollectiveRelay",
    "CollectiveSite",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShares",
    "FailureReason",
    "FixedPointRangeError",
    "InMemoryRound",
    "KeyAdvertisement",
    "KeyDirectory",
    "KeyReuseGuard",
    "MaskedInput",
    "NeighbourhoodGraph",
    "RevealedShare",
    "RoundFailedError",
    "RoundReport",
    "SecAggClient",
    "SecAggConfig",
    "SecAggMessageError",
    "SecAggProtocolError",
    "SecAggSecurityError",
    "SecAggServer",
    "Segment",
    "SegmentKind",
    "ServerAction",
    "ServerMessage",
    "SessionAdvert",
    "SessionFailedError",
    "SessionFailure",
    "ShareBox",
    "ShareBundle",
    "ShareKind",
    "Stage",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "VectorCodec",
    "decode_call",
    "decode_fixed",
    "decode_message",
    "default_degree",
    "encode_call",
    "encode_fixed",
    "graph_for",
    "min_degree",
    "min_threshold",
    "neighbourhood_problem",
    "participants_problem",
    "run_in_memory",
    "simulate_round",
    "sparse_share_threshold",
    "threshold_problem",
    "value_bound",
]

"""A whole round in one process: an in-memory driver and the compute benchmark built on it.

:func:`run_in_memory` plays the transport: it hands each message through its byte encoding (as the services
will) and lets chosen sites go silent from a chosen stage on. :func:`simulate_round` times complete rounds
(quantization, all clients and the server, serialization included; key enrollment and input generation
excluded), reports the bytes each site uploads, and measures in the same run the floor any such protocol
pays: :func:`keystream_floor`, the AES-CTR keystreams of every mask the round used and their additions
(10 sites x 1e6 parameters: 110 keystreams of 4 MB, 10 self masks and 90 pairwise masks at the clients, 10
self masks at the server).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedhealth.crypto import IdentityKey, random_bytes
from fedhealth.secagg._client import SecAggClient
from fedhealth.secagg._codec import Segment, SegmentKind, VectorCodec
from fedhealth.secagg._config import SecAggConfig
from fedhealth.secagg._crypto_extra import apply_masks
from fedhealth.secagg._errors import RoundFailedError
from fedhealth.secagg._messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from fedhealth.secagg._server import AggregateResult, SecAggServer
from fedhealth.secagg._stages import Stage

_ORDER = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK)


@dataclass(slots=True, kw_only=True)
class InMemoryRound:
    """What :func:`run_in_memory` observed."""

    result: AggregateResult | None = None
    failure: RoundFailedError | None = None
    upload_bytes: dict[str, int] = field(default_factory=dict)
    masked_input_bytes: dict[str, int] = field(default_factory=dict)
    client_seconds: float = 0.0
    server_seconds: float = 0.0


def _active(site: str, stage: Stage, silent_from: Mapping[str, Stage]) -> bool:
    stop = silent_from.get(site)
    return stop is None or _ORDER.index(stage) < _ORDER.index(stop)


def run_in_memory(
    server: SecAggServer,
    clients: Mapping[str, SecAggClient],
    inputs: Mapping[str, NDArray[np.uint32]],
    *,
    silent_from: Mapping[str, Stage] | None = None,
) -> InMemoryRound:
    """Drive one round; ``silent_from[site] = stage`` makes that site stop answering at ``stage``.

    A :class:`RoundFailedError` from the server is returned in ``failure``; client errors propagate.
    """
    silent = dict(silent_from or {})
    seen = InMemoryRound(upload_bytes=dict.fromkeys(clients, 0))
    clock = time.perf_counter

    def upload(site: str, data: bytes) -> None:
        seen.upload_bytes[site] += len(data)

    def serve(message: Any) -> None:
        t0 = clock()
        server.receive(message)
        seen.server_seconds += clock() - t0

    def close() -> dict[str, Any]:
        t0 = clock()
        try:
            return server.close_stage()
        finally:
            seen.server_seconds += clock() - t0

    try:
        for site, client in clients.items():
            if _active(site, Stage.ADVERTISE_KEYS, silent):
                t0 = clock()
                data = client.advertise_keys().to_bytes()
                seen.client_seconds += clock() - t0
                upload(site, data)
                serve(KeyAdvertisement.from_bytes(data))
        directories = close()
        for site, directory in directories.items():
            if _active(site, Stage.SHARE_KEYS, silent):
                t0 = clock()
                data = clients[site].share_keys(KeyDirectory.from_bytes(directory.to_bytes())).to_bytes()
                seen.client_seconds += clock() - t0
                upload(site, data)
                serve(EncryptedShares.from_bytes(data))
        bundles = close()
        for site, bundle in bundles.items():
            if _active(site, Stage.MASKED_INPUT, silent):
                t0 = clock()
                data = (
                    clients[site]
                    .masked_input(ShareBundle.from_bytes(bundle.to_bytes()), inputs[site])
                    .to_bytes()
                )
                seen.client_seconds += clock() - t0
                upload(site, data)
                seen.masked_input_bytes[site] = len(data)
                serve(MaskedInput.from_bytes(data))
        checks = close()
        for site, check in checks.items():
            if _active(site, Stage.CONSISTENCY, silent):
                t0 = clock()
                data = clients[site].consistency(ConsistencyRequest.from_bytes(check.to_bytes())).to_bytes()
                seen.client_seconds += clock() - t0
                upload(site, data)
                serve(ConsistencySignature.from_bytes(data))
        requests = close()
        for site, request in requests.items():
            if _active(site, Stage.UNMASK, silent):
                t0 = clock()
                data = clients[site].unmask(UnmaskRequest.from_bytes(request.to_bytes())).to_bytes()
                seen.client_seconds += clock() - t0
                upload(site, data)
                serve(UnmaskResponse.from_bytes(data))
        close()
        seen.result = server.result()
    except RoundFailedError as exc:
        if server.failure is not exc:
            raise
        seen.failure = exc
    return seen


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundReport:
    """Figures of :func:`simulate_round`: seconds are medians over the repeats, wall clock except
    ``cpu_seconds`` (this process's CPU time, which other load on the machine inflates less)."""

    sites: int
    params: int
    vector_length: int
    dropout: float
    drop_stage: Stage
    dropped: int
    degree: int
    threshold: int
    repeats: int
    seconds: float
    seconds_per_repeat: tuple[float, ...]
    cpu_seconds: float
    client_seconds: float
    server_seconds: float
    codec_seconds: float
    masked_input_bytes: int
    upload_bytes_per_site: int
    exact: bool
    keystreams: int = 0
    floor_seconds: float = 0.0
    floor_cpu_seconds: float = 0.0

    @property
    def floor_ratio(self) -> float:
        """Round compute over the keystream floor measured beside it, wall clock (target: <= 2.5)."""
        return self.seconds / self.floor_seconds if self.floor_seconds else math.inf

    @property
    def floor_cpu_ratio(self) -> float:
        """The same in this process's CPU time, which other load on the machine inflates less."""
        return self.cpu_seconds / self.floor_cpu_seconds if self.floor_cpu_seconds else math.inf

    def to_json(self) -> dict[str, object]:
        return {
            "sites": self.sites,
            "params": self.params,
            "vector_length": self.vector_length,
            "dropout": self.dropout,
            "drop_stage": self.drop_stage.value,
            "dropped": self.dropped,
            "degree": self.degree,
            "threshold": self.threshold,
            "repeats": self.repeats,
            "seconds": self.seconds,
            "seconds_per_repeat": list(self.seconds_per_repeat),
            "cpu_seconds": self.cpu_seconds,
            "client_seconds": self.client_seconds,
            "server_seconds": self.server_seconds,
            "codec_seconds": self.codec_seconds,
            "masked_input_bytes": self.masked_input_bytes,
            "plain_float32_bytes": 4 * self.params,
            "upload_bytes_per_site": self.upload_bytes_per_site,
            "exact": self.exact,
            "keystreams": self.keystreams,
            "floor_seconds": self.floor_seconds,
            "floor_ratio": self.floor_ratio,
            "floor_cpu_seconds": self.floor_cpu_seconds,
            "floor_cpu_ratio": self.floor_cpu_ratio,
        }


def keystream_floor(length: int, streams: int) -> tuple[float, float]:
    """(wall, CPU) seconds to expand ``streams`` fresh AES-CTR keystreams of ``length`` uint32 and add them
    into a vector: the work every mask of a round costs however the protocol is organised."""
    seeds = [random_bytes(32) for _ in range(streams)]
    target = np.zeros(length, dtype=np.uint32)
    start, cpu_start = time.perf_counter(), time.process_time()
    apply_masks(target, add=seeds)
    return time.perf_counter() - start, time.process_time() - cpu_start


def round_keystreams(server: SecAggServer, clients: Mapping[str, SecAggClient]) -> int:
    """How many mask keystreams a finished round expanded: each contributor's self mask and pairwise masks,
    and at the server every contributor's self mask and each dropped site's masks with the contributors."""
    result = server.result()
    contributors = set(result.contributors)
    at_clients = sum(1 + len(clients[s].masked_with) for s in contributors)
    dropped_keys = [o for o, k in server.share_kinds_requested().items() if k is ShareKind.PAIRWISE_KEY]
    at_server = len(contributors) + sum(len(server.graph.of(o) & contributors) for o in dropped_keys)
    return at_clients + at_server


def benchmark_codec(sites: int, params: int) -> VectorCodec:
    """A model delta (weighted by sample count) plus the scalars a training round reports."""
    return VectorCodec(
        segments=(
            Segment(name="weighted_delta", length=params, low=-1.0, high=1.0),
            Segment(name="samples", low=0, high=1_000_000, kind=SegmentKind.INTEGER),
            Segment(name="loss_sum", low=0.0, high=1e6),
            Segment(name="correct", low=0, high=1_000_000, kind=SegmentKind.INTEGER),
        ),
        max_contributors=sites,
    )


def simulate_round(
    *,
    sites: int,
    params: int,
    dropout: float = 0.0,
    drop_stage: Stage = Stage.MASKED_INPUT,
    threshold: int | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> RoundReport:
    """Time whole SecAgg+ rounds of ``sites`` sites summing ``params`` parameters, in this one process.

    A fraction ``dropout`` of the sites stops answering at ``drop_stage``. ``threshold`` defaults to
    ceil(2n/3). The timing covers quantizing each input, every client and server step, message encoding and
    decoding, and dequantizing the sum. After each round the keystream floor of that round is timed too
    (``floor_seconds`` and ``floor_cpu_seconds``, medians; ``floor_ratio`` and ``floor_cpu_ratio``).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout is a fraction in [0, 1)")
    if drop_stage not in _ORDER:
        raise ValueError("drop_stage must be one of the five protocol stages")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = tuple(f"site-{i:04d}" for i in range(sites))
    t = threshold if threshold is not None else max(sites // 2 + 1, math.ceil(2 * sites / 3))
    codec = benchmark_codec(sites, params)
    rng = np.random.default_rng(seed)
    identities = {s: IdentityKey.generate() for s in names}
    publics = {s: k.public() for s, k in identities.items()}
    n_drop = round(dropout * sites)
    raw: dict[str, dict[str, ArrayLike]] = {
        s: {
            "weighted_delta": rng.uniform(-1.0, 1.0, params).astype(np.float32),
            "samples": int(rng.integers(1, 1000)),
            "loss_sum": float(rng.uniform(0, 500)),
            "correct": int(rng.integers(0, 1000)),
        }
        for s in names
    }
    totals, cpu_times, client_times, server_times, codec_times = [], [], [], [], []
    floors: list[float] = []
    cpu_floors: list[float] = []
    streams = 0
    exact = True
    observed: InMemoryRound | None = None
    degree = 0
    for r in range(repeats):
        config = SecAggConfig(
            study_id="benchmark", round=r, sites=names, threshold=t, vector_length=codec.length
        )
        degree = config.degree
        dropped = {str(s) for s in rng.choice(names, size=n_drop, replace=False)} if n_drop else set()
        start, cpu_start = time.perf_counter(), time.process_time()
        encoded = {s: codec.encode(raw[s]) for s in names}
        encode_seconds = time.perf_counter() - start
        clients = {s: SecAggClient(config, s, identities[s], publics) for s in names}
        server = SecAggServer(config)
        observed = run_in_memory(server, clients, encoded, silent_from=dict.fromkeys(dropped, drop_stage))
        if observed.result is None:
            raise RuntimeError(f"the benchmark round failed: {observed.failure}")
        t0 = time.perf_counter()
        codec.decode(observed.result.vector, len(observed.result.contributors))
        decode_seconds = time.perf_counter() - t0
        totals.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        client_times.append(observed.client_seconds + encode_seconds)
        server_times.append(observed.server_seconds + decode_seconds)
        codec_times.append(encode_seconds + decode_seconds)
        plain = np.zeros(codec.length, dtype=np.uint64)
        for s in observed.result.contributors:
            plain += encoded[s]
        exact = (
            exact
            and bool(plain.max() <= np.iinfo(np.uint32).max)
            and np.array_equal(plain.astype(np.uint32), observed.result.vector)
        )
        # the floor, right after the round it bounds, so both see the same machine state
        streams = round_keystreams(server, clients)
        wall, cpu = keystream_floor(codec.length, streams)
        floors.append(wall)
        cpu_floors.append(cpu)
    assert observed is not None
    return RoundReport(
        sites=sites,
        params=params,
        vector_length=codec.length,
        dropout=dropout,
        drop_stage=drop_stage,
        dropped=n_drop,
        degree=degree,
        threshold=t,
        repeats=repeats,
        seconds=statistics.median(totals),
        seconds_per_repeat=tuple(totals),
        cpu_seconds=statistics.median(cpu_times),
        client_seconds=statistics.median(client_times),
        server_seconds=statistics.median(server_times),
        codec_seconds=statistics.median(codec_times),
        masked_input_bytes=max(observed.masked_input_bytes.values()),
        upload_bytes_per_site=max(observed.upload_bytes.values()),
        exact=exact,
        keystreams=streams,
        floor_seconds=statistics.median(floors),
        floor_cpu_seconds=statistics.median(cpu_floors),
    )

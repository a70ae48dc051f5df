"""XGBoost's federated communicator, answered at the site: a gRPC servicer of XGBoost 3.2.0's
``federated.proto`` on 127.0.0.1 whose every call goes through a session's collectives (docs/boosting.md).

XGBoost's federated client sends each collective of the site's worker to this proxy (one proxy per site,
listening on the loopback interface only, and answering only connections from its own process: another
local account's program that finds the port is refused before anything is summed). The proxy answers from
the session:

- Allreduce SUM of floats: one secure sum, exact to 2^-80 (:class:`FloatSums`, like LightGBM's sums);
- Allreduce SUM of integers: one secure sum of 16-bit limbs, recombined modulo 2^(8 x width);
- Allgather, AllgatherV, Broadcast and the other reductions (MAX, MIN, bitwise): each site's buffer in its own
  block of a secure sum (so the sum is their concatenation), reduced at the site. XGBoost uses these, with
  agreed bins, only for metadata (column counts, flags); they are released like split records.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import ProtocolError, keep_malloc_heaps
from fedhealth.learning._collectives import Collectives
from fedhealth.learning._lightgbm_network import FloatSums  # the same exact sums as LightGBM's

log = logging.getLogger(__name__)

SERVICE = "xgboost.collective.federated.Federated"
_TYPES: dict[int, str] = {
    1: "<f4",
    2: "<f8",
    4: "<i1",
    5: "<i2",
    6: "<i4",
    7: "<i8",
    8: "<u1",
    9: "<u2",
    10: "<u4",
    11: "<u8",
}
MAX, MIN, SUM, AND, OR, XOR = range(6)
# What all sites' blocks of one gather may hold together: XGBoost's gathers and broadcasts here carry its
# parameters, a seed, a column count (kilobytes). The lengths come back from the relay as a sum, and a sum
# altered by it must not size an allocation at the site.
_MAX_GATHER_BYTES = 16 << 20


def _gather_sizes(summed: NDArray[np.float64], rank: int, own: int) -> list[int]:
    """Each site's length in a gather, from the sum of the lengths' blocks; :class:`ProtocolError` where the
    relay's sum cannot be the sites' lengths (not whole, negative, not this site's own, too large)."""
    if not np.all(np.isfinite(summed)) or np.any(summed < 0) or np.any(summed != np.rint(summed)):
        raise ProtocolError("the relay's sum of a gather's lengths is not a list of lengths")
    sizes = [int(v) for v in summed]
    if sizes[rank] != own or sum(sizes) > _MAX_GATHER_BYTES:
        raise ProtocolError("the relay's sum of a gather's lengths is not the sites' lengths")
    return sizes


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def decode_request(data: bytes) -> dict[int, Any]:
    """A federated.proto request's fields by number (varints and bytes; proto3, no nesting)."""
    fields: dict[int, Any] = {}
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            fields[number] = view[pos : pos + length]  # no copy of a histogram buffer
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire} in a federated.proto request")
    return fields


# 127.0.0.1 as the kernel's TCP tables print it (32-bit words in host order): in /proc/net/tcp, and as the
# IPv4-mapped address of a dual-stack socket (gRPC's) in /proc/net/tcp6
_LOOPBACK = (
    ("0100007F", "0000000000000000FFFF00000100007F")
    if sys.byteorder == "little"
    else ("7F000001", "00000000000000000000FFFF7F000001")
)


def peer_is_this_process(peer: str, port: int) -> bool | None:
    """Whether gRPC's ``peer`` (``ipv4:127.0.0.1:P``, or its IPv4-mapped IPv6 form) is a socket of this very
    process connected to ``port`` on 127.0.0.1 (:func:`own_peer_socket`); None where that cannot be read."""
    found = own_peer_socket(peer, port)
    return found if found is None or found is False else True


def own_peer_socket(peer: str, port: int) -> tuple[int, str] | bool | None:
    """This process's descriptor and its link (``socket:[inode]``) of the socket that is gRPC's ``peer``
    connected to ``port`` on 127.0.0.1, or False when that socket is not this process's (or there is none):
    the kernel's TCP table (``/proc/net/tcp``) gives the inode of the socket with that pair of ends, and it
    must be one of this process's open files. None where the table cannot be read (not Linux)."""
    prefix = next((p for p in ("ipv4:127.0.0.1:", "ipv6:[::ffff:127.0.0.1]:") if peer.startswith(p)), "")
    if not prefix or not peer[len(prefix) :].isdigit():
        return False
    ends = (f"{int(peer[len(prefix) :]):04X}", f"{port:04X}")
    table: list[str] = []
    for name in ("tcp", "tcp6"):  # tcp6 is absent where IPv6 is off
        try:
            table += Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
    if not table:
        return None
    inode = None
    for line in table:  # sl local rem st tx:rx tr:tm retr uid timeout inode ...
        fields = line.split()
        if len(fields) < 10:
            continue
        (local_ip, _, local_port), (remote_ip, _, remote_port) = (f.partition(":") for f in fields[1:3])
        if (local_port, remote_port) == ends and local_ip in _LOOPBACK and remote_ip in _LOOPBACK:
            inode = fields[9]
            break
    if inode is None or inode == "0":
        return False
    target = f"socket:[{inode}]"
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return int(fd), target
        except OSError:
            continue
    return False


def still_open(fd: int, target: str) -> bool:
    """Whether descriptor ``fd`` of this process still is the socket ``target`` (``socket:[inode]``). While
    it is, no other socket can hold the same pair of TCP ends: a connection from the same peer address is
    that socket's."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == target
    except OSError:
        return False


def encode_reply(buffer: bytes | bytearray | memoryview | NDArray[Any]) -> bytes:
    """A reply message: ``bytes receive_buffer = 1``, from any contiguous buffer (an array's bytes are
    copied once, into the message)."""
    out = bytearray(b"\x0a")
    length = memoryview(buffer).nbytes
    while True:
        byte = length & 0x7F
        length >>= 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"".join((out, buffer))


class SessionProxy:
    """The site's federated.proto server over ``session``; ``calls`` counts them by kind."""

    def __init__(self, session: Collectives) -> None:
        self.session = session
        self.n = len(session.sites)
        self.rank = session.sites.index(session.site)
        self.calls: dict[str, int] = {}
        self.values_sent = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._float_sums = FloatSums(self._secure_sum)
        # callers found to be this process: gRPC's peer address -> the descriptor and inode of our socket
        self._peers: dict[str, tuple[int, str]] = {}
        self._unchecked_logged = False
        self.refused = 0  # calls refused: not from this process
        self._server: Any = None
        self.port = 0

    def start(self) -> str:
        import grpc

        keep_malloc_heaps()

        def unary(fn: Any) -> Any:
            def admitted(request: dict[int, Any], context: Any) -> bytes | NDArray[Any]:
                self._admit(context)
                return fn(request, context)  # type: ignore[no-any-return]

            return grpc.unary_unary_rpc_method_handler(
                admitted, request_deserializer=decode_request, response_serializer=encode_reply
            )

        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Allgather": unary(self._allgather),
                "AllgatherV": unary(self._allgather),
                "Allreduce": unary(self._allreduce),
                "Broadcast": unary(self._broadcast),
            },
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)

    def _admit(self, context: Any) -> None:
        """Refuse (PERMISSION_DENIED) a call that does not come from this process, XGBoost's worker: the
        port is open to every local account, and a call of theirs would become this site's part of a sum
        and get them the other sites' pooled histograms.

        Reading the kernel's TCP table takes milliseconds, so a caller is looked up there once per
        connection: the peer address is remembered with the descriptor and inode of this process's socket,
        and a later call from that address is answered while that very socket is still open (a cheap
        ``readlink``). Once it is closed, another account may bind its port and connect from the same
        address: that call is looked up again, and refused."""
        peer = context.peer()
        held = self._peers.get(peer)
        if held is not None and still_open(*held):
            return
        own = own_peer_socket(peer, self.port)
        if own is None:  # no /proc: the caller cannot be checked here
            if not self._unchecked_logged:
                log.warning("XGBoost proxy: callers cannot be checked on this platform (no /proc/net/tcp)")
                self._unchecked_logged = True
            return
        if not own:
            import grpc

            self.refused += 1
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "only this site's XGBoost worker may call its proxy"
            )
        if isinstance(own, tuple):
            self._peers[peer] = own

    # --- the collectives --------------------------------------------------------------------------------

    def _secure_sum(self, values: NDArray[np.float64]) -> NDArray[np.float64]:
        self.values_sent += int(values.size)
        return self.session.secure_sum(values)

    def _guarded(self, what: str, fn: Any, context: Any) -> bytes | NDArray[Any]:
        """``fn()``'s reply buffer (bytes or a contiguous array, which :func:`encode_reply` copies once)."""
        with self._lock:
            self.calls[what] = self.calls.get(what, 0) + 1
            try:
                result: bytes | NDArray[Any] = fn()
                return result
            except BaseException as exc:
                self.error = self.error or exc
                import grpc

                context.abort(grpc.StatusCode.ABORTED, "the collective session failed")
                raise

    def gather(self, data: bytes) -> list[bytes]:
        """Every site's bytes, in rank order: lengths, then 16-bit words, each site in its own block."""
        if len(data) > _MAX_GATHER_BYTES:
            raise ProtocolError(f"a gather of more than {_MAX_GATHER_BYTES} bytes is not one of XGBoost's")
        lengths = np.zeros(self.n)
        lengths[self.rank] = len(data)
        sizes = _gather_sizes(self._secure_sum(lengths), self.rank, len(data))
        words = [(s + 1) // 2 for s in sizes]
        offsets = np.cumsum([0, *words])
        values = np.zeros(int(offsets[-1]))
        padded = data + b"\0" * (len(data) % 2)
        values[offsets[self.rank] : offsets[self.rank + 1]] = np.frombuffer(padded, dtype="<u2")
        total = np.rint(self._secure_sum(values)).astype("<u2").tobytes()
        return [total[2 * offsets[r] : 2 * offsets[r] + sizes[r]] for r in range(self.n)]

    def _allgather(self, request: dict[int, Any], context: Any) -> bytes | NDArray[Any]:
        return self._guarded("gather", lambda: b"".join(self.gather(bytes(request.get(3, b"")))), context)

    def _broadcast(self, request: dict[int, Any], context: Any) -> bytes | NDArray[Any]:
        root = int(request.get(4, 0))
        data = bytes(request.get(3, b"")) if self.rank == root else b""
        return self._guarded("gather", lambda: self.gather(data)[root], context)

    def _allreduce(self, request: dict[int, Any], context: Any) -> bytes | NDArray[Any]:
        dtype = np.dtype(_TYPES[int(request.get(4, 0))])
        op = int(request.get(5, 0))
        values = np.frombuffer(request.get(3, b""), dtype=dtype)
        if op == SUM and dtype.kind == "f":
            return self._guarded(
                "float_sum", lambda: self._float_sum(values).astype(dtype, copy=False), context
            )
        if op == SUM:
            return self._guarded("int_sum", lambda: self._int_sum(values), context)

        def reduce() -> NDArray[Any]:
            parts = [np.frombuffer(b, dtype=dtype) for b in self.gather(values.tobytes())]
            fn = {
                MAX: np.maximum,
                MIN: np.minimum,
                AND: np.bitwise_and,
                OR: np.bitwise_or,
                XOR: np.bitwise_xor,
            }
            out = parts[0]
            for part in parts[1:]:
                out = fn[op](out, part)
            return np.ascontiguousarray(out, dtype=dtype)

        return self._guarded("metadata", reduce, context)

    def _float_sum(self, values: NDArray[Any]) -> NDArray[np.float64]:
        return self._float_sums(np.asarray(values, dtype=np.float64))[0]

    def _int_sum(self, values: NDArray[Any]) -> NDArray[Any]:
        width = values.dtype.itemsize
        unsigned = values.view(f"<u{width}") if width > 1 else values.view("<u1")
        limbs = np.frombuffer(unsigned.astype("<u8").tobytes(), dtype="<u2").astype(np.float64)
        sums = np.rint(self._secure_sum(limbs)).astype(np.uint64).reshape(-1, 4)
        total = np.zeros(sums.shape[0], dtype=np.uint64)
        for k in range(4):
            total += sums[:, k] << np.uint64(16 * k)  # wraps modulo 2^64, as the integers do
        return total.astype(f"<u{width}" if width > 1 else "<u1").view(values.dtype)

"""LightGBM's network, routed through a session's collectives (docs/boosting.md).

LightGBM's data-parallel learner talks to the other machines through two functions it is given with
``LGBM_NetworkInitWithFunctions``: a reduce-scatter and an allgather. :class:`SessionNetwork` implements both
on a :class:`~fedhealth.learning.Collectives` session so that nothing a site computed from its own rows leaves
it except inside a secure sum.

Each site runs a LightGBM network of its own with two ranks (:class:`RankGroup`: one booster per rank, each on
its own thread), whatever the number of sites. Both ranks search the best split of their blocks of features in
the *summed* histograms; LightGBM keeps, per leaf, the record of the larger gain (at equal gain the smaller
feature index), which is the best record over all features however they are shared among machines, so the
two ranks choose the split that n machines choose: the split-record allgather is answered at the site,
without a round trip. Only rank 0 trains on the site's rows; rank 1 trains on a few placeholder rows
(:func:`placeholder_rows`): every sum a rank asks for is answered with the sum of rank 0's values over the
sites (the placeholder's values are never sent), and a rank's decisions depend only on such sums, so the
placeholder rank grows the same tree while LightGBM's work on the site's rows is done once. The session
makes each sum once:

- reduce-scatter (gradient histograms; LightGBM hands the reducer, which must be a float64 sum): one secure
  sum of the whole buffer, with this site's rows of the same leaf per (feature, bin code) after it, several
  to a value (:func:`pack_counts`; :class:`TreeTracker`: the exact counts of every candidate split); each
  rank keeps its block.
- allgather of a sum-type statistic (label counts and sums at booster creation, the root's (n, Σg, Σh) of each
  tree): one secure sum; the site writes the sum into block 0 and zeros into the others, so that LightGBM's
  own local reduction (block 0 + block 1 + ...) yields the sum exactly.
- allgather of the initial score's mean (``GlobalSyncUpByMean``, the first iteration): the value every site
  must agree on (the objective's global start, or the pooled label mean for regression, which the recipe
  computed from secure sums) is written so that LightGBM's division by the number of machines returns it.
- allgather of the best-split records (2 × ``SplitInfo``, computed from the summed histograms): the site's
  own ranks' records, with the exact row counts written in; these records, which become the model, are the
  only values released per split, and every site computes them alike.

Anything else LightGBM asks for (another reducer, another size) fails the session: it is never sent in clear.
The call sites are those of LightGBM 4.7.0 (the ``gbdt`` extra pins it; tests/learning/test_lightgbm.py
checks the schedule).

LightGBM keeps its network state per thread and gives the callbacks no context pointer: a network is bound to
the thread that created it (:meth:`SessionNetwork.bind`), which must also train and free it. Its thread count,
on the other hand, is one value for the whole process, which every booster's creation and every prediction
sets from its ``num_threads`` (0, the default, means OpenMP's maximum); a learner sizes per-thread buffers
with one read of it and runs the loop that fills them with another (``SerialTreeLearner::Train`` and
``DataParallelTreeLearner::FindBestSplitsFromHistograms``), so a rise while any booster of the process is
inside an iteration writes past the end of a buffer and corrupts the heap. Every LightGBM call of the
recipe passes ``num_threads=1`` (tests/learning/test_lightgbm.py checks the value after training).

Python exceptions cannot unwind through LightGBM's C++ frames, so a callback never raises: it records the
error, answers with the site's local values (as if it were alone; LightGBM finishes the iteration on them)
and the training loop raises the error after the iteration (:meth:`SessionNetwork.check`).
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhealth.learning._collectives import Collectives

# 2 x SplitInfo::Size(max_cat_threshold) with LightGBM's default max_cat_threshold of 32 (split_info.hpp)
SPLIT_RECORD_BYTES = 2 * (94 + 4 * 32)
_SCALE = 2.0**40  # the session's fixed-point scale
ROOT_TUPLE_BYTES = 24  # std::tuple<int32, double, double> in libstdc++: Σh at 0, Σg at 8, n at 16

_REDUCER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int32)
_REDUCE_SCATTER = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_int,
    ctypes.POINTER(ctypes.c_int32),
    ctypes.POINTER(ctypes.c_int32),
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_void_p,  # const ReduceFunction&: a pointer to the function pointer
)
_ALLGATHER = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_int32),
    ctypes.POINTER(ctypes.c_int32),
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_int32,
)

_bound = threading.local()

# The machines of the LightGBM network each site runs (module docstring): two, the fewest LightGBM's
# data-parallel learner runs with, for any number of sites.
NETWORK_RANKS = 2


class UnprotectedCollectiveError(RuntimeError):
    """LightGBM asked for a collective this bridge does not know how to protect; the session fails."""


class RankGroup:
    """The LightGBM ranks one site runs (:data:`NETWORK_RANKS`), one thread each, in lockstep (see the module
    docstring).

    Only the site's own rank (:attr:`own`, rank 0) trains on this site's rows; the other trains on placeholder
    rows. Every sum the ranks ask for is made once over the session's :attr:`sites`, of the own rank's values
    (:meth:`secure_sum`): the other rank's values are never looked at, and every rank gets the sum.
    :meth:`gather` is a rendezvous of the ranks only. A rank that stops (:meth:`fail`) stops the others at
    their next call.
    """

    def __init__(self, session: Collectives, tree: TreeTracker | None = None) -> None:
        self.session = session
        self.sites = len(session.sites)  # the participants of every secure sum
        self.n = NETWORK_RANKS  # the machines of this site's LightGBM network, whatever the session's size
        self.own = 0  # the rank that trains on this site's rows
        self.ranks = list(range(self.n))  # the ranks this site runs: all of them
        self.tree = tree  # shared by the ranks: the group updates it once per step
        self.values_sent = 0  # float64 values this site put into secure sums during training
        self._cond = threading.Condition()
        self._arrived: dict[int, Any] = {}
        self._generation = 0
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self.error: BaseException | None = None
        self._float_sums: FloatSums | None = None

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
            self._cond.notify_all()

    def _rendezvous(self, rank: int, value: Any, combine: Callable[[list[Any]], Any]) -> Any:
        with self._cond:
            if self.error is not None:
                raise UnprotectedCollectiveError("another LightGBM rank of this site failed") from self.error
            if rank in self._arrived:
                raise UnprotectedCollectiveError(f"LightGBM rank {rank} called twice in one step")
            generation = self._generation
            self._arrived[rank] = value
            if len(self._arrived) == len(self.ranks):
                values = [self._arrived[r] for r in self.ranks]
                self._arrived = {}
                try:
                    self._outcome = (combine(values), None)
                except BaseException as exc:
                    self._outcome = (None, exc)
                    self.error = self.error or exc
                self._generation += 1
                self._cond.notify_all()
            else:
                while self._generation == generation:
                    if self.error is not None:
                        raise UnprotectedCollectiveError(
                            "another LightGBM rank of this site failed"
                        ) from self.error
                    self._cond.wait()
            result, error = self._outcome
            if error is not None:
                raise error
            return result

    def _send(self, values: NDArray[np.float64]) -> NDArray[np.float64]:
        self.values_sent += int(np.size(values))
        return self.session.secure_sum(values)

    @property
    def float_sums(self) -> FloatSums:
        """The group's :class:`FloatSums` (one per group: every site's makes the same decisions)."""
        if self._float_sums is None:
            self._float_sums = FloatSums(self._send)
        return self._float_sums

    def _own_values(self, blocks: list[Any]) -> Any:
        """The own rank's values of a rendezvous (the placeholder ranks' are never used)."""
        values = blocks[self.own]
        if values is None:
            raise UnprotectedCollectiveError("this site's own LightGBM rank passed no values to sum")
        return values

    def secure_sum(self, rank: int, values: NDArray[np.float64]) -> NDArray[np.float64]:
        """The session's secure sum of the own rank's ``values``, to every rank."""
        data = np.array(values, dtype=np.float64) if rank == self.own else None
        return self._rendezvous(  # type: ignore[no-any-return]
            rank, data, lambda blocks: self._send(self._own_values(blocks))
        )

    def float_sum(self, rank: int, values: NDArray[np.float64]) -> NDArray[np.float64]:
        """The exact sum (:class:`FloatSums`) over the session of the own rank's ``values``, to every rank."""
        data = np.array(values, dtype=np.float64) if rank == self.own else None
        return self._rendezvous(  # type: ignore[no-any-return]
            rank, data, lambda blocks: self.float_sums(self._own_values(blocks))[0]
        )

    def histogram_sum(self, rank: int, values: NDArray[np.float64] | None) -> NDArray[np.float64]:
        """The summed histograms of the own rank's ``values`` (float64; the other ranks pass None), with the
        tree's exact counts. The own rank's buffer is read while every rank waits here."""

        def once(blocks: list[Any]) -> NDArray[np.float64]:
            own = self._own_values(blocks)
            if self.tree is None:
                return self.float_sums(own)[0]
            counts = self.tree.leaf_histogram()
            rows = self.tree.pooled_rows  # no count, and no sum of counts over the sites, exceeds them
            total, words = self.float_sums(own, pack_counts(counts, rows))
            assert words is not None
            self.tree.take_histogram(unpack_counts(words, rows, counts.size))
            return total

        return self._rendezvous(rank, values if rank == self.own else None, once)  # type: ignore[no-any-return]

    def share(self, rank: int, value: Any) -> Any:
        """Rank 0's ``value``, to every rank once all arrived."""
        return self._rendezvous(rank, value, lambda values: values[0])

    def gather(self, rank: int, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (split records: with the tree's exact counts written in)."""

        def once(blocks: list[bytes]) -> list[bytes]:
            return self.tree.exact_counts(blocks) if self.tree is not None else blocks

        return self._rendezvous(rank, bytes(data), once)  # type: ignore[no-any-return]


class FloatSums:
    """Sums of float64 values over the sites, exact to 2^-80, in one secure sum each while they can be.

    Each value splits into its 2^-40 fixed-point part and the remainder times 2^40 (both exact in float64);
    each part sums exactly in the session's ring and the result is their sum, rounded once. A plain 2^-40
    sum would round the tiny hessians of confident rows (float32 values below 2^-17), and the model would
    drift from LightGBM's own sums.

    The remainders are zero as long as every value is a multiple of 2^-40, as float32 gradients and hessians
    of magnitude 2^-17 or more, and float64 sums of them, are (docs/boosting.md, "Float sums"): the second
    part need not travel. While the last sum needed no second part, a sum is one secure sum of the first
    parts and a flag (1 if this site has a value off the 2^-40 grid). If the summed flag is 0, the first
    parts' sum *is* the exact sum, bit for bit what the two parts give. Otherwise every site (each learned
    the same flag) sends both parts, and keeps sending both, with the flag, until a two-part sum's flag is 0
    again. Learned beyond the two-part sums: per sum, the number of sites with a value off the grid (the
    first parts' sum of a repeated sum is also in the repeat).

    Every site decides from sums every site receives, so the sites' vectors always have the same length.
    ``calls`` counts the secure sums made, ``repeats`` the sums that had to be sent again in two parts.
    """

    def __init__(self, secure_sum: Callable[[NDArray[np.float64]], NDArray[np.float64]]) -> None:
        self._secure_sum = secure_sum
        self.one_part = True
        self.calls = 0
        self.repeats = 0

    def __call__(
        self, values: NDArray[np.float64], extra: NDArray[np.float64] | None = None
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
        """The exact sum of ``values`` over the sites. ``extra`` values (multiples of 2^-40, such as
        :func:`pack_counts`'s) ride in the same secure sum, after the values, in one part each; their sum is
        the second item (None without them)."""
        flat = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        n = flat.size
        n_extra = 0 if extra is None else extra.size
        parts = np.empty(2 * n + n_extra + 1, dtype=np.float64)
        high, low = parts[:n], parts[n : 2 * n]
        np.multiply(flat, _SCALE, out=low)  # exact: a power of two
        np.rint(low, out=high)
        np.subtract(low, high, out=low)  # the remainder times 2^40, exact
        np.multiply(high, 1 / _SCALE, out=high)
        off_grid = 1.0 if np.any(low) else 0.0
        if self.one_part:
            first = np.empty(n + n_extra + 1, dtype=np.float64)
            first[:n] = high
            if extra is not None:
                first[n : n + n_extra] = extra
            first[-1] = off_grid
            total = self._sum(first)
            if round(float(total[-1])) == 0:  # no site had a remainder: the first parts sum exactly
                return total[:n], (None if extra is None else total[n : n + n_extra])
            self.repeats += 1
        if extra is not None:
            parts[2 * n : 2 * n + n_extra] = extra
        parts[-1] = off_grid
        total = self._sum(parts)
        self.one_part = round(float(total[-1])) == 0  # the next sum tries one part once no site needed two
        summed = np.multiply(total[n : 2 * n], 1 / _SCALE)
        np.add(summed, total[:n], out=summed)  # one rounding, as before: high + low / 2^40
        return summed, (None if extra is None else total[2 * n : 2 * n + n_extra])

    def _sum(self, values: NDArray[np.float64]) -> NDArray[np.float64]:
        self.calls += 1
        return self._secure_sum(values)


# A secure sum carries a value x as the integer round(x * 2^40); an integer word below 2^53 goes in as
# word * 2^-40 and comes back exactly (float64 holds it, the ring sums it without a carry out of the word).
_WORD_BITS = 53


def count_fields(rows: int) -> tuple[int, int]:
    """The bits of one count field and the fields per word when no count, and no sum of counts over the
    sites, exceeds ``rows`` (the pooled rows of the tree): each field's sum then stays inside it."""
    if not 0 <= rows < 2**_WORD_BITS:
        raise UnprotectedCollectiveError("the pooled row count is outside what a packed count can hold")
    bits = max(1, int(rows).bit_length())
    return bits, _WORD_BITS // bits


def pack_counts(counts: NDArray[np.int64], rows: int) -> NDArray[np.float64]:
    """This site's row counts, several to a secure-sum value (:func:`count_fields`), as values of the
    session's fixed point. Refuses counts outside [0, ``rows``] (their sums could carry into the next
    field) before anything is sent."""
    bits, per_word = count_fields(rows)
    flat = np.asarray(counts, dtype=np.int64).reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) > rows):
        raise UnprotectedCollectiveError("a row count exceeds the pooled rows: it cannot be packed")
    padded = np.zeros(-(-flat.size // per_word) * per_word, dtype=np.int64)
    padded[: flat.size] = flat
    fields = padded.reshape(-1, per_word)
    words = np.zeros(fields.shape[0], dtype=np.int64)
    for k in range(per_word):
        words |= fields[:, k] << (bits * k)
    return words.astype(np.float64) * (1 / _SCALE)  # exact: integers below 2^53, a power of two


def unpack_counts(summed: NDArray[np.float64], rows: int, size: int) -> NDArray[np.int64]:
    """The summed counts from the sum over the sites of :func:`pack_counts`'s values (``size`` counts)."""
    bits, per_word = count_fields(rows)
    words = np.rint(np.asarray(summed, dtype=np.float64) * _SCALE).astype(np.int64)
    if words.size != -(-size // per_word):
        raise UnprotectedCollectiveError("the summed row counts have another size")
    mask = (1 << bits) - 1
    fields = np.stack([(words >> (bits * k)) & mask for k in range(per_word)], axis=1)
    return fields.reshape(-1)[:size]


class SessionNetwork:
    """One site's LightGBM network over ``session`` (see the module's docstring).

    ``local_rows``: the site's training rows (checked against the root statistics' layout). ``init_schedule``:
    what each 8-byte allgather of the first iteration is, in order (``"sum"`` or ``"mean"``).
    ``init_score``: for a ``"mean"`` call, the value every site must end with (None: the value LightGBM
    passes, which must then be the same at every site, checked with a secure sum).
    """

    def __init__(
        self,
        group: RankGroup,
        rank: int,
        *,
        local_rows: int,
        init_schedule: Sequence[str],
        init_score: Callable[[int], float | None],
    ) -> None:
        self.group = group
        self.n = group.n
        self.rank = rank
        self.local_rows = local_rows
        self._schedule = list(init_schedule)
        self._init_score = init_score
        self._means = 0
        self.phase = "create"  # "create" (booster construction), "init" (first iteration's start), "train"
        self.error: BaseException | None = None
        self.calls: dict[str, int] = {}
        self._sum_reducers: dict[int, bool] = {}
        self.tree = group.tree

    # --- binding to LightGBM's thread-local network ----------------------------------------------------

    def bind(self, lib: Any) -> None:
        """``LGBM_NetworkInitWithFunctions`` on this thread, with this network behind the callbacks."""
        if getattr(_bound, "network", None) is not None:
            raise RuntimeError("this thread already runs a LightGBM network")
        callback = getattr(lib, "callback", None)  # LightGBM's log callback is per thread: this one's too
        if callback is not None:
            lib.LGBM_RegisterLogCallback(callback)
        _bound.network = self
        code = lib.LGBM_NetworkInitWithFunctions(
            ctypes.c_int(self.n),
            ctypes.c_int(self.rank),
            ctypes.cast(_reduce_scatter_cb, ctypes.c_void_p),
            ctypes.cast(_allgather_cb, ctypes.c_void_p),
        )
        if code != 0:
            _bound.network = None
            raise RuntimeError(lib.LGBM_GetLastError().decode())

    def unbind(self, lib: Any) -> None:
        """``LGBM_NetworkFree`` on this thread."""
        try:
            lib.LGBM_NetworkFree()
        finally:
            _bound.network = None

    def check(self) -> None:
        """Raise the error a callback recorded, if any."""
        if self.error is not None:
            raise self.error

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def _secure_sum(self, values: NDArray[np.float64]) -> NDArray[np.float64]:
        return self.group.secure_sum(self.rank, values)

    # --- reduce-scatter --------------------------------------------------------------------------------

    def _is_float_sum(self, reducer_ref: int) -> bool:
        fn_ptr = ctypes.cast(reducer_ref, ctypes.POINTER(ctypes.c_void_p))[0]
        key = int(fn_ptr or 0)
        known = self._sum_reducers.get(key)
        if known is None:
            reducer = _REDUCER(key)
            src = np.array([1.5, -0.25], dtype=np.float64)
            dst = np.array([2.25, 4.0], dtype=np.float64)
            reducer(src.ctypes.data, dst.ctypes.data, 8, 16)
            known = dst.tolist() == [3.75, 3.75]
            self._sum_reducers[key] = known
        return known

    def reduce_scatter(
        self,
        input_ptr: int,
        input_size: int,
        type_size: int,
        starts: list[int],
        lens: list[int],
        output_ptr: int,
        reducer_ref: int,
    ) -> None:
        start, length = starts[self.rank], lens[self.rank]
        source = input_ptr + start  # on failure: this rank's own block, as if it were alone
        total: NDArray[np.float64] | None = None
        if self.error is None:
            try:
                if type_size != 8 or input_size % 8 or not self._is_float_sum(reducer_ref):
                    raise UnprotectedCollectiveError(
                        "LightGBM asked for a reduce-scatter that is not a float64 sum"
                    )
                values = None
                if self.rank == self.group.own:  # a view: LightGBM waits in this call while it is read
                    buffer = (ctypes.c_char * input_size).from_address(input_ptr)
                    values = np.frombuffer(buffer, dtype=np.float64)
                # with the histograms, this site's row counts per bin of the same leaf (module docstring)
                total = np.ascontiguousarray(self.group.histogram_sum(self.rank, values), dtype=np.float64)
                if total.nbytes != input_size:
                    raise UnprotectedCollectiveError("the summed histograms have another size")
                source = total.ctypes.data + start
                self._count("histogram_sum")
            except BaseException as exc:
                self.error = exc
                source = input_ptr + start
        ctypes.memmove(output_ptr, source, length)

    # --- allgather -------------------------------------------------------------------------------------

    def allgather(
        self, input_ptr: int, input_size: int, starts: list[int], lens: list[int], output_ptr: int
    ) -> None:
        data = ctypes.string_at(input_ptr, input_size)  # first: LightGBM may pass output as input
        blocks = [b"\0" * length for length in lens]
        if self.error is None:
            try:
                blocks = self._allgather(data, lens)
            except BaseException as exc:
                self.error = exc
        if self.error is not None:  # alone: every block this site's own
            blocks = [data[:length].ljust(length, b"\0") for length in lens]
        total = max(start + length for start, length in zip(starts, lens, strict=True))
        out = bytearray(total)
        for start, length, block in zip(starts, lens, blocks, strict=True):
            out[start : start + length] = block
        ctypes.memmove(output_ptr, bytes(out), total)

    def _allgather(self, data: bytes, lens: list[int]) -> list[bytes]:
        size = len(data)
        if any(length != size for length in lens):
            raise UnprotectedCollectiveError("LightGBM asked for an allgather of unequal blocks")
        zeros = b"\0" * size
        if size == SPLIT_RECORD_BYTES:
            self._count("split_records")
            return self._gather_records(data)
        if size == 4 and self.phase == "create":  # the objective's label counts (BinaryLogloss::Init)
            self._count("count_sum")
            (value,) = struct.unpack("<i", data)
            total = self._secure_sum(np.array([value], dtype=np.float64))
            return [struct.pack("<i", round(float(total[0]))), *[zeros] * (self.n - 1)]
        if size == ROOT_TUPLE_BYTES and self.phase != "create":
            hess, grad, rows = struct.unpack("<ddi4x", data)
            if rows != self.local_rows:
                raise UnprotectedCollectiveError("LightGBM's root statistics do not have the expected layout")
            self.phase = "train"
            self._count("root_sum")
            h, g, n = self.group.float_sum(self.rank, np.array([hess, grad, rows], dtype=np.float64)).tolist()
            if self.tree is not None:  # shared by the ranks, each resets it alike
                self.tree.start(round(n))
            return [struct.pack("<ddi4x", h, g, round(n)), *[zeros] * (self.n - 1)]
        if size == 8:
            kind = "sum" if self.phase == "create" else (self._schedule.pop(0) if self._schedule else None)
            if self.phase == "train" or kind is None:
                raise UnprotectedCollectiveError("LightGBM asked for an unexpected 8-byte allgather")
            (value,) = struct.unpack("<d", data)
            if kind == "sum":
                self._count("statistic_sum")
                total = self.group.float_sum(self.rank, np.array([value], dtype=np.float64))
                return [struct.pack("<d", float(total[0])), *[zeros] * (self.n - 1)]
            self._count("init_score")
            chosen = self._init_score(self._means)
            self._means += 1
            if chosen is None:  # LightGBM's own value, the same at every site: check that it is
                chosen = value
                total = self._secure_sum(np.array([value], dtype=np.float64))
                if total[0] != int(np.rint(value * 2.0**40)) * self.group.sites / 2.0**40:
                    raise UnprotectedCollectiveError("the sites do not agree on the initial score")
            return [struct.pack("<d", _times_n(chosen, self.n)), *[zeros] * (self.n - 1)]
        raise UnprotectedCollectiveError(f"LightGBM asked for an unexpected {size}-byte allgather")

    def _gather_records(self, data: bytes) -> list[bytes]:
        """Every rank's record, from this site's own ranks (each searched its block of the same summed
        histograms; the best of them is the best over all features): nothing crosses the network."""
        return self.group.gather(self.rank, data)


# SplitInfo::CopyTo's layout (split_info.hpp): feature i32 @0, left_count i32 @4, right_count i32 @8,
# gain f64 @12, threshold u32 @20, ...
_SPLIT_BYTES = SPLIT_RECORD_BYTES // 2
_HEAD = struct.Struct("<iiidI")


@dataclass(slots=True)
class _Split:
    feature: int
    left: int
    right: int
    gain: float
    threshold: int

    def beats(self, other: _Split) -> bool:
        """SplitInfo::operator>: the larger gain, then the smaller feature index (-1 last)."""
        if self.gain != other.gain:
            return self.gain > other.gain
        mine = self.feature if self.feature >= 0 else 2**31 - 1
        theirs = other.feature if other.feature >= 0 else 2**31 - 1
        return mine < theirs


_NONE = _Split(feature=-1, left=0, right=0, gain=-math.inf, threshold=0)


class TreeTracker:
    """This site's copy of the tree LightGBM is growing, so that every split record carries the exact number
    of rows on each side instead of LightGBM's data-parallel estimate from hessians. With exact counts
    LightGBM's data-parallel learner makes the decisions its serial learner makes on the pooled rows
    (min_data_in_leaf, the smaller child, the counts in the model).

    The counts travel with the histograms: each histogram sum (the smaller leaf of a split search) carries
    this site's rows of that leaf per (feature, bin code) (:meth:`leaf_histogram`); the summed counts of the
    smaller leaf, and the parent's minus them for the larger one (:meth:`take_histogram`), give every site the
    global rows on the left of any candidate split of either leaf (``code <= threshold``) without another
    round trip (:meth:`exact_counts`).

    It replays SerialTreeLearner::Train of LightGBM 4.7.0: best-first, the leaf of the largest gain is split
    (left keeps the leaf's index, right takes the next), children with ``left_count < right_count`` make the
    left child the smaller one, and BeforeFindBestSplit skips the search when the depth limit is reached or
    both children are below twice ``min_data_in_leaf``.
    """

    def __init__(
        self,
        codes: NDArray[np.int64],
        *,
        num_bins: Sequence[int],
        num_leaves: int,
        max_depth: int,
        min_data_in_leaf: int,
    ):
        if codes.ndim != 2 or codes.shape[1] != len(num_bins):
            raise ValueError("the codes have another number of features than the binning")
        self.num_bins = [int(b) for b in num_bins]
        self.offsets = np.concatenate([[0], np.cumsum(self.num_bins)]).astype(np.int64)
        # every row's (feature, code) cell in one flat histogram of all features, and each feature's codes
        # as one contiguous column (the partition reads one feature of a leaf's rows)
        self._cells = np.clip(codes, 0, np.asarray(self.num_bins) - 1) + self.offsets[:-1]
        self._columns = np.ascontiguousarray(codes.T)
        self._all_rows = np.arange(codes.shape[0], dtype=np.intp)
        # this site's rows per cell of the root (every row), the same for every tree
        self._root_local = np.bincount(self._cells.reshape(-1), minlength=int(self.offsets[-1]))
        self.num_leaves = num_leaves
        self.max_depth = max_depth
        self.min_data_in_leaf = min_data_in_leaf
        self.pooled_rows = 0  # the tree's root: every site's rows
        self.rows: list[NDArray[np.intp]] = []  # this site's rows of each leaf, ascending
        # this site's rows per (feature, code) of each leaf that a pending or later search may split
        self.local: dict[int, NDArray[np.int64]] = {}
        self.counts: list[int] = []
        self.depth: list[int] = []
        self.best: list[_Split] = []
        self.histograms: dict[int, NDArray[np.int64]] = {}  # global rows per (feature, code), by leaf
        self._cumulative: dict[int, NDArray[np.int64]] = {}  # their running sums, for the left counts
        self._parent: NDArray[np.int64] | None = None  # the histogram of the leaf the pending search splits
        self.pending: tuple[int, int] | None = None
        self.splits = 0

    def start(self, rows: int) -> None:
        """A new tree: every row in leaf 0; the search for (smaller 0, larger none) comes next."""
        self.pooled_rows = rows
        self.rows = [self._all_rows]
        self.local = {0: self._root_local}
        self.counts, self.depth, self.best = [rows], [0], [_NONE]
        self.histograms, self._cumulative, self._parent = {}, {}, None
        self.pending = (0, -1)
        self.splits = 0

    def _expect_search(self) -> tuple[int, int]:
        if self.pending is None:
            raise UnprotectedCollectiveError("LightGBM searched for a split the replayed tree did not expect")
        return self.pending

    def leaf_histogram(self) -> NDArray[np.int64]:
        """This site's rows of the pending search's smaller leaf per (feature, code), features in a row."""
        smaller, _ = self._expect_search()
        return self.local[smaller]

    def take_histogram(self, summed: NDArray[np.int64]) -> None:
        """The global histogram of the smaller leaf (the sum of every site's :meth:`leaf_histogram`)."""
        smaller, larger = self._expect_search()
        if summed.shape != (int(self.offsets[-1]),):
            raise UnprotectedCollectiveError("the summed row counts do not match the binning")
        cumulative = np.cumsum(summed)
        # every row of the leaf is in one bin of each feature: a count that carried into its neighbour
        # field, or any other corruption, shows here
        ends = cumulative[self.offsets[1:] - 1]
        if np.any(np.diff(ends, prepend=0) != self.counts[smaller]):
            raise UnprotectedCollectiveError("the summed row counts do not add up to the leaf's rows")
        self.histograms[smaller] = summed
        self._cumulative[smaller] = cumulative
        if larger >= 0:
            if self._parent is None:
                raise UnprotectedCollectiveError("the replayed tree lost the histogram of the leaf split")
            self.histograms[larger] = self._parent - summed
            self._cumulative[larger] = np.cumsum(self.histograms[larger])
        self._parent = None

    def _left_of(self, leaf: int, split: _Split) -> int:
        cumulative = self._cumulative.get(leaf)
        if cumulative is None:
            raise UnprotectedCollectiveError("a split record came for a leaf without summed row counts")
        if not 0 <= split.feature < len(self.num_bins):
            raise UnprotectedCollectiveError("a split record names a feature the binning does not have")
        first = int(self.offsets[split.feature])
        bins = min(int(split.threshold) + 1, self.num_bins[split.feature])
        before = int(cumulative[first - 1]) if first else 0
        return int(cumulative[first + bins - 1]) - before

    def exact_counts(self, blocks: list[bytes]) -> list[bytes]:
        """The gathered split records with the exact rows on each side, from the leaves' summed histograms."""
        leaves = self._expect_search()
        records = [[_Split(*_HEAD.unpack_from(b, k * _SPLIT_BYTES)) for k in (0, 1)] for b in blocks]
        out = []
        for pair, block in zip(records, blocks, strict=True):
            changed = bytearray(block)
            for k, leaf in enumerate(leaves):
                if leaf >= 0 and pair[k].feature >= 0:
                    pair[k].left = self._left_of(leaf, pair[k])
                    pair[k].right = self.counts[leaf] - pair[k].left
                    struct.pack_into("<ii", changed, k * _SPLIT_BYTES + 4, pair[k].left, pair[k].right)
            out.append(bytes(changed))
        for k, leaf in enumerate(leaves):  # SyncUpGlobalBestSplit: the first best in site order
            if leaf >= 0:
                chosen = records[0][k]
                for pair in records[1:]:
                    if pair[k].beats(chosen):
                        chosen = pair[k]
                self.best[leaf] = chosen
        self._grow()
        return out

    def _grow(self) -> None:
        """Replay LightGBM's loop until its next split search (``pending``) or the tree's end (None)."""
        self.pending = None
        while True:
            best_leaf = 0
            for leaf in range(1, len(self.best)):
                if self.best[leaf].beats(self.best[best_leaf]):
                    best_leaf = leaf
            split = self.best[best_leaf]
            if split.gain <= 0.0:
                return
            new = len(self.counts)
            self._parent = self.histograms.pop(best_leaf, None)
            self._cumulative.pop(best_leaf, None)
            parent_rows = self.rows[best_leaf]
            goes_right = self._columns[split.feature][parent_rows] > split.threshold
            self.rows[best_leaf] = parent_rows[~goes_right]
            self.rows.append(parent_rows[goes_right])
            parent_local = self.local.pop(best_leaf, None)
            self.counts[best_leaf] = split.left
            self.counts.append(split.right)
            self.depth[best_leaf] += 1
            self.depth.append(self.depth[best_leaf])
            self.best.append(_NONE)
            self.splits += 1
            if self.splits >= self.num_leaves - 1:
                return
            too_deep = self.max_depth > 0 and self.depth[best_leaf] >= self.max_depth
            too_few = split.right < 2 * self.min_data_in_leaf and split.left < 2 * self.min_data_in_leaf
            if too_deep or too_few:
                self.best[best_leaf] = self.best[new] = _NONE
                continue
            self.pending = (best_leaf, new) if split.left < split.right else (new, best_leaf)
            self._split_local(parent_local, best_leaf, new)
            return

    def _split_local(self, parent: NDArray[np.int64] | None, left: int, right: int) -> None:
        """This site's histograms of both children of a split: the side with fewer of its rows counted, the
        other the parent's minus it (as LightGBM builds the larger leaf's)."""
        if parent is None:
            raise UnprotectedCollectiveError("the replayed tree lost this site's counts of the leaf split")
        few, many = (left, right) if self.rows[left].size <= self.rows[right].size else (right, left)
        cells = self._cells[self.rows[few]]
        self.local[few] = np.bincount(cells.reshape(-1), minlength=int(self.offsets[-1]))
        self.local[many] = parent - self.local[few]


def _times_n(value: float, n: int) -> float:
    """A double ``w`` with ``w / n == value`` in float64 (LightGBM divides the summed blocks by the number
    of machines), the nearest to ``value * n``; ``value * n`` itself if none is near."""
    w = value * n
    candidates = [w]
    for direction in (math.inf, -math.inf):
        x = w
        for _ in range(8):
            x = math.nextafter(x, direction)
            candidates.append(x)
    for candidate in candidates:
        if candidate / n == value:
            return candidate
    return w


def _ints(ptr: Any, n: int) -> list[int]:
    return list(ptr[:n])  # a ctypes int32 pointer's slice: Python ints


@_REDUCE_SCATTER
def _reduce_scatter_cb(  # type: ignore[no-untyped-def]
    input_ptr, input_size, type_size, block_start, block_len, num_block, output_ptr, output_size, reducer_ref
):
    network: SessionNetwork | None = getattr(_bound, "network", None)
    if network is None:  # cannot happen: LightGBM calls back on the thread that bound it
        return
    try:
        network.reduce_scatter(
            input_ptr,
            input_size,
            type_size,
            _ints(block_start, num_block),
            _ints(block_len, num_block),
            output_ptr,
            reducer_ref,
        )
    except BaseException as exc:  # never through the C++ frames
        network.error = network.error or exc


@_ALLGATHER
def _allgather_cb(input_ptr, input_size, block_start, block_len, num_block, output_ptr, output_size):  # type: ignore[no-untyped-def]
    network: SessionNetwork | None = getattr(_bound, "network", None)
    if network is None:
        return
    try:
        network.allgather(
            input_ptr, input_size, _ints(block_start, num_block), _ints(block_len, num_block), output_ptr
        )
    except BaseException as exc:
        network.error = network.error or exc

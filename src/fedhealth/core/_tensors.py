"""Tensor serialization: safetensors on the wire and on disk, validated on receipt. Never pickle.

A payload is a safetensors file: named tensors plus a string-to-string metadata map. ``decode_tensors`` checks
the header before touching the data (size limits, names, dtypes, shapes) and then that every floating-point
value is finite, so a malformed or hostile upload is refused with a message that names the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import safetensors.numpy

from fedhealth.core._errors import TensorError

# safetensors dtype codes we accept, and their numpy equivalents
_DTYPES: dict[str, np.dtype[np.generic]] = {
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
}
_CODES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """The name, shape and dtype a tensor must have."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def specs_of(tensors: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """The specs of a tensor dict, sorted by name."""
    return [TensorSpec(name=k, shape=tuple(v.shape), dtype=str(v.dtype)) for k, v in sorted(tensors.items())]


def encode_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named arrays (C-contiguous copies are made where needed) to safetensors bytes."""
    for name, arr in tensors.items():
        if arr.dtype not in _CODES:
            raise TensorError(f"tensor {name!r}: dtype {arr.dtype} is not supported")
    clean = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return safetensors.numpy.save(clean, metadata=dict(metadata) if metadata else None)


def read_header(data: bytes) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Parse and sanity-check the safetensors header: (tensor entries, metadata)."""
    if len(data) < 8:
        raise TensorError("payload is not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise TensorError(f"payload is not a safetensors file: header length {header_len} is out of range")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorError("payload is not a safetensors file: header is not JSON") from exc
    except RecursionError as exc:  # JSON nested deeper than the parser recurses (within the size limit)
        raise TensorError("payload is not a safetensors file: header nests too deep") from exc
    if not isinstance(header, dict):
        raise TensorError("payload is not a safetensors file: header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TensorError("safetensors metadata must map strings to strings")
    body = len(data) - 8 - header_len
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise TensorError(f"tensor {name!r}: malformed header entry")
        code = entry["dtype"]
        if not isinstance(code, str) or code not in _DTYPES:  # a list or an object is no dtype (nor hashable)
            raise TensorError(f"tensor {name!r}: dtype {str(code)[:40]} is not supported")
        shape = entry["shape"]
        offsets = entry["data_offsets"]
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise TensorError(f"tensor {name!r}: malformed shape or offsets")
        start, end = offsets
        if not 0 <= start <= end <= body or end - start != math.prod(shape) * _DTYPES[code].itemsize:
            raise TensorError(f"tensor {name!r}: data offsets do not match its shape and dtype")
    return header, metadata


def decode_tensors(
    data: bytes,
    expected: Sequence[TensorSpec] | None = None,
    *,
    require_finite: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Deserialize and validate a safetensors payload.

    With ``expected``, the payload must hold exactly those tensors with those shapes and dtypes.
    Raises :class:`TensorError` with a message naming the offending tensor.
    """
    header, metadata = read_header(data)
    if expected is not None:
        want = {s.name: s for s in expected}
        missing = sorted(want.keys() - header.keys())
        extra = sorted(header.keys() - want.keys())
        if missing or extra:
            raise TensorError(f"tensor names do not match the model: missing {missing}, unexpected {extra}")
        for name, spec in want.items():
            entry = header[name]
            got_dtype = str(_DTYPES[str(entry["dtype"])])
            if got_dtype != spec.dtype:
                raise TensorError(f"tensor {name!r}: expected dtype {spec.dtype}, got {got_dtype}")
            got_shape: tuple[int, ...] = tuple(entry["shape"])  # type: ignore[arg-type]
            if got_shape != spec.shape:
                raise TensorError(f"tensor {name!r}: expected shape {spec.shape}, got {got_shape}")
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError; translate at this boundary
        raise TensorError(f"payload is not a valid safetensors file: {exc}") from exc
    if require_finite:
        for name, arr in tensors.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise TensorError(f"tensor {name!r} holds NaN or infinite values")
    return tensors, metadata

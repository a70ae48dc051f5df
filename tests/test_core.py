import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedhealth.core import TensorError, TensorSpec, canonical_json, decode_tensors, encode_tensors


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint32]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_tensor_round_trip_preserves_values_and_metadata(arr):
    blob = encode_tensors({"w": arr}, {"k": "v"})
    out, meta = decode_tensors(blob, [TensorSpec(name="w", shape=arr.shape, dtype=str(arr.dtype))])
    np.testing.assert_array_equal(out["w"], arr)
    assert out["w"].dtype == arr.dtype
    assert meta == {"k": "v"}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor_is_refused_with_its_name(bad):
    arr = np.zeros(4, np.float32)
    arr[2] = bad
    with pytest.raises(TensorError, match="'weight' holds NaN or infinite"):
        decode_tensors(encode_tensors({"weight": arr}))


def test_wrong_shape_dtype_and_names_are_refused():
    spec = [TensorSpec(name="weight", shape=(3,), dtype="float32")]
    with pytest.raises(TensorError, match=r"expected shape \(3,\), got \(4,\)"):
        decode_tensors(encode_tensors({"weight": np.zeros(4, np.float32)}), spec)
    with pytest.raises(TensorError, match="expected dtype float32, got float64"):
        decode_tensors(encode_tensors({"weight": np.zeros(3, np.float64)}), spec)
    with pytest.raises(TensorError, match=r"missing \['weight'\], unexpected \['bias'\]"):
        decode_tensors(encode_tensors({"bias": np.zeros(3, np.float32)}), spec)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01",
        b"\xff" * 8 + b"{}",
        (10).to_bytes(8, "little") + b"not json!!",
        b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
    ],
)
def test_garbage_payloads_raise_tensor_error(payload):
    with pytest.raises(TensorError):
        decode_tensors(payload)


def test_truncated_payload_is_refused():
    blob = encode_tensors({"w": np.arange(10, dtype=np.float32)})
    with pytest.raises(TensorError, match="offsets"):
        decode_tensors(blob[:-4])


def test_canonical_json_is_order_independent_and_refuses_nan():
    assert canonical_json({"b": 1, "a": [1.5, "x"]}) == canonical_json({"a": [1.5, "x"], "b": 1})
    assert canonical_json({"a": 1}) == b'{"a":1}'
    with pytest.raises(ValueError, match="NaN"):
        canonical_json({"a": math.nan})

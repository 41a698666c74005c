"""Shape parsing and input checking, including property tests."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeq import EdgeqError
from edgeq.tensors import TensorSpec, match_inputs, parse_input_shapes, parse_shape

dims = st.lists(st.integers(1, 4096), min_size=1, max_size=6).map(tuple)
small_dims = st.lists(st.integers(1, 8), min_size=1, max_size=4).map(tuple)


@given(dims)
def test_parse_shape_round_trips(shape):
    assert parse_shape("x".join(map(str, shape))) == shape


@pytest.mark.parametrize("text", ["", "1x", "x3", "1x0x3", "1x-2", "a", "1.5x2"])
def test_parse_shape_rejects(text):
    with pytest.raises(EdgeqError, match="bad shape"):
        parse_shape(text)


def test_parse_input_shapes_allows_equals_in_names():
    assert parse_input_shapes(["in=put=1x2", "y=3"]) == {"in=put": (1, 2), "y": (3,)}
    with pytest.raises(EdgeqError, match="expected NAME=DIMS"):
        parse_input_shapes(["1x3x224x224"])


@given(small_dims, st.sampled_from(["float32", "float64", "int32", "int64"]))
def test_match_inputs_orders_and_casts_same_kind(shape, dtype):
    specs = [TensorSpec("a", shape, "float32"), TensorSpec("b", shape, "float32")]
    a, b = np.zeros(shape, dtype), np.ones(shape, dtype)
    out = match_inputs(specs, {"b": b, "a": a})
    assert [o.dtype for o in out] == [np.float32, np.float32]
    assert np.array_equal(out[0], a) and np.array_equal(out[1], b)

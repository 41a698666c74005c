"""fp32 equivalence with onnxruntime on a zoo of small generated models, through the full build."""

import numpy as np
import pytest
import zoo
from conftest import ort_outputs

import edgeq


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_matches_onnxruntime(name, tmp_path):
    model = zoo.ZOO[name]()
    inputs = zoo.random_inputs(model, seed=1)
    artifact = edgeq.build(model, "host", tmp_path / name)
    got = artifact.run(inputs)
    expected = ort_outputs(model, inputs)
    assert list(got) == [o.name for o in model.graph.output]
    for value, ref in zip(got.values(), expected):
        assert value.shape == ref.shape and value.dtype == ref.dtype
        np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_model_built_for_a_fixed_batch(tmp_path):
    model = zoo.dynamic_batch_model()
    artifact = edgeq.build(model, "host", tmp_path / "dyn", input_shapes={"x": (3, 3, 16, 16)})
    inputs = zoo.random_inputs(model, shapes={"x": [3, 3, 16, 16]})
    np.testing.assert_allclose(artifact.run(inputs)["out"], ort_outputs(model, inputs)[0], rtol=1e-4, atol=1e-5)

"""Malformed models get one clear error, never an internal one: seeded mutations of the zoo models (op types
swapped, inputs dropped, attributes and initializers corrupted, dtypes changed, nodes deleted or rewired)
either load / compile or are refused with an EdgeqError (exit code 2, no output directory left behind)."""

from __future__ import annotations

import contextlib
import copy
import io
import random

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, helper, numpy_helper

import edgeq
from edgeq.cli import main

from zoo import ZOO

OPS = ["Relu", "Conv", "Add", "Reshape", "Transpose", "Gather", "Concat", "Softmax", "MatMul", "Resize", "Slice",
       "Pad", "LSTM", "Split", "Squeeze", "Unsqueeze", "ReduceMean", "Cast", "Expand", "Tile", "Where", "TopK",
       "NoSuchOp"]


def _swap_op(g, node, rng):
    node.op_type = rng.choice(OPS)


def _drop_input(g, node, rng):
    if node.input:
        del node.input[rng.randrange(len(node.input))]


def _corrupt_attribute(g, node, rng):
    if not node.attribute:
        return
    a = rng.choice(list(node.attribute))
    if a.type == AttributeProto.INT:
        a.i = rng.choice([-5, 0, 1, 7, 10**9])
    elif a.type == AttributeProto.INTS and a.ints:
        a.ints[rng.randrange(len(a.ints))] = rng.choice([-3, 0, 100])
    elif a.type == AttributeProto.FLOAT:
        a.f = rng.choice([float("nan"), -1.0, 1e30])


def _corrupt_initializer(g, node, rng):
    if not g.initializer:
        return
    t = rng.choice(list(g.initializer))
    arr = numpy_helper.to_array(t)
    arr = arr.reshape(-1)[: max(1, arr.size // 2)] if rng.random() < 0.5 else arr.astype(
        rng.choice([np.int64, np.float16, np.int8]))
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _add_attribute(g, node, rng):
    node.attribute.append(helper.make_attribute(rng.choice(["axis", "mode", "foo", "group"]),
                                                rng.choice([1, -1, "bad", 3])))


def _rewire_output(g, node, rng):
    if node.output:
        node.output[0] = rng.choice([x for n in g.node for x in n.input] or ["dangling"])


def _change_input_dtype(g, node, rng):
    g.input[0].type.tensor_type.elem_type = rng.choice([2, 3, 6, 7, 10, 11, 16])


def _delete_node(g, node, rng):
    g.node.remove(node)


MUTATIONS = [_swap_op, _drop_input, _corrupt_attribute, _corrupt_initializer, _add_attribute, _rewire_output,
             _change_input_dtype, _delete_node]


def mutants(seed: int, count: int):
    """`count` models, each a zoo model with one mutation (a third of them two)."""
    rng = random.Random(seed)
    names = sorted(ZOO)
    for _ in range(count):
        model = ZOO[rng.choice(names)]()
        for _ in range(2 if rng.random() < 0.3 else 1):
            model = copy.deepcopy(model)
            rng.choice(MUTATIONS)(model.graph, rng.choice(list(model.graph.node)), rng)
            if not model.graph.node:
                break
        yield model


def test_malformed_models_load_or_are_refused_with_an_edgeq_error():
    outcomes = {"loaded": 0, "refused": 0}
    for model in mutants(seed=0, count=300):
        try:
            edgeq.load_onnx(model)
            outcomes["loaded"] += 1
        except edgeq.EdgeqError:
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 100 and outcomes["loaded"] >= 20  # the mutations reach both sides


@pytest.mark.slow
def test_malformed_models_compile_or_exit_2_with_nothing_written(tmp_path):
    codes = []
    for i, model in enumerate(mutants(seed=1, count=120)):
        path, out = tmp_path / f"m{i}.onnx", tmp_path / f"out{i}"
        onnx.save(model, path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["compile", str(path), "--target", "host", "-o", str(out)])
        codes.append(code)
        assert code in (0, 2), err.getvalue()[-500:]
        if code == 2:
            assert not out.exists() and err.getvalue().strip().splitlines()[-1].startswith("edgeq: error: ")
    assert codes.count(2) >= 40 and codes.count(0) >= 10

"""--quantize auto: per-layer precision chosen by measurement within an accuracy budget (edgeq.policy).

The search is checked three ways: its moves on synthetic problems with an additive score, where brute force gives
the optimum; the per-layer quantizer it drives (Policy.layer_bits), against the global modes it generalizes; and
end to end on the digits CNN, where every single-mode build is built and scored independently of the search, so
"meets the budget and is no worse than the best single mode" is measured, not taken from the search's report.
"""

import itertools
import json

import numpy as np
import onnx
import pytest
from tqdm import tqdm

import edgeq
from conftest import ort_outputs
from edgeq import layer_latency, policy
from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST
from edgeq.errors import EdgeqError
from edgeq.report import sqnr_db
from relay_passes.quantize import Policy, quantize_onnx

SHAPES = {"image": (1, 1, 8, 8)}


@pytest.fixture(scope="module")
def digits():
    return edgeq.load_onnx(DIGITS_MODEL, SHAPES)


@pytest.fixture(scope="module")
def test_set():
    with np.load(DIGITS_TEST) as data:
        return data["image"], data["label"]


@pytest.fixture(scope="module")
def calibration(digits):
    from edgeq.calibration import calibration_batches

    return list(calibration_batches(DIGITS_CALIB, digits.inputs))


def _runner(model, taps):
    from edgeq.calibration import tapped_runner

    return tapped_runner(model, taps)[1]


class _Additive(policy._Search):
    """A search whose score is 100 minus a per-layer loss table: the optimum is known by brute force."""

    def __init__(self, costs, losses, max_drop):
        self.metric = policy.Metric(reference=np.eye(3, dtype=np.float32))
        self.fp32_score, self.costs, self.max_drop, self.losses = 100.0, costs, max_drop, losses
        self.seen, self.evaluations, self.bar = {}, [], tqdm(disable=True)

    def measure(self, assignment):
        loss = sum(self.losses[node][p] for node, p in assignment.items())
        return 100.0 - loss, loss


def _random_problem(seed: int, count: int = 4):
    rng = np.random.default_rng(seed)
    layers, costs, losses = [], {}, {}
    for i in range(count):
        node, weights, base = f"L{i}", int(rng.integers(10, 1000)), rng.uniform(0, 3)
        costs[node] = {p: weights * bits[0] / 8 for p, bits in policy.PRECISIONS.items()}
        losses[node] = {"fp32": 0.0, "int8": 0.05 * base, "w4a4": base * rng.uniform(0.2, 1),
                        "w2a8": base * rng.uniform(0.3, 1.2), "w2a2": base * rng.uniform(0.8, 2)}
        layers.append(policy._undominated(policy.Layer(node, "Conv", weights, tuple(policy.PRECISIONS)),
                                          costs[node]))
    return layers, costs, losses, float(rng.uniform(0.5, 3))


def _optimum(layers, costs, losses, max_drop) -> float:
    combos = itertools.product(*(layer.precisions for layer in layers))
    return min(sum(costs[l.node][p] for l, p in zip(layers, c)) for c in combos
               if sum(losses[l.node][p] for l, p in zip(layers, c)) <= max_drop + 1e-9)


def test_greedy_search_finds_the_optimum_of_additive_problems_with_a_tenth_of_brute_forces_measurements():
    optimal, ratios, measured, brute = 0, [], 0, 0
    for seed in range(50):
        layers, costs, losses, max_drop = _random_problem(seed)
        state = _Additive(costs, losses, max_drop)
        got = policy._greedy(state, layers, {})
        assert sum(losses[n][p] for n, p in got.items()) <= max_drop + 1e-9, seed  # always within the budget
        ratios.append(state.objective(got) / _optimum(layers, costs, losses, max_drop))
        optimal += ratios[-1] < 1 + 1e-9
        measured += len(state.evaluations)
        brute += int(np.prod([len(layer.precisions) for layer in layers]))
    assert optimal >= 40 and max(ratios) < 1.3, (optimal, max(ratios))
    assert measured * 10 <= brute, (measured, brute)


def test_backtracking_swaps_reach_optima_that_single_lowerings_miss(monkeypatch):
    """Seed 23: greedy raises a layer that a later raise makes unneeded; lowering it needs another raised one
    step (a swap)."""
    layers, costs, losses, max_drop = _random_problem(23)
    with_swaps = _Additive(costs, losses, max_drop)
    found = with_swaps.objective(policy._greedy(with_swaps, layers, {}))
    assert found == pytest.approx(_optimum(layers, costs, losses, max_drop))
    cheaper = policy._cheaper_moves
    monkeypatch.setattr(policy, "_cheaper_moves", lambda level, *rest: [
        m for m in cheaper(level, *rest) if all(m[n] <= level[n] for n in m)])
    lowering_only = _Additive(costs, losses, max_drop)
    assert lowering_only.objective(policy._greedy(lowering_only, layers, {})) > found * 1.1


def test_undominated_precisions_drop_what_costs_as_much_with_fewer_bits():
    layer = policy.Layer("L", "Conv", 64, tuple(policy.PRECISIONS))
    sizes = {p: layer.weight_bytes(p) for p in policy.PRECISIONS}
    assert policy._undominated(layer, sizes).precisions == ("w2a8", "w4a4", "int8", "fp32")  # w2a2: w2a8's bytes
    latency = {"fp32": 1.0, "int8": 2.0, "w4a4": 0.5, "w2a8": 0.7, "w2a2": 0.3}
    assert policy._undominated(layer, latency).precisions == ("w2a2", "w4a4", "w2a8", "fp32")  # int8: fp32 is faster


def test_per_layer_bits_equal_the_global_mode_when_every_layer_gets_the_same(digits, calibration):
    """Policy.layer_bits is the global w2a2 / w4a4 mode, layer by layer: the same plan and the same QDQ model."""
    from relay_passes.quantize import annotate

    model = digits.onnx_model
    prepared = annotate.name_nodes(annotate.upgrade_opset(model))
    nodes = [g.node for g in annotate.plan(prepared, Policy()).groups if g.weight is not None]
    for bits in ((2, 2), (4, 4), (2, 8)):
        uniform = quantize_onnx(model, _runner, calibration, "minmax",
                                Policy(weight_bits=bits[0], activation_bits=bits[1], keep_8bit=()))
        per_layer = quantize_onnx(model, _runner, calibration, "minmax",
                                  Policy(keep_8bit=(), layer_bits={n: bits for n in nodes}))
        assert per_layer.model.SerializeToString() == uniform.model.SerializeToString(), bits
        assert [g.weight_bits for g in per_layer.plan.groups if g.weight] == [bits[0]] * len(nodes)


def test_layer_bits_set_one_layer_and_keep_the_rest(digits, calibration):
    one = quantize_onnx(digits.onnx_model, _runner, calibration, "minmax",
                        Policy(keep_8bit=(), layer_bits={"/4/Conv": (4, 4)}))
    bits = {g.node: g.weight_bits for g in one.plan.groups if g.weight}
    assert bits == {"/0/Conv": 8, "/4/Conv": 4, "/9/Gemm": 8}
    assert {b for b, _ in one.plan.low_bit.values()} == {4}  # the conv's input: 4-bit PACT codes


def test_known_ranges_are_reused_and_only_the_missing_ones_calibrated(digits, calibration):
    calls = []

    def counting(model, taps):
        calls.append(sorted(taps))
        return _runner(model, taps)

    known = {}
    int8 = quantize_onnx(digits.onnx_model, counting, calibration, "minmax", Policy(), known=known)
    again = quantize_onnx(digits.onnx_model, counting, calibration, "minmax", Policy(), known=known)
    assert len(calls) == 1 and again.model.SerializeToString() == int8.model.SerializeToString()
    fresh = quantize_onnx(digits.onnx_model, _runner, calibration, "minmax",
                          Policy(keep_8bit=(), layer_bits={"/4/Conv": (4, 4)}))
    mixed = quantize_onnx(digits.onnx_model, counting, calibration, "minmax",
                          Policy(keep_8bit=(), layer_bits={"/4/Conv": (4, 4)}), known=known)
    sources = sorted(name for name, (_, source) in mixed.plan.low_bit.items() if name == source)
    assert len(calls) == 2 and calls[1] == sources == ["/2/Relu_output_0"]  # only the new 4-bit PACT range
    assert mixed.model.SerializeToString() == fresh.model.SerializeToString()


def _accuracy(artifact, images, labels) -> float:
    logits = np.concatenate([artifact.run({"image": images[i:i + 1]})["logits"] for i in range(len(images))])
    return 100.0 * float(np.mean(logits.argmax(1) == labels))


@pytest.mark.slow
def test_auto_meets_the_budget_and_is_no_larger_than_any_single_mode_that_does(cli, test_set, tmp_path):
    """Built by the CLI; every single mode built here too and scored with its own kernels on the same data."""
    images, labels = test_set
    code, out, err = cli("compile", DIGITS_MODEL, "--input-shape", "image=1x1x8x8", "--quantize", "auto",
                         "--calib", DIGITS_CALIB, "--eval-data", DIGITS_TEST, "--labels", "label",
                         "--max-drop", "1", "-o", tmp_path / "auto")
    assert code == 0, err
    fp32 = 100.0 * float(np.mean(ort_outputs(onnx.load(DIGITS_MODEL), {"image": images})[0].argmax(1) == labels))
    auto = edgeq.Artifact.load(tmp_path / "auto")
    auto_accuracy = _accuracy(auto, images, labels)
    assert auto_accuracy >= fp32 - 1.0
    q = auto.manifest["quantization"]
    size = sum(q["weight_bytes"].values())
    assert q["policy"]["verified"]["score"] == pytest.approx(auto_accuracy)
    assert q["policy"]["verified"]["objective"] == size
    chosen = {entry["node"]: entry["precision"] for entry in q["policy"]["layers"]}
    held = {node: label for label, entry in q["weights_by_precision"].items() for node in entry.get("layers", [])
            if label != "int32 bias/requantize"}  # what the compiled module holds, layer by layer
    labels_of = {2: "2-bit packed", 4: "4-bit packed", 8: "int8", 32: None}
    assert {n: held.get(n) for n in chosen} == {n: labels_of[policy.PRECISIONS[p][0]] for n, p in chosen.items()}
    single = {}
    for mode in ("int8", "w4a4", "w2a8", "w2a2"):
        artifact = edgeq.build(DIGITS_MODEL, "host", tmp_path / mode, input_shapes=SHAPES, quantize=mode,
                               calibration=DIGITS_CALIB)
        single[mode] = (_accuracy(artifact, images, labels),
                        sum(artifact.manifest["quantization"]["weight_bytes"].values()))
    meeting = [bytes_ for accuracy, bytes_ in single.values() if accuracy >= fp32 - 1.0]
    assert meeting and size <= min(meeting), (size, single)
    code, out, _ = cli("inspect", tmp_path / "auto")
    assert code == 0 and "policy        size minimized" in out and "<- chosen" in out
    assert all(f"layer         {node}: {p}" in out for node, p in chosen.items())


@pytest.mark.slow
def test_sqnr_floor_without_labels_holds_on_the_chosen_model(digits, test_set):
    images, _ = test_set
    data = {"image": images[:120]}
    result = policy.search(digits, DIGITS_CALIB, data, min_sqnr=15.0, verify=False)
    reference = ort_outputs(onnx.load(DIGITS_MODEL), data)[0]
    got = np.concatenate([ort_outputs(result.quantized.qdq, {"image": images[i:i + 1]})[0] for i in range(120)])

    assert result.metric == "sqnr_db" and sqnr_db(reference, got) >= 15.0
    assert result.chosen.score == pytest.approx(sqnr_db(reference, got))
    assert any(p != "fp32" for p in result.assignment.values())  # fp32 everywhere would trivially pass


def test_an_unreachable_budget_is_a_clear_error(digits, test_set):
    images, labels = test_set
    with pytest.raises(EdgeqError, match="no assignment of w2a2 keeps the accuracy drop within 0"):
        policy.search(digits, DIGITS_CALIB, {"image": images[:60], "label": labels[:60]}, labels="label",
                      max_drop=0.0, precisions=("w2a2",), verify=False)
    with pytest.raises(EdgeqError, match="unknown objective 'speed'"):
        policy.search(digits, DIGITS_CALIB, {"image": images[:10]}, objective="speed")
    with pytest.raises(EdgeqError, match="unknown precision"):
        policy.search(digits, DIGITS_CALIB, {"image": images[:10]}, precisions=("w3a3",))


@pytest.mark.parametrize("args, message", [
    (["--quantize", "auto", "--calib", DIGITS_CALIB], "needs evaluation data (--eval-data)"),
    (["--quantize", "int8", "--calib", DIGITS_CALIB, "--labels", "label"], "--labels applies to --quantize auto"),
    (["--quantize", "auto", "--calib", DIGITS_CALIB, "--eval-data", DIGITS_TEST, "--exclude", "first"],
     "chooses every layer itself"),
])
def test_auto_flags_misused_exit_2_with_one_line(cli, tmp_path, args, message):
    code, out, err = cli("compile", DIGITS_MODEL, "--input-shape", "image=1x1x8x8", *args, "-o", tmp_path / "x")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


CHOSEN = {p: policy.PRECISIONS[p] for p in ("fp32", "int8", "w2a2")}


@pytest.mark.slow
def test_layer_latency_is_measured_once_then_read_from_the_cache(digits, tmp_path, monkeypatch):
    cache = tmp_path / "latency.json"
    layers = [layer for layer in policy.layers_of(digits.onnx_model, tuple(policy.PRECISIONS))
              if layer.node == "/4/Conv"]
    first = layer_latency.measure(digits, layers, CHOSEN, cache=cache)
    assert set(first["/4/Conv"]) == {"fp32", "int8", "w2a2"}
    assert all(np.isfinite(v) and v >= 0 for v in first["/4/Conv"].values())
    assert len(json.loads(cache.read_text())) == 5  # three precisions and the prefix alone at fp32 and int8

    def no_build(*_):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(layer_latency, "_time", no_build)
    assert layer_latency.measure(digits, layers, CHOSEN, cache=cache) == first


def test_a_layer_model_is_the_layer_behind_a_relu_prefix(digits):
    """The one-layer model computes what the layer computes in the full model, on a ReLU'd input."""
    from relay_passes.quantize import annotate, prepare

    model = onnx.shape_inference.infer_shapes(annotate.name_nodes(annotate.upgrade_opset(
        prepare.fold_batch_norm(digits.onnx_model))))
    sub = layer_latency.layer_model(model, "/4/Conv")
    onnx.checker.check_model(sub, full_check=True)
    assert [n.op_type for n in sub.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    x = np.random.default_rng(0).standard_normal([d.dim_value for d in sub.graph.input[0].type.tensor_type.shape.dim])
    prefix_out = np.maximum(x, 0).astype(np.float32)  # the 1x1 depthwise conv has unit weights: ReLU(x)
    only_layer = onnx.helper.make_model(onnx.helper.make_graph(
        list(sub.graph.node[2:]), "layer", [onnx.helper.make_tensor_value_info(
            "prefix.relu", onnx.TensorProto.FLOAT, list(x.shape))], list(sub.graph.output),
        [t for t in sub.graph.initializer if t.name != "prefix.w"]), opset_imports=list(sub.opset_import))
    np.testing.assert_allclose(ort_outputs(sub, {"x": x.astype(np.float32)})[0],
                               ort_outputs(only_layer, {"prefix.relu": prefix_out})[0], rtol=1e-5, atol=1e-5)

"""From an imported model to an in-memory executable: graph passes (QDQ realized into integer kernels), then
lowering and code generation for a preset. edgeq.build writes the artifact around it; calibration and
edgeq eval build their tapped host models with it."""

from __future__ import annotations

import onnx

import targets

from .frontend import ImportedModel, load_onnx


def realize_onnx(model: onnx.ModelProto, dtype: str, target=None):
    """A Relax module computing a QDQ (or QLinear*) ONNX model with integer kernels, `dtype` activations.

    ``target`` (a tvm Target) picks the low-bit kernels: bit-serial where it has popcount, int8 otherwise;
    None assumes popcount."""
    from tvm import relax

    from relay_passes.quantize import qlinear, realize
    from relay_passes.quantize.weights import extract_weights

    float_weights, weights = extract_weights(qlinear.to_qdq(model))
    mod = relax.transform.FoldConstant()(load_onnx(float_weights).mod)
    return realize.realize(mod, weights, dtype, target)


def graph_module(model: ImportedModel, preset: targets.Preset, qdq: onnx.ModelProto | None = None):
    """The Relax module after graph passes. A QDQ model (given, or the imported model itself when it is
    pre-quantized) is realized into integer kernels."""
    from relay_passes import pipeline
    from relay_passes.quantize import is_quantized

    if qdq is None and is_quantized(model.onnx_model):
        qdq = model.onnx_model
    target = targets.tvm_target(preset)
    return pipeline.optimize(model.mod if qdq is None else realize_onnx(qdq, preset.activation_dtype, target))


def codegen(mod, preset: targets.Preset, tuning_dbs=(), applied: list | None = None):
    """Lowering and code generation: kernels with a record in one of `tuning_dbs` (directories) that beats the
    default schedule get the tuned schedule (their names are appended to `applied`)."""
    import tvm
    from schedules.lowering import lowering_pipeline

    target = targets.tvm_target(preset)
    with target:  # TVM's CUDA codegen callbacks read the architecture from the current target
        return tvm.compile(mod, target, relax_pipeline=lowering_pipeline(target, tuning_dbs, applied))


def compile_module(model: ImportedModel, preset: targets.Preset, qdq: onnx.ModelProto | None = None):
    """Graph passes, lowering and code generation with default schedules: the in-memory executable."""
    return codegen(graph_module(model, preset, qdq), preset)


class HostBuild:
    """A model compiled for this machine in memory, as edgeq.build compiles it (edgeq's shipped tuning records
    applied), without writing an artifact: run a batch, time it, and the weight bytes its kernels hold — what
    the policy search compares candidates by."""

    def __init__(self, model: ImportedModel, qdq: onnx.ModelProto | None = None):
        import tvm
        from tvm import relax

        from relay_passes.quantize import storage
        from schedules.database import databases_for

        preset = targets.resolve("host")
        mod = graph_module(model, preset, qdq)
        self.weight_bytes = sum(p["bytes"] for p in storage.weights_by_precision(mod).values())
        self.vm = relax.VirtualMachine(codegen(mod, preset, databases_for(preset, None, True)), tvm.cpu())
        self.outputs = model.outputs

    def run(self, batch: list) -> dict:
        """{output name: array} of one batch (arrays in input order)."""
        import tvm

        from .artifact import outputs_by_name

        return outputs_by_name(self.outputs, self.vm["main"](*[tvm.runtime.tensor(a) for a in batch]))

    def latency_ms(self, batch: list, repeat: int = 10, threads: int | None = None) -> float:
        """Mean latency of one batch in ms (each repeat >= 20 ms of runs, after a warm-up)."""
        import tvm

        from .artifact import time_vm

        return time_vm(self.vm, tvm.cpu(), [tvm.runtime.tensor(a) for a in batch], repeat, 20, threads)["mean_ms"]

"""Calibration data as the quantizer reads it, and the fp32 model run with its observed tensors as outputs.

The data: an .npz (keys = input names, samples stacked on axis 0), a directory of .npy/.npz batches, or an
iterable of input dicts or arrays; every array is checked against the model's inputs before any work is done.
The run: the model compiled once by edgeq for this machine, with the tensors to observe appended to its outputs
(``tapped_runner``; edgeq eval's per-layer report reads its taps the same way).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import onnx

from .errors import EdgeqError
from .tensors import TensorSpec, load_arrays


def calibration_batches(source, specs: list[TensorSpec]) -> Iterator[list[np.ndarray]]:
    """Input lists of the model's exact shapes from an .npz, a directory of .npy/.npz files, or an iterable.

    Arrays may hold many samples: they are split along axis 0 into batches of the model's batch size.
    Every array is checked against the model's input (name, per-sample shape, dtype) before any work is done.
    """
    chunks = list(_sources(source, specs))
    if not chunks:
        raise EdgeqError("the calibration set is empty: give at least one sample per input")
    batches = [_split(chunk, specs) for chunk in chunks]
    count = sum(len(b) for b in batches)
    if count == 0:
        raise EdgeqError("the calibration set is empty: give at least one sample per input")
    for batch in batches:
        yield from batch


def _sources(source, specs) -> Iterator[dict[str, np.ndarray]]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith((".npy", ".npz")))
            if not files:
                raise EdgeqError(f"calibration directory {path} holds no .npy or .npz files")
            for f in files:
                yield _by_name(load_arrays(os.path.join(path, f)), specs, os.path.join(path, f), single_file=True)
        elif os.path.isfile(path):
            yield _by_name(load_arrays(path), specs, path)
        else:
            raise EdgeqError(f"calibration data {path} does not exist")
        return
    if isinstance(source, (dict, np.ndarray)):
        source = [source]
    if not isinstance(source, Iterable):
        raise EdgeqError("calibration data must be an .npz file, a directory of .npy/.npz files, or an iterable "
                         "of input dicts or arrays")
    for item in source:
        if isinstance(item, dict):
            yield _by_name(item, specs, "calibration batch")
        else:
            items = [item] if isinstance(item, np.ndarray) else list(item)
            if len(items) != len(specs):
                raise EdgeqError(f"a calibration batch has {len(items)} array(s), the model takes {len(specs)} "
                                 f"input(s): {', '.join(map(str, specs))}")
            yield dict(zip((s.name for s in specs), items))


def _by_name(arrays: dict, specs, where: str, single_file: bool = False) -> dict[str, np.ndarray]:
    if single_file and len(specs) == 1 and len(arrays) == 1:
        return {specs[0].name: next(iter(arrays.values()))}  # one .npy per batch, named anything
    missing = [s for s in specs if s.name not in arrays]
    if missing:
        raise EdgeqError(f"{where} has no array for input(s) {', '.join(map(str, missing))}; "
                         f"it holds {', '.join(sorted(arrays)) or 'nothing'}")
    return {s.name: arrays[s.name] for s in specs}


def _split(chunk: dict[str, np.ndarray], specs) -> list[list[np.ndarray]]:
    """Batches of the model's batch size (axis 0); leftover samples that don't fill a batch are dropped."""
    counts = set()
    for spec in specs:
        a = np.asarray(chunk[spec.name])
        sample = tuple(spec.shape[1:])
        if a.ndim == len(spec.shape) and tuple(a.shape[1:]) == sample:
            counts.add(a.shape[0])
        else:
            raise EdgeqError(f"calibration input {spec.name!r} has shape {list(a.shape)}; the model expects "
                             f"{list(spec.shape)} (any number of samples of shape {list(sample)} stacked on axis 0)")
        if not np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
            raise EdgeqError(f"calibration input {spec.name!r} has dtype {a.dtype}, the model expects {spec.dtype}")
    if len(counts) != 1:
        raise EdgeqError(f"calibration inputs have different sample counts: {sorted(counts)}")
    total = counts.pop()
    batch = specs[0].shape[0] if specs[0].shape else 1
    if 0 < total < batch:
        raise EdgeqError(f"the calibration set has {total} sample(s), fewer than the model's batch size {batch}; "
                         "give more samples or compile with a smaller batch (--input-shape)")
    return [[np.ascontiguousarray(np.asarray(chunk[s.name])[i:i + batch], dtype=s.dtype) for s in specs]
            for i in range(0, total - batch + 1, batch)]


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """The model with the given intermediate tensors appended to its outputs (types from shape inference)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {v.name: v for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name in present:
            continue
        if name not in known:
            raise EdgeqError(f"tensor {name!r} has no inferred type; cannot observe it")
        model.graph.output.add().CopyFrom(known[name])  # symbolic dims stay symbolic (0 would contradict them)
    return model


def tapped_runner(model: onnx.ModelProto, taps: list[str], qdq: bool = False):
    """(output names, batch -> {name: array}) of ``model`` built for this machine with ``taps`` as extra
    outputs; ``model`` is shape-inferred and already folded (the taps name its tensors). ``qdq``: compile its
    quantized ops to integer kernels."""
    import tvm
    from tvm import relax

    import targets

    from .compiler import compile_module
    from .frontend import load_onnx

    tapped = with_outputs(model, taps)
    imported = load_onnx(tapped, fold=False)
    vm = relax.VirtualMachine(compile_module(imported, targets.resolve("host"), tapped if qdq else None), tvm.cpu())
    names = [spec.name for spec in imported.outputs]

    def run(batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        result = vm["main"](*[tvm.runtime.tensor(a) for a in batch])
        return {name: r.numpy() for name, r in zip(names, list(result) if len(names) > 1 else [result])}

    return names, run

"""Calibrate: run the fp32 model on calibration batches and collect a bounded-memory statistic per tensor.

The model is compiled once by edgeq itself for the host, with every tensor to observe added as a graph output,
and run batch by batch; only the observers' histograms are kept, never the activations.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import onnx

from edgeq.errors import EdgeqError
from edgeq.tensors import TensorSpec, load_arrays

from .observers import make_observer


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


def calibrate(model: onnx.ModelProto, tensors: list[str], data, method: str = "minmax",
              activation_dtype: str = "uint8", progress: bool = False, low_bit: dict[str, int] | None = None,
              **options) -> dict[str, tuple[float, float]]:
    """{tensor: (lo, hi)}: the real range each tensor is quantized to, by the named calibration method.

    Tensors in ``low_bit`` (name -> bits) are PACT activations: their range is (0, alpha) with the alpha that
    minimizes clipping + quantization error at that bit width (observer "pact"), whatever the method.
    """
    import targets
    import tvm
    from tvm import relax
    from tqdm import tqdm

    from edgeq.build import compile_module
    from edgeq.errors import raise_if_interrupted
    from edgeq.frontend import load_onnx

    imported = load_onnx(with_outputs(model, tensors), fold=False)  # folded when first loaded
    batches = list(calibration_batches(data, imported.inputs))
    low_bit = low_bit or {}
    bins = {"bins": options["bins"]} if "bins" in options else {}
    observers = {name: make_observer("pact", bits=low_bit[name], **bins) if name in low_bit
                 else make_observer(method, **options) for name in tensors}
    position = {spec.name: i for i, spec in enumerate(imported.outputs)}
    vm = relax.VirtualMachine(compile_module(imported, targets.resolve("host")), tvm.cpu())
    for batch in tqdm(batches, desc=f"calibrate ({method})", unit="batch", disable=None if progress else True,
                      leave=False):
        raise_if_interrupted()
        results = vm["main"](*[tvm.runtime.tensor(a) for a in batch])
        results = list(results) if len(imported.outputs) > 1 else [results]
        for name, observer in observers.items():
            observer.update(results[position[name]].numpy())
    return {name: observer.range(activation_dtype) for name, observer in observers.items()}

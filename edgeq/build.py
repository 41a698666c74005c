"""Compile an imported model for a preset and write a verified artifact directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


import targets

from .compiler import codegen, graph_module
from .artifact import FORMAT, FORMAT_VERSION, QUANTIZED_MODEL, SOURCE_MODEL, Artifact, atomic_directory, write_manifest
from .errors import EdgeqError, interruptible, one_line, raise_if_interrupted
from .frontend import ImportedModel, load_onnx
from .version import __version__


def _quantization_summary(model: ImportedModel, quantized, mod) -> dict:
    """How the model was quantized, and the weight bytes the compiled module `mod` holds by precision (with the
    fp32 bytes of the same parameters: "2-bit packed" bytes / their fp32 bytes is the low-bit layers' ratio)."""
    from relay_passes.quantize import is_quantized, storage

    precisions = storage.weights_by_precision(mod)
    weights = {"weight_bytes": {label: p["bytes"] for label, p in precisions.items()},
               "weights_by_precision": precisions}
    if quantized is not None:
        return {**quantized.summary(), **weights}
    if is_quantized(model.onnx_model):
        return {"mode": "int8", "source": "pre-quantized (QDQ/QLinear ONNX)", **weights}
    return {"mode": "fp32", **weights}


def _export(executable, stage: Path, preset: targets.Preset) -> dict:
    """Link model.so with the preset's (cross) compiler, or ship model.tar of objects when there is none."""
    from tvm.support import cc

    compiler = targets.find_compiler(preset)
    if compiler is None:
        executable.export_library(str(stage / "model.tar"))
        return {"file": "model.tar", "kind": "objects", "linker": None,
                "note": f"no linker for {preset.name} on the build machine ({preset.package}); "
                        "link the objects into a shared library on the device or install the toolchain"}
    try:
        executable.export_library(str(stage / "model.so"), fcompile=cc.cross_compiler(compiler))
    except RuntimeError as e:
        raise EdgeqError(f"linking model.so with {compiler} failed: {one_line(e)}") from None
    return {"file": "model.so", "kind": "shared", "linker": os.path.basename(compiler)}


def _cuda_summary(executable, target) -> dict | None:
    """For GPU builds: how the kernels ship, and whether nvcc accepts them for the preset's architecture.

    TVM 0.27 embeds the CUDA C source in model.so and compiles it when the library is loaded (NVRTC, or nvcc
    with TVM_CUDA_COMPILE_MODE=nvcc); compiling it here with nvcc catches code the device could not build.
    """
    import shutil

    sources = [m.inspect_source("") for m in _modules(executable.mod) if m.kind == "cuda"]
    if not sources:
        return None
    arch = str(target.attrs["arch"])
    summary = {"arch": arch, "kernels": "CUDA C source, compiled on the device at load time (NVRTC or nvcc)",
               "source_bytes": sum(map(len, sources)), "nvcc_check": "skipped: nvcc not found"}
    if shutil.which("nvcc"):
        from tvm.support import nvcc

        try:
            with target:
                binary = b"".join(bytes(nvcc.compile_cuda(src, target_format="fatbin", arch=arch, compiler="nvcc"))
                                  for src in sources)
        except RuntimeError as e:
            raise EdgeqError(f"nvcc rejected the generated CUDA code for {arch}: {one_line(e)}") from None
        summary["nvcc_check"] = f"ok: {len(binary)} bytes of {arch} fatbin"
    return summary


def _modules(module):
    yield module
    for child in module.imports:
        yield from _modules(child)


def _auto(model, calibration, method: str, exclude, per_channel: bool, progress: bool, options: dict):
    """quantize="auto": the per-layer precision policy (edgeq.policy.search) over ``options``' eval_data, labels,
    max_drop, objective, min_sqnr."""
    from .policy import search

    allowed = {"eval_data", "labels", "max_drop", "objective", "min_sqnr"}
    if options.get("eval_data") is None:
        raise EdgeqError("--quantize auto needs evaluation data (--eval-data) to measure each policy on")
    if exclude or set(options) - allowed:
        raise EdgeqError("--quantize auto chooses every layer itself: drop --exclude/--fpsc/calibration options")
    return search(model, calibration, method=method, per_channel=per_channel, progress=progress, **options).quantized


def build(model, target: str | dict = "host", out_dir: str | os.PathLike | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None, progress: bool = False,
          quantize: str | None = None, calibration=None, calib_method: str = "minmax",
          exclude: tuple[str, ...] = (), per_channel: bool = True, tuning_db: str | os.PathLike | None = None,
          shipped_tuning: bool = True, substitute: dict | bool | None = None, **calib_options) -> Artifact:
    """Compile an ONNX model (path, ModelProto, ImportedModel or edgeq.QuantizedModel) into an artifact dir.

    quantize="int8" calibrates on `calibration` first (see edgeq.quantize for the options; "auto": see
    edgeq.policy.search, with eval_data, labels, max_drop, objective, min_sqnr); a model that is already
    quantized (QDQ / QLinear ops) is compiled to integer kernels as it is.
    Without out_dir the artifact goes to a fresh temporary directory. tuning_db: an `edgeq tune` work dir whose
    records for this target are applied (with edgeq's shipped records unless shipped_tuning=False).
    substitute: True or the options of relay_passes.substitution.substitute (alpha, budget, cost).
    """
    import tvm

    from schedules.database import databases_for, untimed_workloads

    from .quantize import AUTO, MODES, QuantizedModel
    from .quantize import quantize as quantize_model

    if quantize is not None and quantize not in MODES:
        raise EdgeqError(f"unknown quantization {quantize!r}; supported: {', '.join(MODES)}")
    if quantize is not None and calibration is None:
        raise EdgeqError(f"--quantize {quantize} needs calibration data (--calib)")
    with interruptible(), _stages(progress, 5 if quantize else 4) as step:
        step("import")
        quantized = model if isinstance(model, QuantizedModel) else None
        if quantized is not None:
            model = quantized.source
        elif not isinstance(model, ImportedModel):
            model = load_onnx(model, input_shapes)
        preset = targets.resolve(target)
        tuning_dbs = databases_for(preset, tuning_db, shipped_tuning) if not preset.is_gpu else []
        if quantize == AUTO and quantized is None:
            step("calibrate")
            quantized = _auto(model, calibration, calib_method, exclude, per_channel, progress, calib_options)
        elif quantize is not None and quantized is None:
            step("calibrate")
            quantized = quantize_model(model, calibration, calib_method, exclude, per_channel,
                                       progress=progress, mode=quantize, **calib_options)
        step("compile")
        qdq = quantized.qdq if quantized is not None else None
        mod, substituted = graph_module(model, preset, qdq), None
        if substitute:
            from relay_passes.substitution import substitute as substitute_graph

            mod, substituted = substitute_graph(mod, preset, **({} if substitute is True else substitute))
        tuned_kernels: list[str] = []
        executable = codegen(mod, preset, tuning_dbs, tuned_kernels)
        out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="edgeq-")) / model.name
        with atomic_directory(out_dir) as stage:
            step("link")
            library = _export(executable, stage, preset)
            cuda = _cuda_summary(executable, targets.tvm_target(preset)) if preset.is_gpu else None
            (stage / SOURCE_MODEL).write_bytes(model.source)
            if qdq is not None:
                (stage / QUANTIZED_MODEL).write_bytes(qdq.SerializeToString())
            write_manifest(stage, {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "edgeq_version": __version__,
                "tvm_version": tvm.__version__,
                "model": {"name": model.name, "sha256": model.sha256, "opset": model.opset},
                "preset": preset.name,
                "target": preset.target,
                "host_target": preset.host,
                "arch": preset.arch,
                "features": list(preset.features),
                "library": library,
                "inputs": [s.to_dict() for s in model.inputs],
                "outputs": [s.to_dict() for s in model.outputs],
                "quantization": _quantization_summary(model, quantized, mod),
                "tuning": {"databases": [str(d) for d in tuning_dbs], "tuned_kernels": tuned_kernels,
                           "untimed_kernels": [k for d in tuning_dbs for k in untimed_workloads(d)]},
                **({"substitution": substituted.summary()} if substituted is not None else {}),
                **({"cuda": cuda} if cuda else {}),
            })
        step("verify")
        return Artifact.load(out_dir)


@contextlib.contextmanager
def _stages(progress: bool, total: int):
    """A stage counter on stderr (terminals only); cleared on exit so errors print on a clean line."""
    from tqdm import tqdm

    with tqdm(total=total, disable=None if progress else True, leave=False, unit="stage",
              bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}]") as bar:

        def step(name: str):
            raise_if_interrupted()
            bar.set_description_str(name)
            bar.update()

        yield step

"""Compile an imported model for a preset and write a verified artifact directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx

import targets

from . import __version__
from .artifact import FORMAT, FORMAT_VERSION, SOURCE_MODEL, Artifact, atomic_directory, write_manifest
from .errors import EdgeqError, interruptible, one_line, raise_if_interrupted
from .frontend import ImportedModel, load_onnx


def _weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the model's constant weights, by dtype (what quantization shrinks)."""
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        sizes[arr.dtype.name] = sizes.get(arr.dtype.name, 0) + arr.nbytes
    return sizes


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


def compile_module(model: ImportedModel, preset: targets.Preset):
    """Graph passes, lowering and code generation: the in-memory executable."""
    import tvm
    from relay_passes import pipeline
    from schedules.lowering import lowering_pipeline

    target = targets.tvm_target(preset)
    mod = pipeline.optimize(model.mod)
    with target:  # TVM's CUDA codegen callbacks read the architecture from the current target
        return tvm.compile(mod, target, relax_pipeline=lowering_pipeline(target))


def build(model, target: str | dict = "host", out_dir: str | os.PathLike | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None, progress: bool = False) -> Artifact:
    """Compile an ONNX model (path, ModelProto or ImportedModel) for a target preset into an artifact dir.

    Without out_dir the artifact goes to a fresh temporary directory.
    """
    import tvm

    with interruptible(), _stages(progress) as step:
        step("import")
        if not isinstance(model, ImportedModel):
            model = load_onnx(model, input_shapes)
        preset = targets.resolve(target)
        step("compile")
        executable = compile_module(model, preset)
        out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="edgeq-")) / model.name
        with atomic_directory(out_dir) as stage:
            step("link")
            library = _export(executable, stage, preset)
            cuda = _cuda_summary(executable, targets.tvm_target(preset)) if preset.is_gpu else None
            (stage / SOURCE_MODEL).write_bytes(model.source)
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
                "quantization": {"mode": "fp32", "weight_bytes": _weight_bytes(model.onnx_model)},
                **({"cuda": cuda} if cuda else {}),
            })
        step("verify")
        return Artifact.load(out_dir)


@contextlib.contextmanager
def _stages(progress: bool):
    """A stage counter on stderr (terminals only); cleared on exit so errors print on a clean line."""
    from tqdm import tqdm

    with tqdm(total=4, disable=None if progress else True, leave=False, unit="stage",
              bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}]") as bar:

        def step(name: str):
            raise_if_interrupted()
            bar.set_description_str(name)
            bar.update()

        yield step

"""The deployable artifact: a directory with the compiled library and a manifest that proves what it is.

manifest.json records versions, target, I/O signature, quantization summary and the sha256 of every file;
`Artifact.load` refuses anything that does not match it. Directories are written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from targets.atomic import atomic_path, write_atomic

from .errors import EdgeqError, one_line
from .tensors import TensorSpec, match_inputs, random_inputs

FORMAT = "edgeq-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCE_MODEL = "source.onnx"  # the model as given, for host reference builds (deploy, eval)
QUANTIZED_MODEL = "quantized.onnx"  # int8 artifacts: the QDQ model the integer kernels were realized from


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike):
    """Yield a staging directory that replaces out_dir only if the block completes.

    An exception or Ctrl-C inside the block leaves out_dir as it was (absent, or the previous artifact).
    """
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise EdgeqError(f"{out} exists and is not an edgeq artifact; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Add the checksum of every file in directory and write manifest.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}}
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


class Artifact:
    """A verified artifact directory; `run` and `benchmark` execute it on this machine."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._vm = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Artifact":
        """Open an artifact, refusing a missing, corrupt, tampered or incompatible one."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EdgeqError(f"{path} is not an edgeq artifact (no {MANIFEST})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdgeqError(f"{path / MANIFEST} is unreadable or corrupt: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise EdgeqError(f"{path / MANIFEST} is not an edgeq manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise EdgeqError(f"{path} has artifact format version {manifest.get('format_version')}, this edgeq "
                             f"reads version {FORMAT_VERSION}; rebuild it with this edgeq")
        for name, digest in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise EdgeqError(f"{path} is incomplete: {name} is missing")
            if sha256_file(file) != digest:
                raise EdgeqError(f"{path} is corrupt: checksum mismatch for {name}")
        if manifest["library"]["file"] not in manifest.get("files", {}):
            raise EdgeqError(f"{path / MANIFEST} lists no checksum for its library")
        return cls(path, manifest)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(d) for d in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(d) for d in self.manifest["outputs"]]

    @property
    def library(self) -> Path:
        return self.path / self.manifest["library"]["file"]

    def size_bytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.manifest["files"])

    def _device(self):
        import tvm

        from targets.detect import host_arch

        m = self.manifest
        if m["library"]["kind"] != "shared":
            raise EdgeqError(f"{self.path} holds object files ({m['library']['file']}), not a loadable library: "
                             f"link it on the device ({m['library'].get('note', '')})")
        if m["arch"] != host_arch():
            raise EdgeqError(f"{self.path} was built for {m['arch']} ({m['preset']}), this machine is {host_arch()}; "
                             f"run it on the device (edgeq deploy)")
        if m["target"]["kind"] == "cuda":
            if not tvm.cuda(0).exist:
                raise EdgeqError(f"{self.path} needs a CUDA GPU and this machine has none")
            return tvm.cuda(0)
        return tvm.cpu(0)

    def _load_vm(self):
        if self._vm is None:
            import tvm
            from tvm import relax

            dev = self._device()
            try:
                lib = tvm.runtime.load_module(str(self.library))
            except Exception as e:  # an unloadable .so: wrong libc, missing symbols
                raise EdgeqError(f"cannot load {self.library}: {one_line(e)}") from None
            self._vm = (relax.VirtualMachine(lib, dev), dev)
        return self._vm

    def _tensors(self, feeds):
        import tvm

        vm, dev = self._load_vm()
        arrays = match_inputs(self.inputs, feeds if feeds is not None else random_inputs(self.inputs))
        return vm, dev, [tvm.runtime.tensor(a, dev) for a in arrays]

    def run(self, inputs) -> dict[str, np.ndarray]:
        """Execute once; inputs by name (dict), in order (list) or a single array. Returns outputs by name."""
        vm, _, tensors = self._tensors(inputs)
        return outputs_by_name(self.outputs, vm["main"](*tensors))

    def benchmark(self, inputs=None, repeat: int = 20, min_repeat_ms: int = 20, threads: int | None = None) -> dict:
        """Latency statistics in ms over `repeat` measurements (each averaged over >= min_repeat_ms of runs)."""
        vm, dev, tensors = self._tensors(inputs)
        return time_vm(vm, dev, tensors, repeat, min_repeat_ms, threads)


def time_vm(vm, dev, tensors: list, repeat: int = 20, min_repeat_ms: int = 20, threads: int | None = None) -> dict:
    """Latency statistics in ms of a Relax VM's main on ``tensors`` (after a warm-up run)."""
    with thread_count(threads):
        vm.set_input("main", *tensors)
        vm.invoke_stateful("main")  # warm-up: page in weights, spin up the thread pool
        timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        stats = latency_stats(timer("main").results)
    return {**stats, "threads": threads or default_threads()}


def outputs_by_name(specs: list[TensorSpec], result) -> dict[str, np.ndarray]:
    """The VM returns one tensor or a tuple; name them as the manifest does."""
    values = [result] if len(specs) == 1 else list(result)
    return {spec.name: v.numpy() for spec, v in zip(specs, values)}


def latency_stats(seconds) -> dict:
    """Summary in ms of time_evaluator results (one entry per repeat)."""
    ms = np.array(seconds) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)), "std_ms": float(ms.std()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "repeat": len(ms)}


def default_threads() -> int:
    """The TVM thread pool's size outside `thread_count` (edgeq sets TVM_NUM_THREADS unless the user did)."""
    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


@contextlib.contextmanager
def thread_count(threads: int | None):
    """Run the TVM thread pool with `threads` workers inside the block (None: leave it as it is)."""
    if threads is None:
        yield
        return
    import tvm

    config = tvm.get_global_func("runtime.config_threadpool")
    config(1, int(threads))
    try:
        yield
    finally:
        config(1, default_threads())


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no ".npz" to its name
        np.savez(f, **arrays)

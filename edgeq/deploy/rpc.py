"""Run an artifact on a device over TVM RPC: verify, check the architecture, upload, run, compare, time.

The connection itself (addresses, server or tracker, timeouts) is targets.rpc, which tuning on a device uses too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from targets.rpc import Device, remote_arch, with_timeout

from ..artifact import QUANTIZED_MODEL, SOURCE_MODEL, Artifact, latency_stats, outputs_by_name
from ..errors import EdgeqError
from ..tensors import match_inputs, random_inputs

# Output agreement between device and host build, per artifact precision: (rtol, atol relative to max |ref|)
# (rtol, atol as a fraction of the output's largest magnitude).  int8: the device and the host run the same
# integer arithmetic, so outputs agree to the last bit in practice; 1/254 of the range allows one 8-bit step.
# Integer builds: the board and the host run the same integer kernels, so outputs agree to 1 LSB of the 8-bit
# output (the last layer stays 8-bit in the low-bit modes too).
TOLERANCE = {"fp32": (1e-4, 1e-5), **{mode: (0.0, 1.001 / 254) for mode in ("int8", "w2a2", "w2a8", "w4a4")}}


@dataclass
class DeployReport:
    device: str
    arch: str
    outputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    max_error: dict[str, float]
    match: bool
    latency_ms: dict = field(default_factory=dict)
    upload_s: float = 0.0


def host_reference(artifact: Artifact, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The same model built for this machine and run on the same inputs (int8: the same quantized model)."""
    import tempfile
    from pathlib import Path

    from .. import build

    shapes = {s.name: s.shape for s in artifact.inputs}
    source = artifact.path / QUANTIZED_MODEL
    source = source if source.exists() else artifact.path / SOURCE_MODEL
    with tempfile.TemporaryDirectory(prefix="edgeq-ref-") as tmp:
        reference = build(source, "host", Path(tmp) / "host", input_shapes=shapes)
        return reference.run(inputs)


def _run_remote(session, artifact: Artifact, arrays: list[np.ndarray], repeat: int):
    import tvm
    from tvm import relax

    start = time.perf_counter()
    session.upload(str(artifact.library))
    upload_s = time.perf_counter() - start
    dev = session.cpu() if artifact.manifest["target"]["kind"] == "llvm" else session.cuda()
    vm = relax.VirtualMachine(session.load_module(artifact.library.name), dev)
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    outputs = outputs_by_name(artifact.outputs, vm["main"](*tensors))
    vm.set_input("main", *tensors)
    timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat, min_repeat_ms=10)
    return outputs, latency_stats(timer("main").results), upload_s


def deploy(artifact_dir, device: Device, inputs=None, repeat: int = 10, compare: bool = True) -> DeployReport:
    """Verify an artifact, run it on the device, compare with a host build and time it."""
    artifact = Artifact.load(artifact_dir)
    if artifact.manifest["library"]["kind"] != "shared":
        raise EdgeqError(f"{artifact.path} holds object files, not a loadable library: "
                         f"{artifact.manifest['library'].get('note', '')}")
    arrays = match_inputs(artifact.inputs, inputs if inputs is not None else random_inputs(artifact.inputs))
    session = device.connect()
    arch = with_timeout(device.timeout, f"querying {device.name}", remote_arch, session)
    if arch != artifact.manifest["arch"]:
        raise EdgeqError(f"architecture mismatch: {artifact.path} is built for {artifact.manifest['arch']} "
                         f"({artifact.manifest['preset']}), the device at {device.name} is {arch}; nothing uploaded")
    for attempt in (1, 2):
        try:
            outputs, latency, upload_s = with_timeout(device.timeout, f"running on {device.name}", _run_remote,
                                                      session, artifact, arrays, repeat)
            break
        except EdgeqError:
            raise
        except (RuntimeError, OSError):
            if attempt == 2:
                features = [f for f in artifact.manifest["features"] if f not in ("neon", "avx2", "fma")]
                hint = (f"; if its CPU lacks {'+'.join(features)} (preset {artifact.manifest['preset']}), the "
                        "code dies on an illegal instruction: pick the preset that matches the board") if features else ""
                raise EdgeqError(f"device {device.name} dropped the session while running, twice (retried once)"
                                 f"{hint}") from None
            session = device.connect()
    reference = host_reference(artifact, arrays) if compare else {}
    errors, match = {}, bool(reference)
    rtol, atol = TOLERANCE[artifact.manifest["quantization"]["mode"]]
    for name, ref in reference.items():
        scale = float(np.abs(ref).max()) or 1.0
        errors[name] = float(np.abs(outputs[name].astype(np.float64) - ref).max())
        match &= bool(np.allclose(outputs[name], ref, rtol=rtol, atol=atol * scale))
    return DeployReport(device.name, arch, outputs, reference, errors, match, latency, upload_s)

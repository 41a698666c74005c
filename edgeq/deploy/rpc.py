"""Run an artifact on a device over TVM RPC: verify, check the architecture, upload, run, compare, time.

A TVM RPC server runs whatever is uploaded to it, without authentication: edgeq connects to loopback
unless the user names another address.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..artifact import QUANTIZED_MODEL, SOURCE_MODEL, Artifact, latency_stats, outputs_by_name
from ..errors import EdgeqError, one_line
from ..tensors import match_inputs, random_inputs

# Output agreement between device and host build, per artifact precision: (rtol, atol relative to max |ref|)
# (rtol, atol as a fraction of the output's largest magnitude).  int8: the device and the host run the same
# integer arithmetic, so outputs agree to the last bit in practice; 1/254 of the range allows one 8-bit step.
# Integer builds: the board and the host run the same integer kernels, so outputs agree to 1 LSB of the 8-bit
# output (the last layer stays 8-bit in the low-bit modes too).
TOLERANCE = {"fp32": (1e-4, 1e-5), **{mode: (0.0, 1.001 / 254) for mode in ("int8", "w2a2", "w2a8", "w4a4")}}
_ARCH_OF_TRIPLE = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64", "arm": "arm", "armv7": "arm"}


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT' / 'PORT' for loopback) -> (host, port)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise EdgeqError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")
    return host or "127.0.0.1", number


def with_timeout(seconds: float, what: str, fn, *args):
    """Call fn in a helper thread; a call that outlives `seconds` becomes an EdgeqError (it is abandoned)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise EdgeqError(f"{what} timed out after {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


@dataclass
class Device:
    """How to reach a device: a direct RPC server or a tracker + key."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    timeout: float = 60.0

    def __post_init__(self):
        if bool(self.rpc) == bool(self.tracker):
            raise EdgeqError("name the device with either --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        if self.tracker and not self.key:
            raise EdgeqError("--tracker needs --key (the device key the server registered with)")

    @property
    def name(self) -> str:
        return self.rpc if self.rpc else f"{self.key}@{self.tracker}"

    def connect(self):
        """An RPC session, or a one-line EdgeqError saying why there is none."""
        from tvm import rpc

        if self.rpc:
            host, port = parse_address(self.rpc)
            try:
                return with_timeout(self.timeout, f"connecting to {host}:{port}", rpc.connect, host, port, "",
                                    int(self.timeout) * 10)
            except RuntimeError as e:
                raise EdgeqError(f"cannot connect to {host}:{port}: {_connection_reason(e)} "
                                 "(is an RPC server running there? `edgeq device emulate rpi4` starts one)") from None
        host, port = parse_address(self.tracker)
        keys = tracker_keys(self.tracker, self.timeout)
        if self.key not in keys:
            raise EdgeqError(f"tracker {host}:{port} has no device registered under key {self.key!r} "
                             f"(keys: {', '.join(sorted(keys)) or 'none'})")
        try:
            tracker = rpc.connect_tracker(host, port)
            return with_timeout(self.timeout, f"waiting for a free {self.key!r} device from tracker {host}:{port}",
                                tracker.request, self.key, 1, int(self.timeout) * 10, 1)
        except RuntimeError as e:
            raise EdgeqError(f"tracker {host}:{port} gave no {self.key!r} device: {_connection_reason(e)}") from None


def _connection_reason(error: Exception) -> str:
    text = one_line(error, limit=10_000)
    if "Connect to" in text and "failed" in text or "refused" in text.lower():
        return "connection refused"
    return text.split("Check failed:")[-1].strip()[-200:]


def tracker_keys(tracker: str, timeout: float = 10.0) -> dict[str, dict]:
    """{key: {"free": n, "pending": n}} of the devices a tracker knows."""
    from tvm import rpc

    host, port = parse_address(tracker)
    try:
        summary = with_timeout(timeout, f"asking tracker {host}:{port}", lambda: rpc.connect_tracker(host, port).summary())
    except (OSError, RuntimeError) as e:
        raise EdgeqError(f"cannot reach tracker {host}:{port}: {one_line(e, 200)}") from None
    return dict(summary.get("queue_info", {}))


def remote_arch(session) -> str:
    """The device's CPU architecture, as the names in a manifest's `arch`."""
    triple = session.get_function("target.llvm_get_system_triple")()
    return _ARCH_OF_TRIPLE.get(triple.split("-")[0], triple.split("-")[0])


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

"""`edgeq package`: one tarball to copy to a board, with the artifact, a runner script and instructions."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from targets.atomic import atomic_path

from ..artifact import Artifact

RUNNER = Path(__file__).with_name("device_run.py")

DEVICE_README = """# {name} for {preset} ({arch})

Built by edgeq {edgeq} with TVM {tvm} for target {target}.

## On the device (64-bit Raspberry Pi OS / Debian, Python 3.9 or newer)

    python3 -m venv ~/tvm && . ~/tvm/bin/activate
    pip install numpy apache-tvm=={tvm} apache-tvm-ffi=={ffi}
    tar xzf {tarball} && cd {name}
    python3 run.py                      # random inputs: checks checksums, runs, prints latency
    python3 run.py --input inputs.npz --output outputs.npz

## Or drive it from your workstation over TVM RPC

On the device (a TVM RPC server runs whatever is uploaded to it, with no authentication: only on a
network you trust, never exposed to the internet):

    python3 -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090

On the workstation:

    edgeq deploy {name} --rpc BOARD_IP:9090

Inputs: {inputs}
Outputs: {outputs}
"""


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def package(artifact_dir, out_path) -> Path:
    """Write ARTIFACT.tar.gz: the verified artifact files, run.py and DEVICE.md under one folder."""
    import importlib.metadata

    artifact = Artifact.load(artifact_dir)
    m = artifact.manifest
    out = Path(out_path)
    name = artifact.path.name
    readme = DEVICE_README.format(
        name=name, preset=m["preset"], arch=m["arch"], edgeq=m["edgeq_version"], tvm=m["tvm_version"],
        ffi=importlib.metadata.version("apache-tvm-ffi"), target=m["target"], tarball=out.name,
        inputs=", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in m["inputs"]),
        outputs=", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in m["outputs"]))
    with atomic_path(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for file in ["manifest.json", *m["files"]]:
            tar.add(artifact.path / file, arcname=f"{name}/{file}")
        _add_bytes(tar, f"{name}/run.py", RUNNER.read_bytes(), 0o755)
        _add_bytes(tar, f"{name}/DEVICE.md", readme.encode())
    return out

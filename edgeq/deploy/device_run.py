"""Run an edgeq artifact on the device itself (needs only numpy and the apache-tvm wheel there).

    python3 run.py [--input inputs.npz] [--output outputs.npz] [--repeat 20]
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import tvm
from tvm import relax

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help=".npz keyed by input name; default: random inputs")
    parser.add_argument("--output", help="write outputs to this .npz")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with open(os.path.join(HERE, "manifest.json")) as f:
        manifest = json.load(f)
    for name, digest in manifest["files"].items():
        with open(os.path.join(HERE, name), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                print(f"error: {name} is corrupt (checksum mismatch)", file=sys.stderr)
                return 2
    rng = np.random.default_rng(0)
    feeds = dict(np.load(args.input)) if args.input else {
        s["name"]: rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in manifest["inputs"]}
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(HERE, manifest["library"]["file"])), dev)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(feeds[s["name"]], s["dtype"]), dev) for s in manifest["inputs"]]
    result = vm["main"](*tensors)
    values = [result] if len(manifest["outputs"]) == 1 else list(result)
    outputs = {s["name"]: v.numpy() for s, v in zip(manifest["outputs"], values)}
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}{list(value.shape)} first {value.reshape(-1)[:6]}")
    vm.set_input("main", *tensors)
    ms = np.array(vm.time_evaluator("invoke_stateful", dev, number=1, repeat=args.repeat, min_repeat_ms=10)("main").results) * 1e3
    print(f"latency: {ms.mean():.3f} ms mean, {np.median(ms):.3f} median, {ms.min():.3f} min ({args.repeat} repeats)")
    if args.output:
        np.savez(args.output, **outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

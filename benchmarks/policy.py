"""--quantize auto against every single mode, on three trained digits models: the bundled CNN, a ResNet-style
and a MobileNetV2-style network.

The two torch models are trained here on train_digits.py's training split (fixed seed; seconds on a CPU) and
exported with torch.onnx; the bundled CNN is used as it ships.  The held-out test split (360 images) is cut in
two: the policy search scores its candidates on the first half (``val``), the accuracies reported for the
decision come from the second half (``test``), which no choice saw.  For each model:

  * every single mode (int8; w4a4, w2a8, w2a2 with the first and last layers 8-bit) built by edgeq: accuracy on
    both halves, the artifact's weight bytes, its latency here (batch 1, the artifact's benchmark());
  * ``--quantize auto --max-drop 1`` for ``size`` and for ``latency``: the same numbers for the chosen build,
    and the search's effort (assignments measured, seconds).

Writes benchmarks/results/policy.md and one Pareto plot per model (policy-<model>.png: every assignment the size
search measured, estimated size vs accuracy drop on val).

    python benchmarks/policy.py [--models digits resnet mobilenet] [--max-drop 1]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import edgeq  # noqa: E402
from edgeq import policy  # noqa: E402
from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST  # noqa: E402

SHAPES = {"image": (1, 1, 8, 8)}
MODES = ("int8", "w4a4", "w2a8", "w2a2")
ROUNDS = 10


def _torch_models():
    import torch
    from torch import nn

    def conv_bn(cin, cout, k=3, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout))

    class ResNetStyle(nn.Module):
        """Stem, an identity-shortcut block and a strided block with a 1x1 projection shortcut (ResNet-18's)."""

        def __init__(self):
            super().__init__()
            self.stem = conv_bn(1, 16)
            self.a1, self.a2 = conv_bn(16, 16), conv_bn(16, 16)
            self.b1, self.b2, self.down = conv_bn(16, 32, stride=2), conv_bn(32, 32), conv_bn(16, 32, 1, 2)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(self.a2(torch.relu(self.a1(x))) + x)
            x = torch.relu(self.b2(torch.relu(self.b1(x))) + self.down(x))
            return self.fc(x.mean([2, 3]))

    class InvertedResidual(nn.Module):
        """MobileNetV2's block: 1x1 expand, ReLU6, 3x3 depthwise, ReLU6, linear 1x1 project (+ x when shapes match)."""

        def __init__(self, cin, cout, stride, expand=4):
            super().__init__()
            mid = cin * expand
            self.body = nn.Sequential(conv_bn(cin, mid, 1), nn.ReLU6(), conv_bn(mid, mid, 3, stride, mid),
                                      nn.ReLU6(), conv_bn(mid, cout, 1))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class MobileNetV2Style(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(1, 16), nn.ReLU6())
            self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                        InvertedResidual(24, 24, 1))
            self.head = nn.Sequential(conv_bn(24, 64, 1), nn.ReLU6())
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.head(self.blocks(self.stem(x))).mean([2, 3]))

    return {"resnet": ResNetStyle, "mobilenet": MobileNetV2Style}


def trained(name: str, directory: Path) -> Path:
    """The model trained with train_digits.py's recipe (Adam, cosine schedule, 30 epochs, seed 0), exported."""
    if name == "digits":
        return DIGITS_MODEL
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    sys.path.insert(0, str(Path(edgeq.__file__).parent / "examples"))
    import train_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, _, y_tr, _ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    model = train_digits.train(_torch_models()[name](), torch.from_numpy(x_tr), torch.from_numpy(y_tr))
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(*SHAPES["image"]),), buf, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"])
    path = directory / f"{name}.onnx"
    path.write_bytes(buf.getvalue())
    return path


def logits(artifact, images) -> np.ndarray:
    return np.concatenate([artifact.run({"image": images[i:i + 1]})["logits"] for i in range(len(images))])


def accuracy(artifact, images, labels) -> float:
    return 100.0 * float(np.mean(logits(artifact, images).argmax(1) == labels))


def onnxruntime_logits(path: Path, images, fused: bool) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"image": images[i:i + 1]})[0] for i in range(len(images))])


def int8_sqnr(path: Path, artifact, images) -> list:
    """Output SQNR (dB) of the int8 build vs fp32 on ``images``: edgeq's kernels, and onnxruntime's run of the same
    QDQ model with its int8 kernels (fused, its default) and without (DQ -> float op -> Q)."""
    from edgeq.artifact import QUANTIZED_MODEL

    reference = onnxruntime_logits(path, images, True)
    qdq = Path(artifact.path) / QUANTIZED_MODEL
    return [f"{harness.sqnr_db(reference, got):.1f}" for got in (
        logits(artifact, images), onnxruntime_logits(qdq, images, True), onnxruntime_logits(qdq, images, False))]


def measure(artifact, val, test) -> dict:
    return {"val": accuracy(artifact, *val), "test": accuracy(artifact, *test), "artifact": artifact,
            "bytes": sum(artifact.manifest["quantization"]["weight_bytes"].values())}


def time_interleaved(numbers: dict, sample: np.ndarray, rounds: int = ROUNDS) -> None:
    """Each build's latency: the median over ``rounds`` rounds, every round timing every build once (so a
    disturbance of the machine hits all of them alike)."""
    times = {label: [] for label in numbers}
    for _ in range(rounds):
        for label, n in numbers.items():
            times[label].append(n["artifact"].benchmark({"image": sample}, repeat=5)["median_ms"])
    for label, n in numbers.items():
        n["ms"] = float(np.median(times[label]))


def run_model(name: str, work: Path, max_drop: float, val, test) -> tuple[list[list], dict]:
    path = trained(name, work)
    fp32_build = edgeq.build(path, "host", work / f"{name}-fp32", input_shapes=SHAPES)
    rows, numbers = [], {"fp32": measure(fp32_build, val, test)}
    for mode in MODES:
        artifact = edgeq.build(path, "host", work / f"{name}-{mode}", input_shapes=SHAPES, quantize=mode,
                               calibration=DIGITS_CALIB)
        numbers[mode] = measure(artifact, val, test)
        if mode == "int8":
            sqnr = [name, *int8_sqnr(path, artifact, test[0])]
    searches = {}
    for objective in ("size", "latency"):
        start = time.perf_counter()
        result = policy.search(edgeq.load_onnx(path, SHAPES), DIGITS_CALIB, {"image": val[0], "label": val[1]},
                               labels="label", max_drop=max_drop, objective=objective,
                               cache=work / "latency.json" if objective == "latency" else None)
        seconds = time.perf_counter() - start
        artifact = edgeq.build(result.quantized, "host", work / f"{name}-auto-{objective}")
        numbers[f"auto ({objective})"] = measure(artifact, val, test)
        searches[objective] = (result, seconds)
    time_interleaved(numbers, val[0][:1])
    fp32 = numbers["fp32"]
    meets = {label: n["val"] >= fp32["val"] - max_drop for label, n in numbers.items()}
    for label, n in numbers.items():
        search = searches.get(label[6:-1]) if label.startswith("auto") else None
        chosen = ", ".join(f"{p}" for p in search[0].assignment.values()) if search else ""
        rows.append([name, label, f"{n['val']:.2f}", f"{n['test']:.2f}", "yes" if meets[label] else "no",
                     n["bytes"], f"{n['ms'] * 1000:.1f}",
                     f"{len(search[0].evaluations)} in {search[1]:.0f} s: {chosen}" if search else ""])
    best_single = {key: min((n[key] for label, n in numbers.items() if label in ("fp32", *MODES) and meets[label]),
                            default=None) for key in ("bytes", "ms")}
    return rows, {"sqnr": sqnr, "best_single": best_single, "auto": {k: numbers[f"auto ({o})"][k] for o, k in
                                                       (("size", "bytes"), ("latency", "ms"))},
                  "size_search": searches["size"][0]}


def pareto_plot(name: str, result) -> Path:
    from edgeq.report import _matplotlib, _save_png, plot_policy

    FigureCanvasAgg, Figure = _matplotlib()
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    plot_policy(result.summary(), fig.subplots())
    fig.suptitle(f"{name}: --quantize auto --objective size")
    return _save_png(fig, Path(__file__).parent / "results" / f"policy-{name}.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet", "mobilenet"],
                        choices=["digits", "resnet", "mobilenet"])
    parser.add_argument("--max-drop", type=float, default=1.0)
    args = parser.parse_args(argv)
    with np.load(DIGITS_TEST) as data:
        images, labels = data["image"], data["label"]
    half = len(images) // 2
    val, test = (images[:half], labels[:half]), (images[half:], labels[half:])
    rows, summary, sqnr_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="edgeq-policy-bench-") as tmp:
        for name in args.models:
            model_rows, numbers = run_model(name, Path(tmp), args.max_drop, val, test)
            rows += model_rows
            sqnr_rows.append(numbers["sqnr"])
            pareto_plot(name, numbers["size_search"])
            b, a = numbers["best_single"], numbers["auto"]
            summary.append(f"- {name}: auto (size) {a['bytes']} B vs {b['bytes']} B for the smallest single build "
                           f"(fp32 or one mode) meeting the drop; auto (latency) {a['ms'] * 1000:.1f} µs vs "
                           f"{b['ms'] * 1000:.1f} µs for the fastest")
            print("\n".join(harness.markdown_table(HEADER, model_rows).splitlines()[2:]), flush=True)
    text = "\n".join([
        f"# --quantize auto vs single modes ({harness.machine()})", "",
        f"`python benchmarks/policy.py --max-drop {args.max_drop}`; accuracy in % on the two halves of the digits "
        f"test split (val: what the search scored, {half} images; test: held out, {len(images) - half}); "
        f"'meets': val accuracy within {args.max_drop} point(s) of fp32's; bytes: the artifact's weight bytes "
        f"(manifest); latency: batch 1 on this machine, the median of {ROUNDS} rounds in which every build of the model is timed once (benchmark(), each a mean over >= 20 ms of runs).", "",
        harness.markdown_table(HEADER, rows), "", *summary, "",
        "int8 output SQNR against fp32 on the test half (dB): edgeq's integer kernels, and onnxruntime running the "
        "same QDQ model (quantized.onnx) with its default fused int8 kernels and unfused (DQ -> float op -> Q, "
        "the arithmetic the QDQ model specifies; the policy search scores with this one):", "",
        harness.markdown_table(["model", "edgeq int8", "onnxruntime fused", "onnxruntime unfused"], sqnr_rows), "",
        "Pareto plots (every assignment the size search measured): "
        + ", ".join(f"[{n}](policy-{n}.png)" for n in args.models), ""])
    print(harness.write_result("policy", text))


HEADER = ["model", "build", "val %", "test %", "meets", "weight bytes", "latency µs", "search: measured, time, choice"]

if __name__ == "__main__":
    main()

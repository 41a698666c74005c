"""How much did quantization cost: an int8 artifact against the fp32 model it came from, on the user's data.

The fp32 reference is source.onnx built for this machine; the int8 side is the artifact itself when it runs here,
else quantized.onnx realized for this machine.  Per-layer values come from edgeq's real integer kernels: the QDQ
model is rebuilt with every quantized layer's dequantized output added as a graph output (and the fp32 model
with the same tensors), so the table shows where along the graph the error appears.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import EdgeqError

PER_LAYER_SAMPLES = 64  # the per-layer pass runs on the first samples only: it is for ranking layers, not scoring
SCATTER_POINTS = 5000


def evaluate(artifact_dir, data, labels: str | None = None, plot: str | os.PathLike | None = None,
             per_layer_samples: int = PER_LAYER_SAMPLES) -> dict:
    """Compare a quantized artifact with its fp32 source on `data` (.npz path or {input name: samples on axis 0}).

    labels: key of an array of class indices in `data` (one per sample) to score both models' accuracy.
    plot: also write a PNG (per-layer SQNR bars, int8 vs fp32 output scatter); needs matplotlib (edgeq[plot]).

    Returns (stable keys; SQNR is 10·log10(Σref²/Σ(ref−q)²) in dB, None where undefined: q == ref exactly, or
    an all-zero reference):
      artifact, model, preset, method: what was compared
      samples: samples evaluated; dropped: trailing samples that did not fill a batch; batch_size
      int8_source: "artifact" (model.so ran here) or "host" (quantized.onnx realized for this machine)
      top1_agreement: fraction of samples whose argmax (last axis of the first output) is the same in fp32 and
        int8, None when the first output is not classifier-shaped ([batch, classes])
      accuracy: {"labels": key, "fp32": fraction, "int8": fraction} or None without labels
      outputs: [{"name", "sqnr_db", "max_abs_error"}] per model output
      layers: [{"node", "op", "tensor", "sqnr_db", "max_abs_error", "worst"}] per quantized layer, in graph order
      layer_samples: samples the per-layer pass ran on; worst_layer: node with the lowest SQNR (or None)
      float_layers: {node: why it stayed float} from the manifest
      notes: [str] what the reader should know (host realization, capped per-layer pass, dropped samples)
    """
    from .artifact import QUANTIZED_MODEL, SOURCE_MODEL, Artifact
    from .errors import interruptible
    from .tensors import load_arrays

    if plot is not None:
        _matplotlib()  # fail before the builds, not after
    artifact = Artifact.load(artifact_dir)
    m = artifact.manifest
    q = m["quantization"]
    if q["mode"] == "fp32":
        raise EdgeqError(f"{artifact.path} is not quantized (mode fp32): nothing to compare")
    if "quantized_layers" not in q or QUANTIZED_MODEL not in m["files"]:
        raise EdgeqError(f"{artifact.path} was built from an already quantized model ({q.get('source')}): "
                         "it has no fp32 model to compare with")
    arrays = load_arrays(data) if isinstance(data, (str, os.PathLike)) else dict(data)
    specs = artifact.inputs
    batches = _batches(arrays, specs)
    batch = specs[0].shape[0] if specs[0].shape else 1
    total = _sample_count(arrays[specs[0].name], specs[0])
    used = len(batches) * batch
    label_values = _labels(arrays, labels, total, data)[:used] if labels is not None else None
    classifier = _is_classifier(artifact.outputs[0].shape)
    if labels is not None and not classifier:
        raise EdgeqError(f"labels need a classifier output ([batch, classes]); {artifact.outputs[0].name} has "
                         f"shape {list(artifact.outputs[0].shape)}")

    layers = q["quantized_layers"]
    shapes = {s.name: s.shape for s in specs}
    notes = []
    with interruptible():
        fp32_names, fp32_run = _host_build(artifact.path / SOURCE_MODEL, shapes, [g["output"] for g in layers])
        q_outputs, op_types = _graph_info(artifact.path / QUANTIZED_MODEL)
        taps = [g["output"] if g["output"] in q_outputs else f"{g['output']}.dq" for g in layers]
        q_names, q_run = _host_build(artifact.path / QUANTIZED_MODEL, shapes, taps, qdq=True)
        out_names = [s.name for s in artifact.outputs]
        layer_batches = max(1, -(-per_layer_samples // batch))
        fp32 = _collect(fp32_run, batches, fp32_names, out_names, layer_batches)
        int8_source, reason = _artifact_runs_here(artifact)
        if int8_source == "artifact":
            int8_taps = _collect(q_run, batches[:layer_batches], q_names)
            int8 = _collect(artifact.run, batches, out_names)
        else:
            int8 = int8_taps = _collect(q_run, batches, q_names, out_names, layer_batches)
            notes.append(f"int8 outputs from quantized.onnx realized for this machine: {reason}")
    layer_samples = min(used, layer_batches * batch)
    if layer_samples < used:
        notes.append(f"per-layer SQNR on the first {layer_samples} of {used} samples")
    notes.append("per-layer SQNR from edgeq's integer kernels for this machine (taps on each layer's dequantized "
                 "output, error accumulated from the input)")
    if total > used:
        notes.append(f"{total - used} trailing sample(s) dropped: they do not fill a batch of {batch}")

    rows = []
    for g, tap in zip(layers, taps):
        ref = fp32.get(g["output"])
        got = int8_taps[tap]
        ref = ref[:len(got)] if ref is not None else None
        op = g["op"] + (f"+{op_types.get(g['activation'], 'act')}" if g.get("activation") else "")
        rows.append({"node": g["node"], "op": op, "tensor": g["output"],
                     "precision": f"w{g.get('weight_bits', 8)} out{g.get('output_bits', 8)}",
                     "sqnr_db": sqnr_db(ref, got) if ref is not None else None,
                     "max_abs_error": _max_abs(ref, got) if ref is not None else None, "worst": False})
    scored = [r for r in rows if r["sqnr_db"] is not None]
    worst = min(scored, key=lambda r: r["sqnr_db"]) if scored else None
    if worst is not None:
        worst["worst"] = True

    first = out_names[0]
    top1 = accuracy = None
    if classifier:
        ref_top, q_top = fp32[first].argmax(-1).reshape(-1), int8[first].argmax(-1).reshape(-1)
        top1 = float(np.mean(ref_top == q_top))
        if label_values is not None:
            accuracy = {"labels": labels, "fp32": float(np.mean(ref_top == label_values)),
                        "int8": float(np.mean(q_top == label_values))}
    report = {
        "artifact": str(artifact.path), "model": m["model"]["name"], "preset": m["preset"],
        "mode": q.get("mode", "int8"), "method": q.get("method"), "samples": used, "dropped": total - used, "batch_size": batch,
        "int8_source": int8_source, "top1_agreement": top1, "accuracy": accuracy,
        "outputs": [{"name": n, "sqnr_db": sqnr_db(fp32[n], int8[n]), "max_abs_error": _max_abs(fp32[n], int8[n])}
                    for n in out_names],
        "layers": rows, "layer_samples": layer_samples, "worst_layer": worst["node"] if worst else None,
        "float_layers": dict(q.get("float_layers", {})), "notes": notes,
        **({"policy": q["policy"]} if "policy" in q else {}),
    }
    if plot is not None:
        plot_report(report, fp32[first], int8[first], plot)
    return report


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None where undefined (no noise, or no signal)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    signal, noise = float(np.sum(ref * ref)), float(np.sum((ref - got) ** 2))
    if noise == 0 or signal == 0:
        return None
    return 10 * math.log10(signal / noise)


def _max_abs(ref, got) -> float:
    return float(np.max(np.abs(np.asarray(ref, np.float64) - got))) if np.size(ref) else 0.0


def _is_classifier(shape) -> bool:
    return len(shape) >= 2 and shape[-1] >= 2 and int(np.prod(shape[1:-1])) == 1


def _batches(arrays: dict, specs) -> list[list[np.ndarray]]:
    """The model's batches from the data, with calibrate's checks worded for evaluation."""
    from .calibration import calibration_batches

    try:
        return list(calibration_batches(arrays, specs))
    except EdgeqError as e:
        message = str(e).replace("calibration batch", "data").replace("calibration input", "input")
        raise EdgeqError(message.replace("the calibration set", "the data")) from None


def _sample_count(array, spec) -> int:
    a = np.asarray(array)
    return spec.shape[0] if a.shape == tuple(spec.shape) else a.shape[0]


def _labels(arrays: dict, key: str, count: int, data) -> np.ndarray:
    where = data if isinstance(data, (str, os.PathLike)) else "the data"
    if key not in arrays:
        raise EdgeqError(f"labels {key!r} not found in {where}; it holds {', '.join(sorted(arrays)) or 'nothing'}")
    values = np.asarray(arrays[key])
    values = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
    if values.shape[1] != 1 or not np.issubdtype(values.dtype, np.integer):
        raise EdgeqError(f"labels {key!r} must be one integer class index per sample; got "
                         f"{values.dtype}{list(np.shape(arrays[key]))}")
    if len(values) != count:
        raise EdgeqError(f"labels {key!r} has {len(values)} entries for {count} samples")
    return values[:, 0]


def _graph_info(path: Path) -> tuple[set[str], dict[str, str]]:
    """A model's output names and {node name: op type}."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {o.name for o in graph.output}, {n.name: n.op_type for n in graph.node}


def _host_build(path: Path, shapes: dict, taps: list[str], qdq: bool = False):
    """Build an ONNX file with `taps` added as outputs for this machine: (output names, batch -> {name: array})."""
    from .calibration import tapped_runner
    from .frontend import load_onnx

    inferred = load_onnx(path, shapes).onnx_model  # shape-inferred and folded: the taps name its tensors
    known = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output)}
    return tapped_runner(inferred, [t for t in taps if t in known], qdq)


def _collect(run, batches, names, outputs=(), tap_batches: int | None = None) -> dict[str, np.ndarray]:
    """Run every batch (``run``: batch -> {name: array}); the `names` joined along axis 0.  With tap_batches, only `outputs` are kept after
    the first tap_batches batches (the taps of a whole data set would not fit in memory for a large model)."""
    from .errors import raise_if_interrupted

    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, b in enumerate(batches):
        raise_if_interrupted()
        results = run(b)
        for name in names:
            if tap_batches is None or i < tap_batches or name in outputs:
                parts[name].append(np.atleast_1d(results[name]))
    return {n: np.concatenate(p) for n, p in parts.items() if p}


def _artifact_runs_here(artifact) -> tuple[str, str]:
    """("artifact", "") when model.so loads and runs on this machine, else ("host", why not)."""
    from targets.detect import host_arch

    m = artifact.manifest
    if m["arch"] != host_arch():
        return "host", f"the artifact is for {m['arch']} ({m['preset']}), this machine is {host_arch()}"
    try:
        artifact._load_vm()
    except EdgeqError as e:
        return "host", str(e)
    return "artifact", ""


def layer_table(report: dict) -> tuple[list[list], list[str]]:
    """(rows, header) of the per-layer SQNR table, worst layer marked."""
    rows = [[r["node"], r["op"], r["tensor"], r.get("precision", "w8 out8"), _db(r["sqnr_db"], r["max_abs_error"]),
             "-" if r["max_abs_error"] is None else f"{r['max_abs_error']:.4g}", "<- worst" if r["worst"] else ""]
            for r in report["layers"]]
    return rows, ["layer", "op", "tensor", "bits (weights, output)", "SQNR dB", "max abs err", ""]


def _db(value, error) -> str:
    if value is not None:
        return f"{value:.1f}"
    return "exact" if error == 0 else "n/a"


def format_report(report: dict, layers: bool = True) -> str:
    """The report as text: summary lines, then (layers=True) the per-layer table."""
    r = report
    mode = r.get("mode", "int8")
    lines = [f"{r['model']} {mode} ({r['method']}, {r['preset']}) vs fp32 on {r['samples']} samples"]
    source = "the artifact (ran on this machine)" if r["int8_source"] == "artifact" else \
        "quantized.onnx realized for this machine"
    lines.append(f"  {mode:<4} from     {source}")
    if r["top1_agreement"] is not None:
        lines.append(f"  top-1         {r['top1_agreement']:.2%} agreement with fp32")
    if r["accuracy"]:
        a = r["accuracy"]
        lines.append(f"  accuracy      fp32 {a['fp32']:.2%}, {mode} {a['int8']:.2%} "
                     f"({(a['int8'] - a['fp32']) * 100:+.2f} points, labels {a['labels']!r})")
    for o in r["outputs"]:
        lines.append(f"  output        {o['name']}: SQNR {_db(o['sqnr_db'], o['max_abs_error'])} dB, "
                     f"max abs error {o['max_abs_error']:.4g}")
    for note in r["notes"]:
        lines.append(f"  note          {note}")
    if "policy" in r:
        lines += policy_lines(r["policy"])
    if layers:
        rows, header = layer_table(r)
        cells = [header] + [[str(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines.append("")
        for i, row in enumerate(cells):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def policy_lines(policy: dict) -> list[str]:
    """How --quantize auto chose: budget, verified numbers against the single-mode builds, each layer and why."""
    v = policy.get("verified") or {}
    budget = (f"SQNR >= {policy.get('min_sqnr')} dB" if policy["metric"] == "sqnr_db" else
              f"{policy['metric']} drop <= {policy['max_drop']} points (the share of samples fp32 gets right and "
              "it gets wrong)")
    lines = [f"  policy        {policy['objective']} minimized, {budget}, fp32 {policy['fp32_score']:.2f}; "
             f"{len(policy['evaluated'])} assignments measured"]
    for m in v.get("compared", []):
        lines.append(f"  built         {m['label']:<7} {policy['metric']} {m['score']:.2f} (drop {m['drop']:+.2f}), "
                     f"{m['objective']:.4g} {v['unit']}" + ("  <- chosen" if m["label"] == v["label"] else ""))
    for entry in policy["layers"]:
        alone = ", ".join(f"{p} {score:.1f}" for p, score in entry.get("sensitivity", {}).items())
        lines.append(f"  layer         {entry['node']}: {entry['why']}"
                     + (f" [{policy['metric']} with it alone raised from the cheapest start: {alone}]" if alone else ""))
    return lines


def plot_policy(policy: dict, axes) -> None:
    """Every assignment the policy search measured: estimated objective vs drop, the budget and the chosen one."""
    points = policy["evaluated"]
    axes.scatter([e["objective"] for e in points], [e["drop"] for e in points], s=10, alpha=0.5,
                 label="measured assignments")
    for e in (e for e in points if e.get("label")):
        axes.annotate(e["label"], (e["objective"], e["drop"]), fontsize=7)
    chosen = policy["proxy"]
    axes.scatter([chosen["objective"]], [chosen["drop"]], s=60, marker="*", color="tab:red", label="chosen")
    axes.axhline(policy["max_drop"] if policy["metric"] != "sqnr_db" else 0.0, color="gray", linestyle="--",
                 linewidth=0.8, label="budget")
    axes.set_xlabel(f"{policy['objective']} (estimated from per-layer costs)")
    axes.set_ylabel(f"{policy['metric']} drop (onnxruntime QDQ)")
    axes.set_title("policy search: every assignment measured")
    axes.legend(fontsize=7)


def _matplotlib():
    """matplotlib's Agg canvas and Figure (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EdgeqError("plotting needs matplotlib: pip install 'edgeq[plot]'") from None
    return FigureCanvasAgg, Figure


def plot_report(report: dict, fp32: np.ndarray, int8: np.ndarray, path: str | os.PathLike) -> Path:
    """PNG: per-layer SQNR bars (worst in red), int8 vs fp32 values of the first output and, for --quantize auto,
    the policy search's Pareto plot; written atomically."""
    FigureCanvasAgg, Figure = _matplotlib()
    path = Path(path)
    policy = report.get("policy")
    fig = Figure(figsize=(15 if policy else 11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 3 if policy else 2, width_ratios=[3, 2, 2] if policy else [3, 2])
    bars, scatter = panels[0], panels[1]
    if policy:
        plot_policy(policy, panels[2])
    layers = report["layers"]
    values = [r["sqnr_db"] if r["sqnr_db"] is not None else 0.0 for r in layers]
    bars.bar(range(len(layers)), values, color=["tab:red" if r["worst"] else "tab:blue" for r in layers])
    bars.set_xticks(range(len(layers)), [r["node"] for r in layers], rotation=45, ha="right", fontsize=8)
    bars.set_ylabel("SQNR (dB, higher is better)")
    bars.set_title(f"per-layer SQNR, first {report['layer_samples']} samples (worst: {report['worst_layer']})")
    ref, got = np.asarray(fp32, np.float64).reshape(-1), np.asarray(int8, np.float64).reshape(-1)
    if ref.size > SCATTER_POINTS:
        pick = np.random.default_rng(0).choice(ref.size, SCATTER_POINTS, replace=False)
        ref, got = ref[pick], got[pick]
    scatter.scatter(ref, got, s=4, alpha=0.4)
    lo, hi = float(min(ref.min(), got.min())), float(max(ref.max(), got.max()))
    scatter.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
    out = report["outputs"][0]
    scatter.set_xlabel(f"fp32 {out['name']}")
    scatter.set_ylabel(f"{report['mode']} {out['name']}")
    scatter.set_title(f"{out['name']}: SQNR {_db(out['sqnr_db'], out['max_abs_error'])} dB")
    return _save_png(fig, Path(path))


def plot_tuning_curves(rows: list[dict], path: str | os.PathLike) -> Path:
    """PNG: each tuned kernel's best latency vs trials (log scale), its default schedule as a dashed line."""
    FigureCanvasAgg, Figure = _matplotlib()
    fig = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, row in enumerate(r for r in rows if r["best_ms"] is not None):
        color = f"C{i % 10}"
        curve = [v if np.isfinite(v) else np.nan for v in row["curve_ms"]]
        ax.plot(range(1, len(curve) + 1), curve, color=color, label=row["task"][:40])
        if row["default_ms"]:
            ax.axhline(row["default_ms"], color=color, linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("trials")
    ax.set_ylabel("best latency (ms); dashed: default schedule")
    ax.set_title("tuning curves")
    ax.legend(fontsize=7, loc="upper right")
    return _save_png(fig, Path(path))


def _save_png(fig, path: Path) -> Path:
    """Written atomically: a reader never sees half a PNG."""
    from targets.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path

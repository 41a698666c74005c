"""Train the bundled example model: a tiny CNN on scikit-learn's digits.

edgeq needs a small, real, self-contained ONNX model to exercise its
compiler pipeline (import, quantization, tuning, accuracy checks) without
any network access. scikit-learn ships the 8x8 digits dataset (1797 images),
so this script trains a small conv net on it with a fixed seed and split,
and writes, next to itself (or to --out-dir):

  digits_cnn.onnx  opset 17; input ``image`` float32 [N,1,8,8] (dynamic N),
                   output ``logits`` float32 [N,10]; ops: Conv,
                   BatchNormalization, Relu, MaxPool, Flatten, Gemm.
  digits_test.npz  the exact held-out test split: ``image`` float32
                   [n,1,8,8] in [0,1], ``label`` int64 [n].
  digits_calib.npz calibration images for int8 quantization: ``image``, the
                   first CALIBRATION_SAMPLES images of the training split
                   (never the test split, so accuracy is measured honestly).

The test accuracy is measured with onnxruntime on the exported file; the
script exits non-zero if it is below 0.98. Runs on CPU in seconds.
"""
import argparse
import io
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from targets.atomic import write_atomic

SEED = 0
MIN_ACCURACY = 0.98


def build_model() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), nn.MaxPool2d(2),  # 8x8 -> 4x4
        *block(16, 32), nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


def train(model, x, y, epochs=30, batch=64):
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def export_onnx(model) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), buf, dynamo=False, opset_version=17,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.PRESERVE,  # keep BatchNormalization unfused
    )
    proto = onnx.load_from_string(buf.getvalue())
    # PRESERVE leaves dead Identity nodes on the BN parameters; drop them.
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    live = [n for n in proto.graph.node if any(o in used for o in n.output)]
    del proto.graph.node[:]
    proto.graph.node.extend(live)
    onnx.checker.check_model(proto, full_check=True)
    return proto


CALIBRATION_SAMPLES = 256


def write_calibration_set(out_dir: str, x_train: np.ndarray) -> None:
    npz = io.BytesIO()
    np.savez(npz, image=x_train[:CALIBRATION_SAMPLES])
    write_atomic(os.path.join(out_dir, "digits_calib.npz"), npz.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order, same weights on every run

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # NCHW [N,1,8,8] in [0,1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)

    t0 = time.perf_counter()
    model = train(build_model(), torch.from_numpy(x_tr), torch.from_numpy(y_tr))
    print(f"trained in {time.perf_counter() - t0:.1f}s")

    proto = export_onnx(model)
    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, "digits_cnn.onnx")
    write_atomic(onnx_path, proto.SerializeToString())
    npz = io.BytesIO()
    np.savez(npz, image=x_te, label=y_te)
    write_atomic(os.path.join(args.out_dir, "digits_test.npz"), npz.getvalue())
    write_calibration_set(args.out_dir, x_tr)

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image": x_te})[0]
    acc = float((logits.argmax(1) == y_te).mean())
    print(f"onnxruntime test accuracy: {acc:.4f} ({len(y_te)} samples)")
    print(f"wrote {onnx_path} ({os.path.getsize(onnx_path)} bytes)")
    return 0 if acc >= MIN_ACCURACY else 1


if __name__ == "__main__":
    sys.exit(main())

"""Real models as their own ecosystems build and export them, generated on the fly (random weights: nothing can
be downloaded from a model hub, and weights do not change which operators an exporter writes).

    TORCHVISION                             name -> (input side, what it brings, constructor)
    torchvision_model(name, dir, dynamo)    torchvision's architecture through torch.onnx.export -> (path, input)
    ultralytics_model(cfg, dir, imgsz)      an Ultralytics YOLO built from its yaml, exported by Ultralytics' own
                                            exporter (`YOLO(cfg).export(format="onnx")`, its defaults) -> (path, input)
    transformer_encoder(dir)                a BERT-style torch.nn.TransformerEncoder -> (path, input)

Exports are cached per directory (the tests pass a session-wide one), so each model is exported once per run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

def _small_vit(tv):
    return tv.models.vision_transformer.VisionTransformer(image_size=96, patch_size=16, num_layers=2, num_heads=4,
                                                          hidden_dim=64, mlp_dim=128)


def _small_swin(tv):
    return tv.models.swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                                      num_heads=[2, 4], window_size=[4, 4])


def _swin_t_width16(tv):
    return tv.models.swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 6, 2],
                                                      num_heads=[1, 2, 4, 8], window_size=[7, 7])


def _small_convnext(tv):
    cfg = tv.models.convnext.CNBlockConfig
    return tv.models.convnext.ConvNeXt([cfg(32, 64, 2), cfg(64, None, 2)])


def _segmentation(name):
    return lambda tv: getattr(tv.models.segmentation, name)(weights=None, weights_backbone=None)


# name -> (input side, what the architecture brings, constructor; None: torchvision.models.get_model(name)).
# The transformers and ConvNeXt are torchvision's classes at a reduced width and depth: the same blocks, and
# the same exported operators, at a size a test suite can build.
TORCHVISION = {
    "mobilenet_v3_small": (224, "hard-swish, squeeze-excitation", None),
    "mobilenet_v3_large": (224, "hard-swish, squeeze-excitation, 5x5 depthwise", None),
    "efficientnet_b0": (224, "SiLU, squeeze-excitation, 5x5 depthwise", None),
    "shufflenet_v2_x0_5": (224, "channel shuffle (view/transpose), chunk", None),
    "regnet_y_400mf": (224, "grouped convs, squeeze-excitation", None),
    "regnet_x_400mf": (224, "grouped convs", None),
    "resnet50": (224, "bottleneck residuals", None),
    "resnext50_32x4d": (224, "32-group bottlenecks", None),
    "googlenet": (224, "inception branches, ceil-mode pooling", None),
    "squeezenet1_1": (224, "fire modules", None),
    "densenet121": (224, "dense concatenation", None),
    "inception_v3": (299, "factorized 1x7/7x1 convs", None),
    "convnext_tiny": (224, "7x7 depthwise, LayerNorm over channels, GELU, layer scale", None),
    "vit_b_16": (224, "patch embedding, class token, multi-head attention, GELU", None),
    "swin_t": (224, "shifted windows (roll), relative position bias", None),
    "convnext_small_width": (64, "ConvNeXt blocks at width 32/64", _small_convnext),
    "vit_small_width": (96, "ViT: 2 layers, 4 heads, width 64", _small_vit),
    "swin_small_width": (64, "Swin: 2 stages, window 4, width 32", _small_swin),
    "swin_t_width16": (224, "Swin-T's stages, depths and 7x7 windows at width 16", _swin_t_width16),
    "deeplabv3_mobilenet_v3_large": (320, "ASPP with dilated convs, image pooling, bilinear upsampling",
                                     _segmentation("deeplabv3_mobilenet_v3_large")),
    "lraspp_mobilenet_v3_large": (320, "lite R-ASPP head, sigmoid gating",
                                  _segmentation("lraspp_mobilenet_v3_large")),
}


def _torchvision():
    """Import torchvision, registering its two box-op schemas first where its C++ extension cannot load.

    The PyPI torchvision wheel's ops library links against the CUDA build of torch; beside the CPU build this
    project installs it does not load, and `import torchvision` then fails registering fake kernels for
    `torchvision::nms` and `torchvision::qnms` ("operator torchvision::nms does not exist"). The architectures
    are pure Python and never call those ops; registering their schemas (nms with a plain greedy kernel) is
    enough for the import to succeed."""
    import torch

    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for module in [m for m in sys.modules if m.startswith("torchvision")]:  # the half-done import
        del sys.modules[module]
    torch.library.define("torchvision::nms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torch.library.define("torchvision::qnms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    @torch.library.impl("torchvision::nms", "cpu")
    def _greedy_nms(dets, scores, iou_threshold):
        keep, order = [], scores.argsort(descending=True)
        area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
        while order.numel():
            i, rest = order[0], order[1:]
            keep.append(i)
            lt = torch.maximum(dets[i, :2], dets[rest, :2])
            rb = torch.minimum(dets[i, 2:], dets[rest, 2:])
            inter = (rb - lt).clamp(min=0).prod(1)
            order = rest[inter / (area[i] + area[rest] - inter) <= iou_threshold]
        return torch.stack(keep) if keep else torch.empty(0, dtype=torch.long)

    import torchvision
    return torchvision


def _realistic_init(model) -> None:
    """BN running statistics that are not the identity, so BN folding and calibration see what a trained net has,
    and no all-zero weights: torchvision zero-initializes some heads (ViT's classifier), which would make every
    output the bias and a comparison of outputs vacuous."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.any():
                torch.nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)


def torchvision_model(name: str, directory: Path, dynamo: bool = False) -> tuple[Path, np.ndarray]:
    """torchvision's `name` exported to directory (opset 17; dynamo=True: torch's default exporter, opset 18)."""
    side, _, construct = TORCHVISION[name]
    path = Path(directory) / f"{name}{'-dynamo' if dynamo else ''}.onnx"
    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    if not path.exists():
        import torch

        tv = _torchvision()
        torch.manual_seed(0)
        model = construct(tv) if construct else tv.models.get_model(name, weights=None)
        model.eval()
        _realistic_init(model)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.onnx.export(model, (torch.from_numpy(x),), str(tmp), opset_version=18 if dynamo else 17,
                          dynamo=dynamo, input_names=["x"], external_data=False)
        os.replace(tmp, path)
    return path, x


def ultralytics_model(cfg: str, directory: Path, imgsz: int = 320) -> tuple[Path, np.ndarray]:
    """An Ultralytics model built from its yaml (e.g. "yolov8n.yaml") and exported the way its users do.

    Ultralytics' exporter fuses BN, switches the head to its export form (anchors from the feature shapes,
    decoded boxes, class sigmoids concatenated into one output) and runs onnxslim, as `yolo export` does."""
    path = Path(directory) / f"{Path(cfg).stem}-{imgsz}.onnx"
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, imgsz, imgsz)).astype(np.float32)
    if not path.exists():
        os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
        os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(directory) / "ultralytics-config"))
        import torch

        _torchvision()
        from ultralytics import YOLO

        torch.manual_seed(0)
        model = YOLO(cfg)
        with contextlib.chdir(directory):
            written = Path(model.export(format="onnx", imgsz=imgsz, verbose=False))
        os.replace(Path(directory) / written, path)
    return path, x


def transformer_encoder(directory: Path, layers: int = 4, width: int = 256, heads: int = 4,
                        sequence: int = 128) -> tuple[Path, np.ndarray]:
    """A BERT-style encoder from torch.nn (post-norm layers, GELU feed-forward 4x wide) on embedded tokens
    [1, sequence, width]: attention as torch exports it (MatMul, Softmax, the head reshapes/transposes)."""
    path = Path(directory) / f"encoder-{layers}x{width}-seq{sequence}.onnx"
    x = np.random.default_rng(0).standard_normal((1, sequence, width)).astype(np.float32)
    if not path.exists():
        import torch

        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                 batch_first=True)
        model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
        tmp = path.with_name(f".{path.name}.tmp")
        torch.onnx.export(model, (torch.from_numpy(x),), str(tmp), opset_version=17, dynamo=False,
                          input_names=["x"], external_data=False)
        os.replace(tmp, path)
    return path, x

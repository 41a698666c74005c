"""Models as the ecosystem's exporters write them: torch modules that reproduce the blocks of real architectures,
exported with torch.onnx's TorchScript exporter (the one Ultralytics and PaddleOCR's paddle2onnx-era tools emit
the same forms as: shape arithmetic from Shape/Gather/Concat, Dropout, Identity-shared weights).

    EXPORTED                  name -> (module class, input shape, what it reproduces)
    export(name, directory)   the .onnx file (cached per directory) and a seeded input
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ChannelShuffle(nn.Module):
    """ShuffleNetV2 unit: split, branch, concat, then shuffle with view/transpose sizes read from x.size()."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.branch = nn.Sequential(
            nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(),
            nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2), nn.BatchNorm2d(c // 2),
            nn.Conv2d(c // 2, c // 2, 1), nn.ReLU())

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return F.dropout(x.mean([2, 3]), 0.2, self.training)


class YoloStyle(nn.Module):
    """Ultralytics' anchor-free head: SiLU convs, per-level grids built from the feature shapes (Shape -> Gather
    -> Range -> Concat in the export), boxes decoded against them, classes through a sigmoid."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.classes = classes
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU())
        self.c2 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.SiLU())
        self.h1, self.h2 = nn.Conv2d(32, 4 + classes, 1), nn.Conv2d(32, 4 + classes, 1)

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(f1)
        outs, anchors = [], []
        for f, head, stride in ((f1, self.h1, 4), (f2, self.h2, 8)):
            o = head(f)
            b, c, h, w = o.shape
            outs.append(o.view(b, c, -1))
            sy, sx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5,
                                    torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2) * stride)
        y = torch.cat(outs, 2)
        a = torch.cat(anchors, 0).transpose(0, 1).unsqueeze(0)
        box, cls = y.split((4, self.classes), 1)
        lt, rb = box.chunk(2, 1)
        return torch.cat((torch.cat((a - lt, a + rb), 1), cls.sigmoid()), 1)


class DBNetStyle(nn.Module):
    """PaddleOCR's DBNet text detector in miniature: hard-swish backbone, HardSigmoid squeeze-excitation, an FPN
    with nearest Resize, a ConvTranspose head (stride 2, output_padding, BN between) and a sigmoid map."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish())
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.se1, self.se2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.lateral = nn.Conv2d(32, 16, 1)
        self.up1, self.bn = nn.ConvTranspose2d(16, 8, 2, 2), nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 1, 3, 2, padding=1, output_padding=1)

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(f1)
        f2 = f2 * F.hardsigmoid(self.se2(F.relu(self.se1(f2.mean((2, 3), keepdim=True)))))
        p = F.interpolate(self.lateral(f2), scale_factor=2, mode="nearest") + f1
        return torch.sigmoid(self.up2(F.relu(self.bn(self.up1(p)))))


class CRNNNeck(nn.Module):
    """A text recognizer's neck: convs that keep the width, a reshape to (batch, width, features) computed from
    the feature shape, a per-column classifier and softmax."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 16, 3, (2, 1), 1), nn.ReLU(), nn.Conv2d(16, 16, 3, (2, 1), 1))
        self.fc = nn.Linear(16 * 8, 10)

    def forward(self, x):
        f = self.convs(x)
        b, c, h, w = f.shape
        return self.fc(f.permute(0, 3, 1, 2).reshape(b, w, c * h)).softmax(-1)


class DeepLabStyle(nn.Module):
    """torchvision's DeepLabV3-MobileNetV3 head in miniature: hard-swish/SE backbone, ASPP with dilated convs and
    an image-pooling branch upsampled back (bilinear Resize to a size read from the features), and the logits
    upsampled to the input size."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish(),
                                      nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.Hardswish())
        self.se1, self.se2 = nn.Conv2d(24, 8, 1), nn.Conv2d(8, 24, 1)
        self.branches = nn.ModuleList([nn.Conv2d(24, 16, 1)] + [nn.Conv2d(24, 16, 3, padding=r, dilation=r)
                                                                 for r in (2, 4)])
        self.pool = nn.Conv2d(24, 16, 1)
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        f = self.backbone(x)
        f = f * F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(f, 1)))))
        pooled = F.interpolate(F.relu(self.pool(F.adaptive_avg_pool2d(f, 1))), size=f.shape[-2:], mode="bilinear",
                               align_corners=False)
        f = self.project(torch.cat([F.relu(b(f)) for b in self.branches] + [pooled], 1))
        return F.interpolate(self.classifier(f), size=size, mode="bilinear", align_corners=False)


class CRNNLSTM(nn.Module):
    """A captcha / text-line CRNN: convs down to height 1, the width as time steps through a two-layer
    bidirectional LSTM (ONNX LSTM nodes with Transpose/Squeeze between them), a per-step classifier."""

    def __init__(self, classes: int = 11):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 16, 3, (2, 1), 1), nn.ReLU(), nn.Conv2d(16, 32, 3, (2, 1), 1), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d((1, None)))
        self.rnn = nn.LSTM(32, 24, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        f = self.convs(x).squeeze(2).permute(2, 0, 1)  # (width, batch, channels)
        y, _ = self.rnn(f)
        return self.fc(y).log_softmax(-1)


class GRUTagger(nn.Module):
    """A keyword-spotting / sequence tagger: a batch-first GRU over feature frames, the last state classified."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(20, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        y, h = self.gru(x)
        return self.fc(y.mean(1) + h[0])


EXPORTED = {
    "channel_shuffle": (ChannelShuffle, (1, 3, 32, 32), "torchvision ShuffleNetV2 (channel shuffle)"),
    "yolo_style": (YoloStyle, (1, 3, 64, 64), "Ultralytics YOLOv8 head (anchors from Shape/Range)"),
    "dbnet_style": (DBNetStyle, (1, 3, 64, 64), "PaddleOCR DBNet detector (ConvTranspose, Resize, HardSigmoid)"),
    "crnn_neck": (CRNNNeck, (1, 3, 32, 40), "PaddleOCR recognizer neck (Reshape to a computed shape)"),
    "deeplab_style": (DeepLabStyle, (1, 3, 48, 48), "torchvision DeepLabV3-MobileNetV3 (ASPP, bilinear Resize)"),
    "crnn_lstm": (CRNNLSTM, (1, 1, 16, 24), "captcha CRNN (conv + 2-layer bidirectional LSTM)"),
    "gru_tagger": (GRUTagger, (2, 12, 20), "sequence tagger (batch-first GRU)"),
}


def export(name: str, directory: Path) -> tuple[Path, np.ndarray]:
    """The model exported to directory/NAME.onnx (once per directory) and its seeded input."""
    cls, shape, _ = EXPORTED[name]
    path = Path(directory) / f"{name}.onnx"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if not path.exists():
        torch.manual_seed(0)
        model = cls().eval()
        for m in model.modules():  # batch norms with statistics that are not the identity
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        torch.onnx.export(model, (torch.from_numpy(x),), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"])
    return path, x

"""Small models for the QAT lab: `build_model(name, in_shape, n_classes, width=None) -> nn.Module`.

Weight layers are only nn.Linear / nn.Conv1d / nn.Conv2d (what `quantize_model` converts), and every model
defines its layers in execution order, so `model.modules()` lists the first layer first, the classifier last.
Convolutions followed by BatchNorm have no bias.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("mlp", "cnn1d", "cnn2d", "resnet20")


def _conv_bn(conv: type, c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    bn = nn.BatchNorm1d if conv is nn.Conv1d else nn.BatchNorm2d
    return [conv(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), bn(c_out), nn.ReLU(inplace=True)]


def mlp(in_shape: tuple[int, ...], n_classes: int, width: int = 256) -> nn.Module:
    """Flatten -> Linear(in, w) -> ReLU -> Linear(w, w) -> ReLU -> Linear(w, n_classes); no BatchNorm."""
    n_in = 1
    for d in in_shape:
        n_in *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, width), nn.ReLU(inplace=True),
                         nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, n_classes))


def cnn1d(in_shape: tuple[int, ...], n_classes: int, width: int = 32) -> nn.Module:
    """Three Conv1d-BN-ReLU blocks (k5, k3/s2, k3/s2) on (C, L) input, flatten, Linear."""
    c, length = in_shape
    for _ in range(2):  # two stride-2 convs with k=3, padding=1
        length = (length - 1) // 2 + 1
    return nn.Sequential(*_conv_bn(nn.Conv1d, c, width, 5), *_conv_bn(nn.Conv1d, width, width, 3, 2),
                         *_conv_bn(nn.Conv1d, width, width, 3, 2), nn.Flatten(),
                         nn.Linear(width * length, n_classes))


def cnn2d(in_shape: tuple[int, ...], n_classes: int, width: int = 32) -> nn.Module:
    """Three Conv2d-BN-ReLU blocks (w, 2w/s2, 4w/s2 channels) on (C, H, W), global avg pool, Linear."""
    c = in_shape[0]
    return nn.Sequential(*_conv_bn(nn.Conv2d, c, width, 3), *_conv_bn(nn.Conv2d, width, 2 * width, 3, 2),
                         *_conv_bn(nn.Conv2d, 2 * width, 4 * width, 3, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4 * width, n_classes))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (identity, or 1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()  # option B: projection only where stride / channels change
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)  # left operand first: shortcut runs last
        return F.relu(out)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3 stages x 3 BasicBlocks, 16/32/64 channels, option-B
    (1x1 conv + BN) projection shortcuts at the two downsampling blocks, global avg pool, Linear."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                blocks.append(BasicBlock(c, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(in_shape: tuple[int, ...], n_classes: int, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 with option-B shortcuts (~0.27M parameters at width 16, 10 classes)."""
    return ResNet20(in_shape[0], n_classes, width)


_BUILDERS = {"mlp": (mlp, None), "cnn1d": (cnn1d, 2), "cnn2d": (cnn2d, 3), "resnet20": (resnet20, 3)}
_SHAPE_DOC = {2: "(channels, length)", 3: "(channels, height, width)"}


def build_model(name: str, in_shape, n_classes: int, width: int | None = None) -> nn.Module:
    """Build model `name` for per-sample input shape `in_shape`; `width` overrides the base width."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    fn, ndim = _BUILDERS[name]
    try:
        shape = tuple(operator.index(d) for d in in_shape)
    except TypeError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"{name}: in_shape must be a non-empty tuple of positive ints, got {in_shape!r}")
    in_shape = shape
    if ndim is not None and len(in_shape) != ndim:
        raise ValueError(f"{name}: needs input shape {_SHAPE_DOC[ndim]}, got {in_shape} "
                         f"(pick a model that matches the dataset, e.g. mlp for flat inputs)")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"{name}: n_classes must be a positive int, got {n_classes!r}")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ValueError(f"{name}: width must be a positive int, got {width!r}")
    return fn(in_shape, n_classes) if width is None else fn(in_shape, n_classes, width)

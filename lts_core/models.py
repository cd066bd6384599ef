"""Small models for the QAT lab: `build_model(name, in_shape, n_classes, width=None) -> nn.Module`.

Weight layers are only nn.Linear / nn.Conv1d / nn.Conv2d (what `quantize_model` converts), and every model
defines its layers in execution order, so `model.modules()` lists the first layer first, the classifier last.
Convolutions followed by BatchNorm have no bias. Every module has a name that says what it is, so the layer
names a run records (`quantized_layers(model)`, module paths) read `fc1`, `conv2`, `layer2.0.conv1`,
`layer2.0.shortcut.conv`… rather than positions in a Sequential.
"""
from __future__ import annotations

import operator
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("mlp", "cnn1d", "cnn2d", "resnet20")
ARCH_VERSION = 2  # bumped when module names or shapes change (keys the trainer's cached FP checkpoints)


def _conv_bn(conv: type, i: int, c_in: int, c_out: int, k: int, stride: int = 1) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs conv<i>, bn<i>, relu<i> of one Conv-BN-ReLU block."""
    bn = nn.BatchNorm1d if conv is nn.Conv1d else nn.BatchNorm2d
    return [(f"conv{i}", conv(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)),
            (f"bn{i}", bn(c_out)), (f"relu{i}", nn.ReLU(inplace=True))]


def _named(*pairs) -> nn.Sequential:
    """A Sequential whose children have names (still indexable and iterable in order)."""
    return nn.Sequential(OrderedDict(pairs))


def mlp(in_shape: tuple[int, ...], n_classes: int, width: int = 256) -> nn.Module:
    """flatten -> fc1 Linear(in, w) -> ReLU -> fc2 Linear(w, w) -> ReLU -> fc3 Linear(w, n_classes); no BatchNorm."""
    n_in = 1
    for d in in_shape:
        n_in *= d
    return _named(("flatten", nn.Flatten()), ("fc1", nn.Linear(n_in, width)), ("relu1", nn.ReLU(inplace=True)),
                  ("fc2", nn.Linear(width, width)), ("relu2", nn.ReLU(inplace=True)),
                  ("fc3", nn.Linear(width, n_classes)))


def cnn1d(in_shape: tuple[int, ...], n_classes: int, width: int = 32) -> nn.Module:
    """Three Conv1d-BN-ReLU blocks conv1..conv3 (k5, k3/s2, k3/s2) on (C, L) input, flatten, Linear fc."""
    c, length = in_shape
    for _ in range(2):  # two stride-2 convs with k=3, padding=1
        length = (length - 1) // 2 + 1
    return _named(*_conv_bn(nn.Conv1d, 1, c, width, 5), *_conv_bn(nn.Conv1d, 2, width, width, 3, 2),
                  *_conv_bn(nn.Conv1d, 3, width, width, 3, 2), ("flatten", nn.Flatten()),
                  ("fc", nn.Linear(width * length, n_classes)))


def cnn2d(in_shape: tuple[int, ...], n_classes: int, width: int = 32) -> nn.Module:
    """Three Conv2d-BN-ReLU blocks conv1..conv3 (w, 2w/s2, 4w/s2 channels) on (C, H, W), global avg pool,
    Linear fc."""
    c = in_shape[0]
    return _named(*_conv_bn(nn.Conv2d, 1, c, width, 3), *_conv_bn(nn.Conv2d, 2, width, 2 * width, 3, 2),
                  *_conv_bn(nn.Conv2d, 3, 2 * width, 4 * width, 3, 2), ("pool", nn.AdaptiveAvgPool2d(1)),
                  ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * width, n_classes)))


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
            self.shortcut = _named(("conv", nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)),
                                   ("bn", nn.BatchNorm2d(c_out)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)  # left operand first: shortcut runs last
        return F.relu(out)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3 stages (layer1..layer3) x 3 BasicBlocks, 16/32/64
    channels, option-B (1x1 conv + BN) projection shortcuts at the two downsampling blocks, global avg pool,
    Linear fc."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        c = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(3):
                blocks.append(BasicBlock(c, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c = c_out
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
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

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

MODELS = ("mlp", "cnn1d", "cnn2d", "resnet20", "resnet18", "mobilenetv2", "transformer")
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


class ResNet(nn.Module):
    """ResNet for small inputs: a 3×3 stride-1 stem (conv1, bn1; no max-pool), stages layer1…layerK of
    BasicBlocks with widths w, 2w, 4w, … (stride 2 from layer2 on, option-B projection shortcuts where the
    shape changes), global average pool, Linear fc."""

    def __init__(self, in_channels: int, n_classes: int, width: int, stages: int, blocks: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        c = width
        self.stages = []
        for stage in range(stages):
            c_out = width * 2 ** stage
            layer = []
            for i in range(blocks):
                layer.append(BasicBlock(c, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c = c_out
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
            self.stages.append(f"layer{stage + 1}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(in_shape: tuple[int, ...], n_classes: int, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3 stages × 3 BasicBlocks, 16/32/64 channels, option-B
    shortcuts (~0.27M parameters at width 16, 10 classes)."""
    return ResNet(in_shape[0], n_classes, width, stages=3, blocks=3)


def resnet18(in_shape: tuple[int, ...], n_classes: int, width: int = 64) -> nn.Module:
    """ResNet-18 adapted to small inputs, as in the CIFAR experiments of LTS and most QAT papers: 4 stages ×
    2 BasicBlocks, 64/128/256/512 channels, 3×3 stride-1 stem without max-pool (11.2M parameters at width
    64, 10 classes; 11.0M weights in its 20 convolutions)."""
    return ResNet(in_shape[0], n_classes, width, stages=4, blocks=2)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand (1×1 conv, ×t channels; absent when t = 1) - BN - ReLU6, depthwise (3×3 conv,
    one filter per channel, stride s) - BN - ReLU6, project (1×1 conv, linear bottleneck) - BN; a residual
    connection when the stride is 1 and the channels stay."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int):
        super().__init__()
        hidden = c_in * t
        self.use_residual = stride == 1 and c_in == c_out
        if t != 1:
            self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
            self.bn_expand = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn_project = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = F.relu6(self.bn_expand(self.expand(x))) if hasattr(self, "expand") else x
        out = F.relu6(self.bn_depthwise(self.depthwise(out)))
        out = self.bn_project(self.project(out))
        return x + out if self.use_residual else out


# (expansion t, channels c, repeats n, stride s) of MobileNetV2 (Sandler et al. 2018, table 2), with the
# strides of small-input versions: the stem and the second stage keep stride 1 (32×32 → 4×4 at the end).
_MBV2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 adapted to small inputs: stem conv (3×3, stride 1), 17 inverted-residual blocks
    (blocks.<i>.expand / .depthwise / .project), head conv (1×1 to 1280 channels), global average pool,
    Linear fc. `width` is the stem's channel count (32 in the paper); every layer scales with width/32."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 32):
        super().__init__()

        def ch(c: int) -> int:
            return max(1, int(round(c * width / 32)))

        self.conv1 = nn.Conv2d(in_channels, ch(32), 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch(32))
        blocks, c = [], ch(32)
        for t, c_out, n, s in _MBV2:
            for i in range(n):
                blocks.append(InvertedResidual(c, ch(c_out), s if i == 0 else 1, t))
                c = ch(c_out)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c, ch(1280), 1, bias=False)
        self.bn_head = nn.BatchNorm2d(ch(1280))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch(1280), n_classes)

    def forward(self, x):
        x = self.blocks(F.relu6(self.bn1(self.conv1(x))))
        x = F.relu6(self.bn_head(self.head(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mobilenetv2(in_shape: tuple[int, ...], n_classes: int, width: int = 32) -> nn.Module:
    """MobileNetV2 adapted to small inputs (2.2M parameters at width 32, 10 classes; the oscillation paper's
    depthwise layers are `blocks.<i>.depthwise`)."""
    return MobileNetV2(in_shape[0], n_classes, width)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Linear projections q, k, v and out (all quantizable)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"transformer: width {d} must be a multiple of the {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer: x + attn(LN(x)), then x + mlp(LN(x)) with mlp = fc1 - GELU - fc2."""

    def __init__(self, d: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_ratio * d)
        self.fc2 = nn.Linear(mlp_ratio * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    """A small Transformer encoder for sequences (tokens, features): Linear token embedding `embed`, learned
    position embedding, `depth` pre-norm encoder layers (layers.<i>.attn.q/k/v/out, layers.<i>.fc1/fc2), final
    LayerNorm, mean over tokens, Linear classifier `head`. Every weight layer is an nn.Linear, so all of them
    are quantized (first and last as quantize_model's first_last_bits says)."""

    def __init__(self, tokens: int, features: int, n_classes: int, width: int = 64, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        heads = min(heads, width)
        while width % heads:
            heads -= 1
        self.embed = nn.Linear(features, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        x = self.layers(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


def transformer(in_shape: tuple[int, ...], n_classes: int, width: int = 64) -> nn.Module:
    """Transformer encoder (2 layers, 4 heads, MLP ×4) on (tokens, features) inputs, e.g. the `mnist1d-seq`
    dataset (10 tokens of 4 samples); 0.10M weights at width 64."""
    tokens, features = in_shape
    if tokens < 2:
        raise ValueError(f"transformer: needs a sequence of at least 2 tokens (tokens, features), got "
                         f"{in_shape} (e.g. --dataset mnist1d-seq)")
    return Transformer(tokens, features, n_classes, width)


_BUILDERS = {"mlp": (mlp, None), "cnn1d": (cnn1d, 2), "cnn2d": (cnn2d, 3), "resnet20": (resnet20, 3),
             "resnet18": (resnet18, 3), "mobilenetv2": (mobilenetv2, 3), "transformer": (transformer, 2)}
_SHAPE_DOC = {"cnn1d": "(channels, length)", "transformer": "(tokens, features)"}


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
        raise ValueError(f"{name}: needs input shape {_SHAPE_DOC.get(name, '(channels, height, width)')}, "
                         f"got {in_shape} "
                         f"(pick a model that matches the dataset, e.g. mlp for flat inputs)")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"{name}: n_classes must be a positive int, got {n_classes!r}")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ValueError(f"{name}: width must be a positive int, got {width!r}")
    return fn(in_shape, n_classes) if width is None else fn(in_shape, n_classes, width)

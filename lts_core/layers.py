"""Quantized Linear / Conv1d / Conv2d layers, model conversion and per-layer FLOPs.

`quantized_layers(model)` fixes the order (module registration order) that defines the flat weight index
shared by the freezing rules, the recorder and the run store.
"""
from __future__ import annotations

import torch
from torch import nn

from .channel_grad import ChannelPlan, ConvSpec, planned_conv, planned_linear, planned_quantize
from .quantizers import ActivationQuantizer, WeightQuantizer, make_weight_quantizer

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _QuantMixin:
    """Adds weight_quantizer / act_quantizer to a torch layer; `flops` = forward FLOPs per sample.

    `channel_plan` (a `channel_grad.ChannelPlan`, set by a freezing rule with `bound_grad="active"`; None =
    dense backward) makes the backward pass compute the weight gradient of the active output channels only.
    """

    weight_quantizer: WeightQuantizer
    act_quantizer: ActivationQuantizer | None
    channel_plan: ChannelPlan | None = None

    def _setup(self, wq: WeightQuantizer, aq: ActivationQuantizer | None) -> None:
        self.weight_quantizer = wq
        self.act_quantizer = aq
        self.channel_plan = None
        wq.init_from(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        return planned_quantize(self.weight_quantizer, self.weight, self.channel_plan)

    def _maybe_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quantizer is None else self.act_quantizer(x)

    @classmethod
    def from_float(cls, mod: nn.Module, wq: WeightQuantizer, aq: ActivationQuantizer | None = None):
        """Copy an ordinary torch layer (weights, bias, hyper-parameters) into its quantized version."""
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        new._modules = dict(mod._modules)
        new._setup(wq.to(mod.weight.device), aq)
        return new


class QLinear(_QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return planned_linear(self._maybe_quantize_input(x), self.quantized_weight(), self.bias, self.channel_plan)


class _QConv(_QuantMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._maybe_quantize_input(x), self.quantized_weight()
        spec = ConvSpec.of(self) if self.channel_plan is not None else None
        if spec is None:   # no plan, or a convolution the planned backward does not cover: dense backward
            return self._conv_forward(x, w, self.bias)
        return planned_conv(x, w, self.bias, spec, self.channel_plan)


class QConv1d(_QConv, nn.Conv1d):
    pass


class QConv2d(_QConv, nn.Conv2d):
    pass


_QCLASS = {nn.Linear: QLinear, nn.Conv1d: QConv1d, nn.Conv2d: QConv2d}


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All Linear/Conv1d/Conv2d modules (quantized or not) in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantized layers in registration order; this order defines the flat weight index."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantMixin)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, bits: int = 2, method: str = "liq", act_bits: int | None = None,
                   first_last_bits: int | None = None, output: str = "denorm",
                   example_input: torch.Tensor | None = None) -> nn.Module:
    """Convert every Linear/Conv1d/Conv2d of `model` (in place) into its quantized version.

    bits: weight bits of the hidden layers (1..8; method 'ternary' uses 3 levels).
    first_last_bits: None keeps the first and last layers in full precision (common practice);
    an int quantizes them at that precision. act_bits: None leaves activations in full precision.
    example_input: a batch used to measure per-layer forward FLOPs (`layer.flops`).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if first_last_bits is not None and not 1 <= first_last_bits <= 8:
        raise ValueError(f"first_last_bits must be in 1..8 or None, got {first_last_bits}")
    layers = weight_layers(model)
    if not layers:
        raise ValueError("the model has no Linear/Conv1d/Conv2d layer to quantize")
    for i, (name, mod) in enumerate(layers):
        edge = i == 0 or i == len(layers) - 1
        if isinstance(mod, _QuantMixin):
            continue
        if edge and len(layers) > 2 and first_last_bits is None:
            continue
        b = first_last_bits if (edge and len(layers) > 2) else bits
        wq = make_weight_quantizer(method if b == bits else "liq", b, output)
        aq = ActivationQuantizer(act_bits) if (act_bits is not None and i > 0) else None
        _set_submodule(model, name, _QCLASS[type(mod)].from_float(mod, wq, aq))
    if example_input is not None:
        measure_flops(model, example_input)
    return model


@torch.no_grad()
def measure_flops(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Forward FLOPs per sample (2 × multiply-adds) of every Linear/Conv layer, from one forward pass.

    Sets `module.flops` on each layer and returns {name: flops}. The model's training mode is preserved.
    """
    found: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            per_sample_out = out[0].numel()  # outputs of one sample
            if isinstance(mod, nn.Linear):
                macs = per_sample_out * mod.in_features
            else:
                k = mod.weight[0].numel()  # (in_channels / groups) · prod(kernel)
                macs = per_sample_out * k
            found[name] = 2 * int(macs)
            mod.flops = found[name]
        return fn

    for name, mod in weight_layers(model):
        hooks.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found

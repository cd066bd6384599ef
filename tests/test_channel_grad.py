"""The planned backward (lts_core.channel_grad): weight gradients of the active output channels only.

Reference: dense autograd on the same layer, with the frozen part of the weight gradient zeroed afterwards (what
a freezing rule without a plan computes). Input gradients must be bit-identical; active weight gradients are
bit-identical for Linear (the same GEMM on fewer rows sums in the same order), and for convolutions within
2e-5 relative (absolute floor 1e-6 × the largest gradient): the weight-gradient convolution on fewer filters is
blocked differently by the CPU kernels (the same terms summed in another order), which moves the last bits only.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lts_core import channel_grad
from lts_core.channel_grad import ChannelPlan, plan_from_frozen
from lts_core.layers import QConv1d, QConv2d, QLinear
from lts_core.quantizers import LearnedIntervalQuantizer


def _layer(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "linear":
        mod, cls = nn.Linear(12, 10, **kw), QLinear
    elif kind == "conv1d":
        mod, cls = nn.Conv1d(8, 12, 3, **kw), QConv1d
    else:
        mod, cls = nn.Conv2d(8, 12, 3, **kw), QConv2d
    return cls.from_float(mod, LearnedIntervalQuantizer(bits=2))


def _input(kind: str, layer):
    torch.manual_seed(1)
    c = getattr(layer, "in_channels", 0)
    shape = {"linear": (6, 12), "conv1d": (4, c, 11), "conv2d": (3, c, 9, 7)}[kind]
    return torch.randn(*shape, requires_grad=True)


def _close(a, b):
    """Equal up to float32 summation order (module docstring)."""
    torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6 * float(b.abs().max()))


def _grads(layer, x, plan):
    layer.channel_plan = plan
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    torch.manual_seed(2)
    out = layer(x)
    out.backward(torch.randn_like(out))
    g = {n: (None if p.grad is None else p.grad.clone()) for n, p in layer.named_parameters()}
    return x.grad.clone(), g


CASES = [("linear", {}), ("linear", {"bias": False}), ("conv1d", {"stride": 2, "padding": 1}),
         ("conv2d", {"stride": 2, "padding": 1, "bias": False}), ("conv2d", {"padding": 2, "dilation": 2}),
         ("conv2d", {"groups": 4, "padding": 1}), ("conv1d", {"groups": 2, "stride": 3})]


@pytest.fixture(params=[1, 64], ids=["gather", "dense-call"])
def conv_block(request, monkeypatch):
    """The convolution path under test: block 1 gathers the active filters whenever one is frozen; block 64
    (more than any test layer's filters) makes dense autograd's one call and zeroes the frozen filters."""
    monkeypatch.setattr(channel_grad, "CONV_CHANNEL_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(f'{a}{b}' for a, b in kw.items())}" for k, kw in CASES])
def test_active_channel_gradients_equal_the_masked_dense_computation(kind, kw, conv_block):
    layer = _layer(kind, **kw)
    x = _input(kind, layer)
    frozen = torch.zeros_like(layer.weight, dtype=torch.bool)
    frozen[[1, 4, 5, 9]] = True                 # whole channels frozen (granularity "channel")
    gx_d, g_d = _grads(layer, x, None)
    gx_p, g_p = _grads(layer, x, plan_from_frozen(frozen, per_weight=False))
    assert torch.equal(gx_p, gx_d)              # the input gradient is exact
    if layer.bias is not None:
        assert torch.equal(g_p["bias"], g_d["bias"])
    wd = g_d["weight"].masked_fill(frozen, 0.0)
    assert torch.equal(g_p["weight"][frozen], torch.zeros_like(wd[frozen]))
    _close(g_p["weight"], wd)
    if kind == "linear" or (conv_block > 12 and kw.get("groups", 1) == 1):
        assert torch.equal(g_p["weight"], wd)   # the same GEMM on fewer rows, or the dense call: bit for bit


def test_conv_gathers_only_when_a_block_of_filters_drops_out(monkeypatch):
    """With blocks of 16 filters: 16 of 32 active gathers them (one weight-gradient call on 16 filters beside the
    input gradient's); 17 of 32, or 8 of 16, make dense autograd's single call for both gradients."""
    monkeypatch.setattr(channel_grad, "CONV_CHANNEL_BLOCK", 16)
    assert channel_grad.conv_gather_pays(16, 32, 16) and not channel_grad.conv_gather_pays(17, 32, 16)
    assert not channel_grad.conv_gather_pays(1, 16, 16) and channel_grad.conv_gather_pays(3, 4, 1)
    real_cb = torch.ops.aten.convolution_backward
    for c, n_frozen, calls_expected in ((32, 16, [(False, True, False, 16), (True, False, False, 32)]),
                                        (32, 15, [(True, True, False, 32)]), (16, 8, [(True, True, False, 16)])):
        torch.manual_seed(0)
        layer = QConv2d.from_float(nn.Conv2d(4, c, 3, padding=1, bias=False), LearnedIntervalQuantizer(bits=2))
        x = torch.randn(2, 4, 6, 6, requires_grad=True)
        frozen = torch.zeros_like(layer.weight, dtype=torch.bool)
        frozen[torch.randperm(c)[:n_frozen]] = True
        seen = []

        def cb(*args):
            seen.append((*args[-1], args[2].shape[0]))
            return real_cb(*args)

        monkeypatch.setattr(torch.ops.aten, "convolution_backward", cb)
        gx_p, g_p = _grads(layer, x, plan_from_frozen(frozen, per_weight=False))
        monkeypatch.setattr(torch.ops.aten, "convolution_backward", real_cb)
        assert sorted(seen) == sorted(calls_expected)
        gx_d, g_d = _grads(layer, x, None)
        assert torch.equal(gx_p, gx_d)
        _close(g_p["weight"], g_d["weight"].masked_fill(frozen, 0.0))


def test_per_weight_mask_removes_frozen_weights_from_the_bound_gradient():
    """bound_grad="active" with per-weight freezing: frozen weights inside active rows contribute nothing to
    the bounds' gradient, i.e. it equals dense autograd with the gradient of ŵ masked before the quantizer."""
    layer = _layer("linear")
    x = _input("linear", layer)
    torch.manual_seed(3)
    frozen = torch.rand_like(layer.weight) < 0.5
    frozen[2] = True                             # one whole row too
    plan = plan_from_frozen(frozen, per_weight=True)
    assert 2 not in plan.active.tolist() and plan.n_active == 9
    _, g_p = _grads(layer, x, plan)
    # reference: mask the gradient of ŵ with a hook, the rest by ordinary autograd
    layer.channel_plan = None
    for p in layer.parameters():
        p.grad = None
    w_hat = layer.weight_quantizer(layer.weight)
    w_hat.register_hook(lambda g: g.masked_fill(frozen, 0.0))
    torch.manual_seed(2)
    out = torch.nn.functional.linear(x, w_hat, layer.bias)
    out.backward(torch.randn_like(out))
    for n in ("weight", "weight_quantizer.lower", "weight_quantizer.upper"):
        p = layer.get_parameter(n)
        torch.testing.assert_close(g_p[n], p.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(g_p["weight"][frozen], torch.zeros(int(frozen.sum())))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fully_frozen_layer_computes_no_weight_gradient(kind, monkeypatch):
    """Every channel frozen: no weight-gradient GEMM / convolution runs, and neither the weight nor the
    bounds receive a gradient (the quantizer's backward does not run)."""
    layer = _layer(kind, **({"padding": 1} if kind == "conv2d" else {}))
    x = _input(kind, layer)
    calls = {"mm": 0, "conv_w": 0}
    real_mm, real_cb = torch.Tensor.mm, torch.ops.aten.convolution_backward

    def mm(a, b):
        calls["mm"] += 1
        return real_mm(a, b)

    def cb(*args):
        calls["conv_w"] += bool(args[-1][1])     # output_mask[1]: the weight gradient was asked for
        return real_cb(*args)

    monkeypatch.setattr(torch.Tensor, "mm", mm)
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", cb)
    frozen = torch.ones_like(layer.weight, dtype=torch.bool)
    gx, g = _grads(layer, x, plan_from_frozen(frozen, per_weight=False))
    assert calls == ({"mm": 1, "conv_w": 0} if kind == "linear" else {"mm": 0, "conv_w": 0})  # input grad only
    assert g["weight"] is None and g["weight_quantizer.lower"] is None and g["weight_quantizer.upper"] is None
    gx_d, _ = _grads(layer, x, None)
    assert torch.equal(gx, gx_d)


def test_fully_frozen_layer_gives_zeros_when_asked_ddp():
    layer = _layer("linear")
    x = _input("linear", layer)
    frozen = torch.ones_like(layer.weight, dtype=torch.bool)
    _, g = _grads(layer, x, plan_from_frozen(frozen, per_weight=False, none_when_frozen=False))
    assert torch.equal(g["weight"], torch.zeros_like(layer.weight))


def test_depthwise_conv_computes_only_active_filters(monkeypatch):
    """groups = channels: the weight-gradient convolution runs on the active filters only."""
    torch.manual_seed(0)
    layer = QConv2d.from_float(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), LearnedIntervalQuantizer(bits=2))
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    frozen = torch.zeros_like(layer.weight, dtype=torch.bool)
    frozen[[0, 2, 3]] = True
    seen = []
    real_cb = torch.ops.aten.convolution_backward

    def cb(*args):
        if args[-1][1]:
            seen.append(tuple(args[2].shape))
        return real_cb(*args)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", cb)
    _, g_p = _grads(layer, x, plan_from_frozen(frozen, per_weight=False))
    assert seen == [(3, 1, 3, 3)]
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", real_cb)
    _, g_d = _grads(layer, x, None)
    _close(g_p["weight"], g_d["weight"].masked_fill(frozen, 0.0))


def test_no_plan_and_no_grad_paths_are_the_dense_layer():
    layer = _layer("conv2d", padding=1)
    x = _input("conv2d", layer)
    frozen = torch.zeros_like(layer.weight, dtype=torch.bool)
    frozen[0] = True
    with torch.no_grad():
        ref = layer(x)
        layer.channel_plan = plan_from_frozen(frozen, per_weight=False)
        assert torch.equal(layer(x), ref)
    assert torch.equal(layer(x), ref)            # the planned forward is the same convolution
    assert isinstance(layer.channel_plan, ChannelPlan)


@pytest.mark.parametrize("kind,quant", [("linear", dict(output="denorm")), ("linear", dict(output="unit")),
                                        ("conv2d", dict(output="unit")),
                                        ("linear", dict(bits=2, n_levels=3, symmetric=True))])
@pytest.mark.parametrize("per_weight", [False, True])
def test_active_rows_quantizer_backward_equals_autograds_chain(kind, quant, per_weight):
    """With a plan, the learned-interval quantizer runs its backward on the active rows only
    (ActiveIntervalQuantize): ŵ and the remembered measurement are bit-identical, the weight's and the bounds'
    gradients equal autograd's chain over the same masked gradient of ŵ within float32 summation order."""
    from lts_core.channel_grad import ActiveConv, ActiveLinear, ConvSpec
    torch.manual_seed(0)
    mod = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
    layer = (QLinear if kind == "linear" else QConv2d).from_float(mod, LearnedIntervalQuantizer(**quant))
    layer.weight_quantizer.remember_forward = True
    x = _input(kind, layer)
    frozen = torch.zeros_like(layer.weight, dtype=torch.bool)
    frozen[[1, 4]] = True
    if per_weight:
        frozen |= torch.rand_like(layer.weight) < 0.3
    plan = plan_from_frozen(frozen, per_weight=per_weight)
    _, g_fused = _grads(layer, x, plan)
    fused_seen = layer.weight_quantizer.measure_norm(layer.weight)
    # reference: autograd's chain through the quantizer module, then the same planned GEMM
    for p in layer.parameters():
        p.grad = None
    w_hat = layer.weight_quantizer(layer.weight)
    layer.channel_plan = plan
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), w_hat)
    torch.manual_seed(2)
    if kind == "linear":
        out = ActiveLinear.apply(x, w_hat, layer.bias, plan)
    else:
        out = ActiveConv.apply(x, w_hat, layer.bias, ConvSpec.of(layer), plan)
    out.backward(torch.randn_like(out))
    for n, p in layer.named_parameters():
        if p.grad is None:
            assert g_fused[n] is None
            continue
        _close(g_fused[n], p.grad)
    assert all(torch.equal(a, b) for a, b in zip(fused_seen, layer.weight_quantizer.measure_norm(layer.weight)))
    assert torch.equal(g_fused["weight"][frozen], torch.zeros(int(frozen.sum())))

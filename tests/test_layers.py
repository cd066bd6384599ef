"""Quantized layers, model conversion and FLOP measurement."""
import pytest
import torch
from torch import nn

from lts_core.layers import QConv1d, QConv2d, QLinear, measure_flops, quantize_model, quantized_layers, weight_layers
from lts_core.models import build_model


def test_resnet20_conversion_keeps_first_last_fp_by_default():
    m = build_model("resnet20", (3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
    ref = m.eval()(x)
    quantize_model(m, bits=2, example_input=x)
    layers = weight_layers(m)
    q = quantized_layers(m)
    assert not isinstance(layers[0][1], QConv2d) and not isinstance(layers[-1][1], QLinear)
    assert len(q) == len(layers) - 2 and all(isinstance(l, QConv2d) for _, l in q)
    out = m(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)  # quantization changes the function
    # first conv: 3→16, 3x3, 32x32 output: 2·16·32·32·27 FLOPs per sample
    assert layers[0][1].flops == 2 * 16 * 32 * 32 * 27
    assert layers[-1][1].flops == 2 * 64 * 10


def test_first_last_bits_and_conv1d():
    m = build_model("cnn1d", (1, 40), 10)
    quantize_model(m, bits=2, first_last_bits=8, example_input=torch.randn(2, 1, 40))
    q = quantized_layers(m)
    assert isinstance(q[0][1], QConv1d) and q[0][1].weight_quantizer.bits == 8
    assert q[-1][1].weight_quantizer.bits == 8
    assert all(l.weight_quantizer.bits == 2 for _, l in q[1:-1])
    assert m(torch.randn(3, 1, 40)).shape == (3, 10)


def test_conversion_preserves_weights_and_trains():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), lin, nn.ReLU(), nn.Linear(8, 2))
    w = lin.weight.detach().clone()
    quantize_model(m, bits=3, method="lsq")
    ql = m[2]
    assert isinstance(ql, QLinear) and torch.equal(ql.weight, w) and ql.weight_quantizer.kind == "lsq"
    m(torch.randn(5, 4)).sum().backward()
    assert ql.weight.grad is not None and ql.weight_quantizer.step.grad is not None


def test_activation_quantization_calibrates_on_first_training_batch():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    quantize_model(m, bits=2, act_bits=2)
    aq = m[2].act_quantizer
    assert aq is not None and not bool(aq.initialized)
    m.train()
    h = torch.relu(m[0](torch.randn(64, 4)))
    out = aq(h)
    assert bool(aq.initialized)
    assert out.unique().numel() <= 4  # 2-bit activations take at most 4 values


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="bits"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), bits=9)
    with pytest.raises(ValueError, match="no Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_measure_flops_linear_exact():
    m = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    assert measure_flops(m, torch.randn(4, 10)) == {"0": 400, "2": 120}

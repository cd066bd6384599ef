"""Models: output shapes for each dataset shape, layer order, ResNet-20 size, errors."""
import pytest
import torch
import torch.nn as nn

from lts_core.models import MODELS, build_model

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@pytest.mark.parametrize("name,in_shape", [("mlp", (64,)), ("mlp", (1, 28, 28)), ("cnn1d", (1, 40)),
                                           ("cnn1d", (3, 37)), ("cnn2d", (1, 28, 28)), ("cnn2d", (3, 32, 32)),
                                           ("resnet20", (3, 32, 32)), ("resnet20", (1, 28, 28)),
                                           ("resnet18", (3, 32, 32)), ("mobilenetv2", (3, 32, 32)),
                                           ("mobilenetv2", (1, 28, 28)), ("transformer", (10, 4))])
def test_forward_shape(name, in_shape):
    torch.manual_seed(0)
    small = {"resnet18": 4, "mobilenetv2": 4}   # tiny widths keep the test fast; the layout is the same
    model = build_model(name, in_shape, n_classes=7, width=small.get(name))
    out = model(torch.randn(4, *in_shape))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.sum().backward()  # trains end to end
    layers = [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 7  # classifier last
    assert layers[0].weight.shape[1] in (in_shape[0], in_shape[-1], 64, 784)  # first layer first
    assert all(type(m) in WEIGHT_LAYERS for m in layers)


def test_modules_follow_execution_order():
    model = build_model("resnet20", (3, 32, 32), 10)
    ran = []
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS):
            m.register_forward_hook(lambda mod, i, o: ran.append(mod))
    model(torch.randn(2, 3, 32, 32))
    assert ran == [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    assert len(ran) == 19 + 2 + 1  # 19 3x3 convs, 2 shortcut projections, 1 classifier


def test_mlp_layout_and_width():
    model = build_model("mlp", (64,), 10, width=32)
    assert [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)] == [(32, 64), (32, 32), (10, 32)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name,in_shape,n_weight_layers", [("resnet18", (3, 32, 32), 17 + 3 + 1),
                                                           ("mobilenetv2", (3, 32, 32), 1 + 16 * 3 + 2 + 1 + 1),
                                                           ("transformer", (10, 4), 1 + 2 * 6 + 1)])
def test_new_models_run_their_layers_in_module_order(name, in_shape, n_weight_layers):
    model = build_model(name, in_shape, 10, width=8)
    ran = []
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS):
            m.register_forward_hook(lambda mod, i, o: ran.append(mod))
    model(torch.randn(2, *in_shape))
    assert ran == [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    assert len(ran) == n_weight_layers


def test_paper_architectures_sizes():
    # ResNet-18, small-input version (3x3 stem, no max-pool), option-B shortcuts, no conv bias:
    #   stem 3*64*9 + 128 = 1,856; stage 1: 2*(2*64*64*9 + 2*128) = 147,968
    #   stages 2-4 (c -> 2c): (c*2c*9 + 2c*2c*9 + 2*4c + c*2c + 4c) + (2*2c*2c*9 + 2*4c)
    #     c=64: 230,144 + 295,424 = 525,568;  c=128: 919,040 + 1,180,672 = 2,099,712
    #     c=256: 3,673,088 + 4,720,640 = 8,393,728;  fc 512*10 + 10 = 5,130      total 11,173,962
    assert sum(p.numel() for p in build_model("resnet18", (3, 32, 32), 10).parameters()) == 11_173_962
    mb = build_model("mobilenetv2", (3, 32, 32), 10)
    assert 2_200_000 < sum(p.numel() for p in mb.parameters()) < 2_300_000   # 2.24M (3.5M with 1000 classes)
    dw = [m for n, m in mb.named_modules() if n.endswith(".depthwise")]
    assert len(dw) == 17 and all(m.groups == m.in_channels == m.out_channels for m in dw)
    # stride 1 stem and second stage: a 32x32 input leaves the blocks at 4x4
    assert mb.blocks(mb.conv1(torch.randn(1, 3, 32, 32))).shape[-2:] == (4, 4)
    tr = build_model("transformer", (10, 4), 10)
    assert sum(m.weight.numel() for m in tr.modules() if isinstance(m, nn.Linear)) == 4 * 64 + 2 * 12 * 64 * 64 + 640


def test_resnet20_parameter_count():
    # option B, no conv bias; conv weights k*k*c_in*c_out, BN 2*c (weight+bias):
    #   stem      3*16*9 + 32                                        =     464
    #   stage 1   3 * (2*16*16*9 + 2*32)                             =  14,016
    #   stage 2   (16*32*9 + 32*32*9 + 2*64 + 16*32 + 64)            =  14,528
    #             + 2 * (2*32*32*9 + 2*64)                           =  37,120
    #   stage 3   (32*64*9 + 64*64*9 + 2*128 + 32*64 + 128)          =  57,728
    #             + 2 * (2*64*64*9 + 2*128)                          = 147,968
    #   fc        64*10 + 10                                         =     650
    #   total                                                        = 272,474
    model = build_model("resnet20", (3, 32, 32), 10)
    n = sum(p.numel() for p in model.parameters())
    assert n == 272_474 and 260_000 <= n <= 280_000


def test_cnn1d_is_small():
    model = build_model("cnn1d", (1, 40), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(5, 1), (3, 2), (3, 2)]
    assert model[-1].in_features == 32 * 10  # 40 -> 20 -> 10
    assert sum(p.numel() for p in model.parameters()) < 20_000


def test_errors():
    assert MODELS == ("mlp", "cnn1d", "cnn2d", "resnet20", "resnet18", "mobilenetv2", "transformer")
    with pytest.raises(ValueError, match="unknown model 'vgg'.*mlp, cnn1d, cnn2d, resnet20, resnet18"):
        build_model("vgg", (64,), 10)
    with pytest.raises(ValueError, match=r"cnn2d: needs input shape \(channels, height, width\), got \(64,\)"):
        build_model("cnn2d", (64,), 10)
    with pytest.raises(ValueError, match=r"cnn1d: needs input shape \(channels, length\)"):
        build_model("cnn1d", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="resnet20: needs input shape"):
        build_model("resnet20", (1, 40), 10)
    with pytest.raises(ValueError, match=r"transformer: needs input shape \(tokens, features\)"):
        build_model("transformer", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="at least 2 tokens.*mnist1d-seq"):
        build_model("transformer", (1, 40), 10)
    with pytest.raises(ValueError, match="n_classes"):
        build_model("mlp", (64,), 0)
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", (64,), 10, width=0)
    with pytest.raises(ValueError, match="in_shape"):
        build_model("mlp", (0,), 10)


def test_layer_names_are_module_paths():
    from lts_core import quantize_model, quantized_layers

    def names(name, shape, **kw):
        return [n for n, _ in quantized_layers(quantize_model(build_model(name, shape, 10, width=8), **kw))]

    assert names("mlp", (64,), first_last_bits=4) == ["fc1", "fc2", "fc3"]
    assert names("cnn1d", (1, 40)) == ["conv2", "conv3"]  # first and last layers stay full precision
    assert names("cnn2d", (3, 32, 32), first_last_bits=8) == ["conv1", "conv2", "conv3", "fc"]
    assert names("transformer", (10, 4))[:4] == ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v",
                                                  "layers.0.attn.out"]
    mb = names("mobilenetv2", (3, 32, 32))
    assert mb[:3] == ["blocks.0.depthwise", "blocks.0.project", "blocks.1.expand"] and mb[-1] == "head"
    r = names("resnet20", (3, 32, 32))
    assert r[:2] == ["layer1.0.conv1", "layer1.0.conv2"] and "layer2.0.shortcut.conv" in r
    assert r[-1] == "layer3.2.conv2" and len(r) == 20

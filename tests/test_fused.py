"""The fused quantizer and rule path (`lts_core.fused`) against the unfused reference path (`use_fused(False)`):
the same bits for ŵ, the weight and bound gradients and the measurement, and identical rule decisions on seeded
training runs (every weight's freeze step, every weight after training)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lts_core import LTSRule, quantize_model, quantized_layers
from lts_core.fused import (IntervalQuantize, compile_enabled, compile_unavailable, fused_enabled, set_compile, set_fused,
                            use_compile, use_fused)
from lts_core.quantizers import make_weight_quantizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float32 tensor (so that +0 and −0, or two NaNs, are told apart)."""
    return t.detach().contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _quantize_and_grad(q, w0, use, consume):
    """ŵ, ∂/∂w, ∂/∂lower, ∂/∂upper of `consume(ŵ)` with the fused path on or off."""
    w = w0.clone().requires_grad_()
    for p in q.parameters():
        p.grad = None
    with use_fused(use):
        w_hat = q(w)
        consume(w_hat).backward()
    lower = q.lower.grad.clone() if q.lower.grad is not None else None
    return w_hat.detach(), w.grad.clone(), lower, q.upper.grad.clone()


CASES = [("liq", 1, "denorm"), ("liq", 2, "denorm"), ("liq", 4, "denorm"), ("liq", 2, "unit"),
         ("liq", 8, "unit"), ("ternary", 2, "denorm"), ("ternary", 2, "unit")]


@pytest.mark.parametrize("method,bits,output", CASES)
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_fused_quantizer_bit_identical_to_autograd_chain(method, bits, output, layer):
    """ŵ and all three gradients carry the same bits as autograd's chain through a real layer's backward (the
    Linear's weight gradient arrives transposed in memory, the convolution's contiguous)."""
    torch.manual_seed(bits * 7 + len(output) + len(layer))
    q = make_weight_quantizer(method, bits, output)
    shape = (96, 130) if layer == "linear" else (24, 12, 3, 3)
    w0 = torch.randn(shape) * 0.05
    q.init_from(w0 * 0.6)          # narrower bounds: many weights outside [l, u], where the clamp's mask matters
    inp = torch.randn(33, 130) if layer == "linear" else torch.randn(5, 12, 9, 9)

    def consume(w_hat):
        out = F.linear(inp, w_hat) if layer == "linear" else F.conv2d(inp, w_hat, padding=1)
        return (out.sin() * 3).sum()

    ref = _quantize_and_grad(q, w0, False, consume)
    got = _quantize_and_grad(q, w0, True, consume)
    assert (w0 < float(-q.upper.detach() if q.symmetric else q.lower.detach())).any() and (w0 > float(q.upper.detach())).any()
    for name, a, b in zip(("w_hat", "grad w", "grad lower", "grad upper"), ref, got):
        if a is None:
            assert b is None, name
            continue
        assert _same_bits(a, b), (name, a.flatten()[:3], b.flatten()[:3])
    if method == "ternary":
        assert ref[2] is None    # l = −u: the lower parameter is not used


def test_fused_quantizer_exact_bounds_and_nan():
    """Weights exactly on the bounds and half-way between levels, and NaN weights, go the same way."""
    q = make_weight_quantizer("liq", 2)
    q.init_from(torch.randn(64))
    lo, up = float(q.lower.detach()), float(q.upper.detach())
    w0 = torch.linspace(lo - 0.1, up + 0.1, 61)
    w0[::7] = torch.tensor([lo, up, lo + (up - lo) / 6, lo + (up - lo) / 2, 0.0, -0.0, up, lo, 1e-30])
    g = torch.randn(61)
    ref = _quantize_and_grad(q, w0, False, lambda w_hat: (w_hat * g).sum())
    got = _quantize_and_grad(q, w0, True, lambda w_hat: (w_hat * g).sum())
    for a, b in zip(ref, got):
        assert _same_bits(a, b)
    w_nan = w0.clone()
    w_nan[3] = float("nan")
    ref = _quantize_and_grad(q, w_nan, False, lambda w_hat: (torch.nan_to_num(w_hat) * g).sum())
    got = _quantize_and_grad(q, w_nan, True, lambda w_hat: (torch.nan_to_num(w_hat) * g).sum())
    assert torch.equal(ref[1], got[1])     # the NaN weight is outside the range: gradient 0 on both paths


def test_fused_measurement_equals_unfused_and_fresh():
    """The rule's measurement from the fused forward (r = |x − q|, level k) and the recorder's code carry the same
    bits as after the unfused forward, and equal a fresh measurement (which may write a level 0 as −0)."""
    torch.manual_seed(3)
    for method, bits, output in CASES:
        q = make_weight_quantizer(method, bits, output)
        w = torch.randn(40, 50) * 0.1
        q.init_from(w)
        fresh = q.measure_norm(w) + q.measure_code(w)
        q.remember_forward = True
        seen = []
        for use in (False, True):
            with use_fused(use):
                q(w)
            assert q._seen is not None and (q._seen[3] is not None) == use   # the fused forward keeps k/(L−1)
            seen.append(q.measure_norm(w) + q.measure_code(w))
        for a, b, c in zip(*seen, fresh):
            assert _same_bits(a, b) and torch.equal(b, c)


def test_no_gradient_in_computes_nothing_and_switch_restores():
    q = make_weight_quantizer("liq", 2)
    w = torch.randn(8, 8, requires_grad=True)
    q.init_from(w)
    assert fused_enabled()
    with use_fused(False):
        assert not fused_enabled()
    assert fused_enabled()
    previous = set_fused(False)
    assert previous is True and not fused_enabled()
    set_fused(True)
    # ŵ used by nothing that needs a gradient: backward through another branch leaves w without a gradient
    w_hat = IntervalQuantize.apply(w, q.lower, q.upper, q)
    (w_hat.detach().sum() + (w * 0).sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(RuntimeError):   # once differentiable: a second-order gradient is a clear error
        w2 = torch.randn(4, 4, requires_grad=True)
        out = IntervalQuantize.apply(w2, q.lower, q.upper, q)
        (gw,) = torch.autograd.grad(out.sum(), w2, create_graph=True)
        gw.sum().backward()


def _train(model_name: str, fused: bool, rule_kind: str, steps: int = 50, **rule_kw):
    """A seeded QAT run on digits (SGD with momentum and weight decay for the weights, Adam for the bounds, as the
    trainer), fused or not: the rule's freeze steps, EMA, the weights and bounds after every step's update."""
    from lts_core import OscillationRule
    from lts_core.datasets import load_dataset
    from lts_core.models import build_model
    data = load_dataset("digits")
    in_shape = (64,) if model_name == "mlp" else (1, 8, 8)
    x = data.x_train.reshape(-1, *in_shape)
    with use_fused(fused):
        torch.manual_seed(0)
        model = build_model(model_name, in_shape, 10, width=32 if model_name == "mlp" else 4)
        quantize_model(model, bits=2, first_last_bits=2, example_input=x[:2])
        wparams = [p for n, p in model.named_parameters() if "quantizer" not in n]
        bparams = [p for n, p in model.named_parameters() if "quantizer" in n]
        opt = torch.optim.SGD(wparams, lr=0.05, momentum=0.9, weight_decay=1e-4)
        bopt = torch.optim.Adam(bparams, lr=1e-3)
        if rule_kind == "osc":
            rule = OscillationRule(model, opt, total_steps=steps, start_frac=0.2, thr_start=0.02, thr_end=0.01,
                                   **rule_kw)
        else:
            rule = LTSRule(model, opt, total_steps=steps, warmup_steps=steps // 5, schedule="linear",
                           **{"ratio": 0.5, **rule_kw})
        g = torch.Generator().manual_seed(1)
        weights = []
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            opt.zero_grad(set_to_none=True)
            bopt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), data.y_train[idx]).backward()
            rule.step()
            opt.step()
            bopt.step()
            weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    state = getattr(rule, "ema", None) or getattr(rule, "freq")
    return rule, [t.clone() for t in rule.freeze_step], [e.clone() for e in state], torch.stack(weights)


RUNS = [("mlp", "lts", {}), ("cnn2d", "lts", {}), ("mlp", "lts", {"granularity": "channel", "ratio": 0.2}),
        ("cnn2d", "lts", {"granularity": "channel", "ratio": 0.5, "channel_quantile": 0.5}),   # some never freeze
        ("mlp", "lts", {"bound_grad": "active"}), ("mlp", "osc", {})]


@pytest.mark.parametrize("model_name,rule_kind,rule_kw", RUNS,
                         ids=[f"{m}-{r}-{'-'.join(map(str, kw.values())) or 'default'}" for m, r, kw in RUNS])
def test_seeded_run_same_decisions_fused_and_unfused(model_name, rule_kind, rule_kw):
    """The product's promise across the fused path: on a seeded run every weight freezes at the same step, the
    rule's state and every parameter after every update are the same (as values: ±0 not told apart)."""
    before = _train(model_name, False, rule_kind, **rule_kw)
    after = _train(model_name, True, rule_kind, **rule_kw)
    assert not before[0].fused and after[0].fused
    steps = torch.cat([f.flatten() for f in before[1]])
    assert (steps >= 0).any() and (steps == -1).any() and len(steps[steps >= 0].unique()) > 1   # froze over time
    for a, b in zip(before[1], after[1]):
        assert torch.equal(a, b)
    for a, b in zip(before[2], after[2]):
        assert _same_bits(a, b)
    assert torch.equal(before[3], after[3])
    for name in ("updates_eliminated", "backward_flops_saved", "backward_flops_skippable", "frozen_fraction"):
        assert getattr(before[0], name)() == getattr(after[0], name)(), name
    assert before[0]._n_frozen_channels == after[0]._n_frozen_channels


def test_fused_rule_state_round_trip():
    """state_dict / load_state_dict carry the fused rule's float masks along: a rule loaded mid-run continues
    exactly as the one it was saved from."""
    rule, *_ = _train("mlp", True, "lts")
    sd = rule.state_dict()
    assert (sd["freeze_step"][0] >= 0).any()
    model = rule.model
    clone = LTSRule(model, None, total_steps=50, warmup_steps=10, schedule="linear", ratio=0.5)
    clone.load_state_dict(sd)
    for i in range(len(rule.modules)):
        assert torch.equal(clone._live[i], rule._live[i])
        assert torch.equal(clone._freeze_step_f[i], rule._freeze_step_f[i])
        assert torch.equal(clone._channel_frozen[i], rule._channel_frozen[i])
        assert torch.equal(clone.freeze_step[i], rule.freeze_step[i])
    assert clone._n_frozen_channels == rule._n_frozen_channels


needs_compiler = pytest.mark.skipif(compile_unavailable() is not None,
                                    reason=f"compiled kernels unavailable: {compile_unavailable()}")


@pytest.fixture
def small_layers_compiled(monkeypatch):
    """The compiled kernels for the tests' small layers too (by default only layers of ≥ 64K weights use them)."""
    import lts_core.fused as fused
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    from lts_core.fused import kernel
    calls_before = kernel.cache_info().hits + kernel.cache_info().misses
    yield
    assert kernel.cache_info().hits + kernel.cache_info().misses > calls_before   # the kernels did run


@needs_compiler
def test_compiled_kernels_same_bits_and_same_run(small_layers_compiled):
    """The compiled kernels (quantizer forward/backward, the LTS update, freezes) carry the same bits as the
    unfused path: gradients through a Linear (transposed weight gradient) and a convolution, and a seeded LTS
    run (every freeze step, the EMA, every parameter after every update)."""
    torch.manual_seed(11)
    for layer, (method, bits, output) in [("linear", ("liq", 2, "denorm")), ("conv", ("liq", 2, "unit")),
                                          ("linear", ("ternary", 2, "denorm"))]:
        q = make_weight_quantizer(method, bits, output)
        shape = (96, 130) if layer == "linear" else (24, 12, 3, 3)
        w0 = torch.randn(shape) * 0.05
        q.init_from(w0 * 0.6)
        inp = torch.randn(33, 130) if layer == "linear" else torch.randn(5, 12, 9, 9)

        def consume(w_hat):
            out = F.linear(inp, w_hat) if layer == "linear" else F.conv2d(inp, w_hat, padding=1)
            return (out.sin() * 3).sum()

        ref = _quantize_and_grad(q, w0, False, consume)
        with use_compile(True):
            got = _quantize_and_grad(q, w0, True, consume)
        for a, b in zip(ref, got):
            assert (a is None and b is None) or _same_bits(a, b)
    before = _train("mlp", False, "lts")
    with use_compile(True):
        after = _train("mlp", True, "lts")
    for a, b in zip(before[1], after[1]):
        assert torch.equal(a, b)
    for a, b in zip(before[2], after[2]):
        assert _same_bits(a, b)
    assert torch.equal(before[3], after[3])


@needs_compiler
@pytest.mark.parametrize("with_rule", [False, True], ids=["qat", "lts"])
def test_compiled_recording_same_records(tmp_path, with_rule, small_layers_compiled):
    """A run recorded at every step stores the same levels, distance codes, raw distances and EMA codes
    whether the recorder's encoding runs as the compiled kernel or not."""
    from lts_core import Recorder, open_run
    runs = []
    for compiled in (False, True):
        with use_compile(compiled):
            torch.manual_seed(5)
            model = quantize_model(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                                                 nn.Linear(48, 10)), bits=2, first_last_bits=3)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            rule = LTSRule(model, opt, total_steps=12, warmup_steps=2, schedule="fixed", ratio=0.2) \
                if with_rule else None
            rec = Recorder.create(tmp_path, model, {"name": f"c{compiled}"}, rule=rule, every=1,
                                  steps_per_epoch=6, total_steps=12)
            g = torch.Generator().manual_seed(2)
            for _ in range(12):
                x, y = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                if rule is not None:
                    rule.step()
                rec.step()
                opt.step()
            rec.finish()
            runs.append(open_run(rec.path))
    a, b = runs
    assert np.array_equal(a.levels(), b.levels()) and np.array_equal(a.dist_codes(), b.dist_codes())
    assert np.array_equal(a.raw_dists().view(np.int32), b.raw_dists().view(np.int32))
    if with_rule:
        assert np.array_equal(a.state("ema"), b.state("ema"))
        assert np.array_equal(a.freeze_steps(), b.freeze_steps())


def test_compile_switch_reports_why_not():
    reason = compile_unavailable()
    if reason is None:
        assert set_compile(True) is False and compile_enabled()
        set_compile(False)
    else:
        with pytest.raises(RuntimeError, match="cannot compile"):
            set_compile(True)
    assert not compile_enabled()


def test_compile_config_is_a_clear_error_without_a_compiler(monkeypatch):
    """`--compile` where it cannot work is one line naming the reason, before anything runs."""
    import lts_core.fused as fused
    from lts_core.config import ConfigError, make_config
    monkeypatch.setattr(fused, "compile_unavailable", lambda: "no C++ compiler for torch.compile's CPU backend")
    with pytest.raises(ConfigError, match="compile is not available here: no C\\+\\+ compiler"):
        make_config(compile=True)
    assert make_config(compile=False).compile is False


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_serves_blocks_from_the_heap():
    """After keep_freed_memory() an 8 MiB block comes from malloc's heap (glibc's default would map it afresh,
    and unmap it on free: page faults on every reuse)."""
    import ctypes
    from lts_core.malloc import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert keep_freed_memory() is True
    mapped = libc.mallinfo2().hblkhd
    block = libc.malloc(8 << 20)
    try:
        assert libc.mallinfo2().hblkhd == mapped          # not a fresh mapping
        assert libc.mallinfo2().uordblks >= 8 << 20         # but heap memory in use
    finally:
        libc.free(block)

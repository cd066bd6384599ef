"""The numba loops of the fused path on CPU (`lts_core.fused_cpu`) against the eager torch ops they replace: the
same bits for the EMA, the levels, the decisions and freezes, the gradient mask and the restore, on random inputs
with ties at the threshold and at the rounding midpoints, frozen and live weights, layers large enough to run
as two halves on two threads, and on seeded training runs (weight decay, momentum, channel granularity, both
bound-gradient policies)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lts_core import LTSRule, quantize_model
from lts_core import fused_cpu as cpu
from lts_core.distance import ema_update
from lts_core.fused import cpu_kernels, use_numba


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)   # layers ≥ SPLIT_MIN_NUMEL then run as two halves on two threads
    yield
    torch.set_num_threads(previous)


def _layer_state(n: int, per_chan: int, seed: int, n1: int = 3):
    """Random weights with rounding ties (x·(L−1) exactly k + ½), NaN and ±inf, an EMA, the previous levels
    (a third changed), a third of the weights frozen, a gradient with ±0 and NaN."""
    g = torch.Generator().manual_seed(seed)
    lo, up = torch.tensor(-1.0), torch.tensor(1.0)          # b = 2: x = (w + 1)/2 exact for these w
    w = torch.randn(n, generator=g) * 0.8
    ties = torch.randint(0, n, (n // 20,), generator=g)
    w[ties] = (torch.randint(0, n1, (len(ties),), generator=g).float() + 0.5) / n1 * 2 - 1
    w[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x = (w - lo) / (up - lo)
    k = torch.round(torch.clamp(x, 0, 1) * n1)
    prev = torch.where(torch.rand(n, generator=g) < 0.3, (k + 1) % (n1 + 1), k)
    ema = torch.rand(n, generator=g) * 0.3
    live = torch.rand(n, generator=g) > 0.3
    grad = torch.randn(n, generator=g)
    grad[5:9] = torch.tensor([0.0, -0.0, float("nan"), -1.0])
    return w, lo, up, prev, ema, live, grad, n // per_chan


def _eager_step(w, lo, up, prev, ema, live, grad, thr, n1, decay, t, per_chan):
    """The eager fused rule's ops for one step (t ≥ 2) of a layer: the reference for `lts_step`."""
    b = up - lo
    x = torch.sub(w, lo).div_(b)
    k = torch.clamp(x, 0, 1).mul_(n1).round_()
    r = torch.sub(x, torch.div(k, n1)).abs_()
    ema = ema.clone()
    changed = torch.ne(k, prev).float()
    ema_update(ema, r, changed, decay, 1 / n1, scratch=torch.empty_like(ema))
    live_f = live.float()
    new = torch.le(ema, thr).float().mul_(live_f)
    fv, fs = torch.zeros_like(w), torch.full_like(w, -1.0)
    torch.lerp(fv, w, new, out=fv)
    torch.lerp(fs, torch.tensor(float(t)), new, out=fs)
    live_f.sub_(new)
    grad = grad.clone().mul_(live_f)
    chan = new.reshape(-1, per_chan).sum(dim=1)
    return k, ema, live_f, fv, fs, grad, chan, int(new.sum())


@pytest.mark.parametrize("n,per_chan", [(3000, 30), (1 << 17, 256)])   # small; large: two threads
@pytest.mark.parametrize("n1", [1, 3, 15])
def test_lts_step_same_bits_as_eager_ops(n, per_chan, n1, two_threads):
    w, lo, up, prev, ema, live, grad, n_chan = _layer_state(n, per_chan, seed=n1, n1=n1)
    decay, t = 0.99, 7
    # a threshold equal to some weights' new EMA: ties decide as torch's `le` does
    ref_ema = _eager_step(w, lo, up, prev, ema, live, grad, 1.0, n1, decay, t, per_chan)[1]
    thr_value = float(ref_ema[ref_ema.isfinite()].median())
    assert (ref_ema == np.float32(thr_value)).sum() >= 1
    k_ref, ema_ref, live_ref, fv_ref, fs_ref, grad_ref, chan_ref, n_ref = _eager_step(
        w, lo, up, prev, ema, live, grad, thr_value, n1, decay, t, per_chan)
    assert 0 < n_ref < int(live.sum())

    ema2, prev2, live2, grad2 = ema.clone(), prev.clone(), live.clone(), grad.clone()
    frozen2, live_f2 = ~live2, live.float()
    fv2, fs_f2, fs2 = torch.zeros(n), torch.full((n,), -1.0), torch.full((n,), -1, dtype=torch.int64)
    chan2 = torch.zeros(n_chan)
    f = cpu.f32
    new_idx, new_cnt = np.full(n, -1, np.int32), np.zeros(2, np.int64)
    n_new = cpu.run_split(cpu.lts_step, n, per_chan, w.numpy(), f(lo), f(up - lo), f(n1), 2, ema2.numpy(),
                          prev2.numpy(), f(decay), f(1 - decay), f(1 / n1), f(thr_value), True, live2.numpy(),
                          frozen2.numpy(), live_f2.numpy(), fv2.numpy(), fs_f2.numpy(), fs2.numpy(), t, f(t),
                          chan2.numpy(), per_chan, grad2.numpy(), True, cpu.empty_f32(), False, new_idx, new_cnt)
    assert n_new == n_ref
    # the new freezes listed: the first half's from 0, the second's from where run_split cut
    mid = cpu.split_point(n, per_chan)
    assert (mid > 0) == (n >= cpu.SPLIT_MIN_NUMEL) and new_cnt.sum() == n_new
    listed = np.concatenate([new_idx[:new_cnt[0]], new_idx[mid:mid + new_cnt[1]]])
    np.testing.assert_array_equal(listed, np.flatnonzero((live & ~live2).numpy()))
    assert torch.equal(torch.nan_to_num(prev2, nan=-7), torch.nan_to_num(k_ref, nan=-7))
    assert torch.equal(ema2.isnan(), ema_ref.isnan())
    assert _same_bits(ema2[~ema2.isnan()], ema_ref[~ema_ref.isnan()])
    assert torch.equal(live2, live_ref.bool()) and torch.equal(frozen2, ~live_ref.bool())
    assert _same_bits(live_f2, live_ref)
    # (the eager freeze's lerp also writes NaN into the frozen value of a live non-finite weight; no decision
    # reads it, and the loop writes frozen weights only)
    fin = w.isfinite()
    assert _same_bits(fv2[fin], fv_ref[fin]) and _same_bits(fs_f2, fs_ref)
    assert torch.equal(fs2, fs_ref.to(torch.int64))
    assert torch.equal(grad2.isnan(), grad_ref.isnan())
    assert _same_bits(grad2[~grad2.isnan()], grad_ref[~grad_ref.isnan()])   # ±0 where frozen, as mul_(live)
    assert torch.equal(chan2, chan_ref)


@pytest.mark.parametrize("phase", [0, 1])
def test_lts_step_first_steps_and_raw(phase):
    """t = 0 keeps the level only, t = 1 sets the EMA to r; `raw` receives r = |x − k/(L−1)| exactly."""
    n, n1 = 5000, 3
    w, lo, up, prev, ema, live, grad, _ = _layer_state(n, 50, seed=3)
    x = (w - lo) / (up - lo)
    k = torch.round(torch.clamp(x, 0, 1) * n1)
    r = (x - k / n1).abs()
    ema2, prev2, raw = ema.clone(), prev.clone(), torch.empty(n)
    f = cpu.f32
    cpu.lts_step(0, n, w.numpy(), f(lo), f(up - lo), f(n1), phase, ema2.numpy(), prev2.numpy(), f(0.9), f(0.1),
                 f(1 / n1), f(-1.0), False, live.numpy(), (~live).numpy(), live.float().numpy(), torch.zeros(n).numpy(),
                 torch.zeros(n).numpy(), torch.zeros(n, dtype=torch.int64).numpy(), 0, f(0), torch.zeros(100).numpy(),
                 50, grad.numpy(), False, raw.numpy(), True, cpu.empty_i32(), cpu.empty_i64())
    fin = r.isfinite()
    assert _same_bits(raw[fin], r[fin]) and torch.equal(raw.isnan(), r.isnan())
    assert torch.equal(torch.nan_to_num(prev2, nan=-7), torch.nan_to_num(k, nan=-7))
    if phase == 0:
        assert _same_bits(ema2, ema)
    else:
        assert _same_bits(ema2[fin], r[fin])


@pytest.mark.parametrize("n", [777, 1 << 17])
@pytest.mark.parametrize("frozen_share", [0.001, 0.3, 1.0])
def test_mask_grad_and_restore_same_bits(n, frozen_share, two_threads):
    g = torch.Generator().manual_seed(n)
    live = torch.rand(n, generator=g) >= frozen_share
    grad, w, value = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    grad[:4] = torch.tensor([0.0, -0.0, float("nan"), -2.0])
    value[4:6] = torch.tensor([0.0, -0.0])
    ref_grad = grad.clone().mul_(live.float())
    ref_w = torch.lerp(value, w, live.float())
    g2, w2 = grad.clone(), w.clone()
    cpu.run_split(cpu.mask_grad, n, 1, g2.numpy(), live.numpy())
    cpu.run_split(cpu.restore, n, 1, w2.numpy(), value.numpy(), live.numpy())
    assert torch.equal(g2.isnan(), ref_grad.isnan()) and _same_bits(g2[~g2.isnan()], ref_grad[~ref_grad.isnan()])
    assert _same_bits(w2, ref_w)
    # the frozen weights listed (in any order), their values beside them: the same bits as the full pass
    idx = torch.nonzero(~live).view(-1).to(torch.int32)[torch.randperm(int((~live).sum()), generator=g)]
    w3 = w.clone()
    w3[idx[:3].long()] = torch.tensor([float("inf"), float("nan"), -0.0])[:len(idx[:3])]   # moved to non-finite
    ref_w3 = torch.lerp(value, w3, live.float())
    cpu.run_split(cpu.restore_listed, len(idx), 1, w3.numpy(), idx.numpy(), value[idx.long()].numpy())
    assert torch.equal(w3.isnan(), ref_w3.isnan()) and _same_bits(w3[~w3.isnan()], ref_w3[~ref_w3.isnan()])


def test_split_cuts_at_channel_boundaries(two_threads):
    assert cpu.split_point(cpu.SPLIT_MIN_NUMEL - 1, 1) == 0
    mid = cpu.split_point(3 * 40000, 40000)
    assert mid == 40000
    assert cpu.split_point(1 << 17, 1 << 17) == 0      # one channel: no split
    torch.set_num_threads(1)
    assert cpu.split_point(1 << 20, 16) == 0            # torch on one thread: neither do we


def test_cpu_kernels_only_where_they_apply():
    t = torch.zeros(4, 4)
    assert cpu_kernels(t) is cpu
    assert cpu_kernels(t.t()) is None                   # not contiguous
    with use_numba(False):
        assert cpu_kernels(t) is None


def _run(numba: bool, steps: int = 24, **rule_kw):
    """A seeded MLP run (a 256×256 layer: two threads) with SGD (momentum, weight decay) on the weights and Adam
    on the bounds; per step the gradient after `rule.step()` and every parameter after the update."""
    from lts_core.models import build_model
    torch.manual_seed(0)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    with use_numba(numba):
        model = build_model("mlp", (64,), 10, width=256)
        quantize_model(model, bits=2, example_input=x[:2])
        wparams = [p for n, p in model.named_parameters() if "quantizer" not in n]
        bparams = [p for n, p in model.named_parameters() if "quantizer" in n]
        opt = torch.optim.SGD(wparams, lr=0.05, momentum=0.9, weight_decay=1e-3)
        bopt = torch.optim.Adam(bparams, lr=1e-3)
        rule = LTSRule(model, opt, total_steps=steps, warmup_steps=2, schedule="linear", **rule_kw)
        grads, params = [], []
        for s in range(steps):
            idx = torch.arange(s * 8, s * 8 + 64) % 256
            opt.zero_grad(set_to_none=True)
            bopt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            rule.step()
            grads.append([None if m.weight.grad is None else m.weight.grad.clone() for m in rule.modules])
            opt.step()
            bopt.step()
            params.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return rule, grads, params


RUNS = [{"ratio": 1.0}, {"ratio": 0.2}, {"ratio": 1.0, "bound_grad": "active"},
        {"granularity": "channel", "ratio": 0.25, "channel_quantile": 0.5},
        {"granularity": "channel", "ratio": 0.1, "bound_grad": "active"}]


@pytest.mark.parametrize("rule_kw", RUNS, ids=["weight-all", "weight-all-listed", "weight-active", "channel-all",
                                               "channel-active"])
def test_seeded_run_numba_same_bits_as_eager(rule_kw, two_threads):
    """On a seeded run the numba loops give the eager fused path's every bit: freeze steps, EMA, levels, masks,
    the gradients the optimizer sees and every parameter after every update."""
    eager, g_e, p_e = _run(False, **rule_kw)
    fast, g_f, p_f = _run(True, **rule_kw)
    steps = torch.cat([f.flatten() for f in eager.freeze_step])
    assert (steps >= 0).any() and (steps == -1).any() and len(steps[steps >= 0].unique()) > 1
    for a, b in zip(eager.freeze_step, fast.freeze_step):
        assert torch.equal(a, b)
    for name in ("ema", "prev_level", "frozen", "_unfrozen", "_live", "frozen_values", "_freeze_step_f",
                 "_channel_frozen"):
        for a, b in zip(getattr(eager, name), getattr(fast, name)):
            assert (torch.equal(a, b) if a.dtype == torch.bool else _same_bits(a, b)), name
    for ge, gf in zip(g_e, g_f):
        for a, b in zip(ge, gf):
            assert (a is None and b is None) or _same_bits(a, b)
    for a, b in zip(p_e, p_f):
        assert _same_bits(a, b)
    assert eager._n_frozen == fast._n_frozen and eager._n_frozen_channels == fast._n_frozen_channels
    assert eager.backward_flops_skippable() == fast.backward_flops_skippable()


QUANTIZERS = [("liq", 2, "denorm"), ("liq", 4, "unit"), ("ternary", 2, "denorm"), ("ternary", 2, "unit"),
              ("binary", 1, "denorm")]


@pytest.mark.parametrize("method,bits,output", QUANTIZERS)
@pytest.mark.parametrize("n", [1000, 1 << 17])
def test_quantizer_numba_same_bits_as_eager(method, bits, output, n, two_threads):
    """The quantizer's forward (ŵ) and backward (weight gradient, bounds' gradients) through the numba loops:
    the eager fused ops' bits, with rounding ties, out-of-range weights and a gradient with ±0."""
    from lts_core.quantizers import make_weight_quantizer
    g = torch.Generator().manual_seed(n + bits)
    w0 = torch.randn(n // 50, 50, generator=g)
    w0.view(-1)[: n // 10] = (torch.randint(0, 4, (n // 10,), generator=g).float() + 0.5) / 3 * 2 - 1   # ties
    w0.view(-1)[n // 10: n // 5] *= 5                                                                  # clamped
    gout = torch.randn(w0.shape, generator=g)
    gout.view(-1)[:2] = torch.tensor([0.0, -0.0])
    results = []
    for numba in (False, True):
        q = make_weight_quantizer(method, bits, output)
        q.init_from(w0)
        with torch.no_grad():
            q.upper.fill_(1.0)
            if not q.symmetric:
                q.lower.fill_(-1.0)
        w = w0.clone().requires_grad_()
        with use_numba(numba):
            w_hat = q(w)
            w_hat.backward(gout)
        results.append((w_hat.detach(), w.grad, q.upper.grad, q.lower.grad))
    for a, b in zip(*results):
        assert (a is None and b is None) or _same_bits(a, b)


@pytest.mark.parametrize("n", [1000, 1 << 17])
def test_encode_same_bytes_as_measure_code(n, two_threads):
    """The recorder's level, distance code and raw distance written by the numba loop equal what
    `measure_code` / `measure_norm` give (cast to uint8 as the recorder casts them)."""
    from lts_core.fused import encode_remembered
    from lts_core.quantizers import make_weight_quantizer
    from lts_core.recorder import _copy_u8
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=g)
    w[: n // 10] = (torch.randint(0, 4, (n // 10,), generator=g).float() + 0.5) / 3 * 2 - 1
    w[n // 10: n // 10 + 100] = -1 + (torch.arange(100) + 0.5) / 128 / 3 * 2   # code ties (x·3 = j + ½)/128
    w[-3:] = torch.tensor([float("nan"), float("inf"), -5.0])
    q = make_weight_quantizer("liq", 2)
    q.init_from(w[:-3])
    with torch.no_grad():
        q.upper.fill_(1.0)
        q.lower.fill_(-1.0)
    lev_ref, code_ref = q.measure_code(w)
    raw_ref = q.measure_norm(w)[1]
    lv, cd, ref_lv, ref_cd = (torch.empty(n, dtype=torch.uint8) for _ in range(4))
    raw = torch.empty(n)
    _copy_u8(ref_lv, lev_ref)
    _copy_u8(ref_cd, code_ref)
    assert encode_remembered(q, w, lv, cd, raw)
    assert torch.equal(lv, ref_lv) and torch.equal(cd, ref_cd)
    fin = raw_ref.isfinite()
    assert _same_bits(raw[fin], raw_ref[fin]) and torch.equal(raw.isnan(), raw_ref.isnan())
    with use_numba(False):
        assert not encode_remembered(q, w, lv, cd, raw)   # the eager path does it then (measure_code)


def test_the_frozen_weights_are_listed_while_few(two_threads):
    """While at most `LIST_MAX` of a layer is frozen, the restore writes back the listed frozen weights only: the
    list holds exactly the frozen weights and their frozen values after every step (appended by the step,
    rebuilt after any other freeze), and is dropped once too many are frozen."""
    from lts_core.models import build_model
    torch.manual_seed(0)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    model = build_model("mlp", (64,), 10, width=256)
    quantize_model(model, bits=2, example_input=x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    rule = LTSRule(model, opt, total_steps=24, warmup_steps=2, schedule="linear", ratio=0.2)
    seen = {"listed": 0, "full": 0}
    for s in range(24):
        if s == 5:   # a freeze from outside the step: the list no longer matches and is rebuilt
            rule.freeze_weights(0, torch.rand(rule.frozen[0].shape) < 0.01)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[:64]), y[:64]).backward()
        rule.step()
        opt.step()
        for i, listed in enumerate(rule._lists):
            share = rule._n_frozen[i] / rule.numels[i]
            if listed is None or listed.version != rule._mask_version[i]:
                assert share > cpu.LIST_MAX or not rule._n_frozen[i]
                seen["full"] += share > cpu.LIST_MAX
                continue
            seen["listed"] += 1
            idx = listed.idx[:listed.n]
            assert len(set(idx.tolist())) == listed.n == rule._n_frozen[i]
            np.testing.assert_array_equal(np.sort(idx), np.flatnonzero(rule.frozen[i].view(-1).numpy()))
            assert _same_bits(torch.from_numpy(listed.values[:listed.n]), rule.frozen_values[i].view(-1)[idx])
            assert _same_bits(rule.modules[i].weight.detach().view(-1)[idx], rule.frozen_values[i].view(-1)[idx])
    assert seen["listed"] >= 5 and seen["full"] >= 5

"""Fused weight quantization: the learned-interval quantizer's forward and backward as one autograd Function,
with the LTS measurement kept from the same pass.

Autograd's chain for `l + round(clamp((w − l)/(u − l), 0, 1)·(L−1))/(L−1)·(u − l)` runs about 7 elementwise
passes forward and 15 backward (each allocating a weight-sized tensor, several on bool masks, which are slow on
the CPU). `IntervalQuantize` computes the same values with fewer, cheaper passes:

- forward: x = (w − l)/b (b = u − l), k = round(clamp(x, 0, 1)·(L−1)), q = k/(L−1), ŵ = q·b + l ("denorm") or
  (q − 0.5)·2 ("unit"), and the in-range mask 0 ≤ x ≤ 1 as float32 (1.0 / 0.0). It keeps x, k and q for the
  rule (`WeightQuantizer.measure_norm`: r = |x − q|) and the recorder (`measure_code`): the measurement costs
  one pass more, not a second quantization.
- backward: one product and mask for the straight-through clamp, one division for the weight gradient and four
  sums for the bounds, accumulated in the order autograd's engine accumulates them.

**Same bits.** Every value is computed by the same float32 operation on the same operands as the reference's
chain (`LearnedIntervalQuantizer` with `use_fused(False)`), in the same memory layout wherever a sum reads it,
so ŵ, the weight gradient and both bound gradients are bit-identical (tests/test_fused.py); the one exception
is the sign of a zero: where autograd's `where` writes +0 for an out-of-range weight, the masked product writes
+0 too (`add_(0.0)` turns −0 into +0), but an incoming gradient of exactly −0 inside the range comes out as +0.

`use_fused(False)` (a context manager) or `set_fused(False)` selects the unfused path everywhere (the quantizer's
autograd chain and the rule's original tensor operations, read when a rule is built): the reference the tests
compare with, and the "before" of `bench/bench_fused.py`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

_FUSED = True


def fused_enabled() -> bool:
    """Whether quantizers and newly built rules use the fused path (default True)."""
    return _FUSED


def set_fused(enabled: bool) -> bool:
    """Select the fused (True) or the unfused reference path (False); returns the previous setting."""
    global _FUSED
    previous, _FUSED = _FUSED, bool(enabled)
    return previous


@contextmanager
def use_fused(enabled: bool):
    """`with use_fused(False): …` runs the unfused reference path inside the block (rules built inside keep it)."""
    previous = set_fused(enabled)
    try:
        yield
    finally:
        set_fused(previous)


def in_range_mask(x: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    """float32 1.0 where 0 ≤ x ≤ 1 (the clamp passed x through), 0.0 elsewhere (NaN included)."""
    return torch.eq(clamped, x, out=torch.empty_like(x))


class IntervalQuantize(torch.autograd.Function):
    """ŵ = the learned-interval quantizer of `quantizer` applied to `w`, with its gradients to w, lower and upper
    (the module docstring gives the ops). `quantizer` is a `LearnedIntervalQuantizer`; its `_seen` receives
    (x, k, q) when it remembers its forward pass."""

    @staticmethod
    def forward(ctx, w, lower, upper, quantizer):
        ctx.set_materialize_grads(False)   # no gradient in (a fully frozen layer): none out, nothing computed
        n1 = quantizer.n_levels - 1
        lo = -upper if quantizer.symmetric else lower
        b = upper - lo
        x = torch.sub(w, lo).div_(b)                       # (w − l)/(u − l)
        xc = torch.clamp(x, 0, 1)
        inside = in_range_mask(x, xc)
        k = xc.mul_(n1).round_()                           # round(clamp(x)·(L−1)): the level index
        q = torch.div(k, n1)
        out = torch.sub(q, 0.5).mul_(2) if quantizer.output == "unit" else torch.mul(q, b).add_(lo)
        quantizer._remember(w, x, k, q)
        ctx.save_for_backward(x, q, inside, b)
        ctx.unit, ctx.symmetric = quantizer.output == "unit", quantizer.symmetric
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if g is None:
            return None, None, None, None
        x, q, inside, b = ctx.saved_tensors
        # grad of the clamped x: where(0 ≤ x ≤ 1, g·(u − l) [or g·2], 0), in x's layout as autograd's `where`
        gx = torch.empty_like(x)
        torch.mul(g, 2 if ctx.unit else b, out=gx)
        gx.mul_(inside).add_(0.0)
        # x = A/b: grad of b = Σ −gx·((A/b)/b) = −Σ gx·(x/b); grad of A = gx/b (the weight's gradient)
        g_b = -torch.div(x, b).mul_(gx).sum()
        gw = gx.div_(b)
        from_a = -gw.sum()                                 # lower's share through A = w − l
        if ctx.unit:       # ŵ = (q − 0.5)·2: lower and upper only through x
            g_lo = (-g_b) + from_a
            g_up = g_b
            if ctx.symmetric:                              # l = −u: upper also gets −(lower's gradient)
                g_up = g_b + (-g_lo)
        else:              # ŵ = l + q·(u − l): first lower's own term, then b2 = u − l
            from_out = g.sum()
            g_b2 = torch.mul(g, q).sum()
            if ctx.symmetric:   # two negations of u (forward's and normalized()'s), accumulated last
                g_up = ((g_b2 + g_b) + (-((-g_b) + from_a))) + (-(from_out + (-g_b2)))
                g_lo = None
            else:
                g_lo = ((from_out + (-g_b2)) + (-g_b)) + from_a
                g_up = g_b2 + g_b
        if ctx.symmetric:
            g_lo = None
        return gw, g_lo, g_up, None


def interval_quantize(quantizer, w: torch.Tensor) -> torch.Tensor:
    """ŵ through `IntervalQuantize` (bounds initialised from w on first use, as the chain does)."""
    if not bool(quantizer.initialized):
        quantizer.init_from(w)
    return IntervalQuantize.apply(w, quantizer.lower, quantizer.upper, quantizer)

"""Weight gradients for the output channels that still learn: a quantized layer's backward pass that skips
frozen channels.

Dense autograd computes the weight gradient of every output channel (a row of a Linear, a filter of a Conv)
and a freezing rule then masks it: no time is saved. A layer given a `ChannelPlan` instead runs its matmul or
convolution through an autograd Function whose backward
- computes the **input gradient** exactly as dense autograd does (the same ATen call on the full weight);
- computes the **weight gradient only for the active output channels** (`plan.active`): the active rows of the
  output gradient times the input (Linear), or the convolution's weight gradient on the active filters
  (`aten.convolution_backward` with only the weight output); grouped convolutions gather the groups that
  hold an active filter (a depthwise convolution gathers exactly its active filters). A convolution gathers
  only where that is cheaper (`conv_gather_pays`): the CPU's weight-gradient kernel works on blocks of output
  channels and a call of its own costs a fixed part more, so fewer filters cost less only once a whole block
  drops out; otherwise the layer makes dense autograd's one call (input and weight gradient together) and
  zeroes the frozen filters, costing what the plain layer costs;
- returns zeros for the frozen channels (and, with `plan.weight_mask`, for frozen weights inside active
  channels, so they add nothing to the quantizer bounds' gradient either), or no weight gradient at all
  (`None`: nothing downstream runs, the quantizer's backward included) when every channel is frozen.

The quantized weight `ŵ = quantizer(w)` stays an ordinary autograd input, so the quantizer's own backward
(straight-through round, the bounds' gradient) is unchanged; what it receives is the gradient of `ŵ` with the
frozen part zero. Units: none (gradients in the units of the loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ChannelPlan:
    """Which part of one layer's weight gradient the backward pass computes.

    active: int64 [k] indices of the output channels computed (sorted; empty = the whole layer is frozen).
    weight_mask: bool, the weight's shape: weights whose gradient may be non-zero (None: every weight of an
        active channel). Used for per-weight freezing with `bound_grad="active"`.
    n_channels: output channels of the layer.
    none_when_frozen: a fully frozen layer returns no weight gradient (None) instead of zeros; False under
        DDP, whose reducer waits for a gradient from every parameter.
    """
    active: torch.Tensor
    n_channels: int
    weight_mask: torch.Tensor | None = None
    none_when_frozen: bool = True
    _frozen_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def all_frozen(self) -> bool:
        return self.active.numel() == 0

    @property
    def n_active(self) -> int:
        return int(self.active.numel())

    @property
    def frozen_rows(self) -> torch.Tensor:
        """bool [n_channels]: the output channels not in `active` (computed once per plan)."""
        if self._frozen_rows is None:
            rows = torch.ones(self.n_channels, dtype=torch.bool, device=self.active.device)
            rows[self.active] = False
            self._frozen_rows = rows
        return self._frozen_rows


# Output channels the convolution weight-gradient kernel computes together (None: by device, `conv_channel_block`).
CONV_CHANNEL_BLOCK: int | None = None


def conv_channel_block(device: torch.device) -> int:
    """Output channels the weight-gradient convolution computes as one block on `device` (`CONV_CHANNEL_BLOCK`
    overrides). CPU with AVX-512: 16 (oneDNN's float32 vector width; measured: the weight gradient of 1, 4, 8 or
    15 of 16 filters costs as much as of all 16, and of 16 of 32 filters about half, bench_savings --model
    convgrad); other CPUs: 8 (AVX2's width, not measured); CUDA: 1 (every frozen filter gathered out, not
    measured)."""
    if CONV_CHANNEL_BLOCK is not None:
        return CONV_CHANNEL_BLOCK
    if device.type != "cpu":
        return 1
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def conv_gather_pays(n_active: int, n_channels: int, block: int) -> bool:
    """Whether computing the weight gradient of `n_active` of `n_channels` filters in a call of its own saves
    time over dense autograd's call: only when at least one block of `block` output channels drops out
    (⌈n_active/block⌉ < ⌈n_channels/block⌉)."""
    return math.ceil(n_active / block) < math.ceil(n_channels / block)


def _scatter_rows(rows: torch.Tensor, plan: ChannelPlan, shape: torch.Size) -> torch.Tensor:
    """Full weight-shaped gradient: `rows` at the active channels, zero elsewhere (and at masked weights)."""
    if plan.n_active == plan.n_channels:
        full = rows
    else:
        full = rows.new_zeros(shape)
        full.index_copy_(0, plan.active, rows)
    if plan.weight_mask is not None:
        full = full.masked_fill(~plan.weight_mask, 0.0)
    return full


def _frozen_weight_grad(w: torch.Tensor, plan: ChannelPlan):
    return None if plan.none_when_frozen else torch.zeros_like(w)


class ActiveLinear(torch.autograd.Function):
    """`F.linear(x, ŵ, b)` whose backward computes the weight gradient of the active rows only."""

    @staticmethod
    def forward(ctx, x, w, b, plan: ChannelPlan):
        ctx.save_for_backward(x, w)
        ctx.plan, ctx.has_bias = plan, b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        plan: ChannelPlan = ctx.plan
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g2.mm(w).view(x.shape)                # dense autograd's input gradient (grad · W)
        if ctx.needs_input_grad[1]:
            if plan.all_frozen:
                gw = _frozen_weight_grad(w, plan)
            else:
                x2 = x.reshape(-1, x.shape[-1])
                gt = g2.t() if plan.n_active == plan.n_channels else g2.t().index_select(0, plan.active)
                gw = _scatter_rows(gt.mm(x2), plan, w.shape)   # gᵀ · x on the active rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's hyper-parameters as `aten.convolution_backward` takes them (zero padding only)."""
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @classmethod
    def of(cls, conv: torch.nn.modules.conv._ConvNd) -> "ConvSpec | None":
        """The spec of a torch conv layer, or None when the backward cannot be planned (string padding,
        non-zero padding modes, transposed convolutions): such a layer keeps the dense backward."""
        if conv.transposed or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return None
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), int(conv.groups))


def _conv(x, w, b, spec: ConvSpec):
    fn = F.conv1d if w.dim() == 3 else F.conv2d
    return fn(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)


def conv_weight_grad_active(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, spec: ConvSpec,
                            active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight gradient of the filters `active` only: (rows [k', *w.shape[1:]], their channel indices [k']).

    groups = 1: the active filters' output gradient against the whole input. groups > 1: every group holding
    an active filter is computed whole (its input channels gathered, `groups` = number of such groups), so
    the rows returned may include frozen filters of those groups (the caller zeroes them). A depthwise
    convolution (one filter per group) computes exactly the active filters.
    """
    zeros = [0] * (w.dim() - 2)
    if spec.groups == 1:
        rows = torch.ops.aten.convolution_backward(
            g.index_select(1, active), x, w.index_select(0, active), None, spec.stride, spec.padding,
            spec.dilation, False, zeros, 1, (False, True, False))[1]
        return rows, active
    out_pg = w.shape[0] // spec.groups
    in_pg = w.shape[1]
    grp = torch.unique(torch.div(active, out_pg, rounding_mode="floor"))      # sorted active groups
    chans = (grp[:, None] * out_pg + torch.arange(out_pg, device=grp.device)).reshape(-1)
    in_chans = (grp[:, None] * in_pg + torch.arange(in_pg, device=grp.device)).reshape(-1)
    rows = torch.ops.aten.convolution_backward(
        g.index_select(1, chans), x.index_select(1, in_chans), w.index_select(0, chans), None, spec.stride,
        spec.padding, spec.dilation, False, zeros, int(grp.numel()), (False, True, False))[1]
    return rows, chans


class ActiveConv(torch.autograd.Function):
    """`conv(x, ŵ, b)` (1-D or 2-D) whose backward computes the weight gradient of the active filters only."""

    @staticmethod
    def forward(ctx, x, w, b, spec: ConvSpec, plan: ChannelPlan):
        ctx.save_for_backward(x, w)
        ctx.spec, ctx.plan, ctx.has_bias = spec, plan, b is not None
        return _conv(x, w, b, spec)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        spec: ConvSpec = ctx.spec
        plan: ChannelPlan = ctx.plan
        g = g.contiguous()
        zeros = [0] * (w.dim() - 2)
        gx = gw = gb = None
        want_x = ctx.needs_input_grad[0]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        want_w = ctx.needs_input_grad[1] and not plan.all_frozen
        # all filters in dense autograd's one call (then the frozen ones zeroed) unless gathering saves time
        # (grouped convolutions gather the groups holding an active filter, `conv_weight_grad_active`)
        dense_w = want_w and (plan.n_active == plan.n_channels or spec.groups == 1 and not conv_gather_pays(
            plan.n_active, plan.n_channels, conv_channel_block(w.device)))
        if want_x or want_b or dense_w:   # input (and bias) gradient: the dense call, with the weight's if dense
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w, [w.shape[0]] if want_b else None, spec.stride, spec.padding, spec.dilation, False,
                zeros, spec.groups, (want_x, dense_w, want_b))
            gw = gw if dense_w else None
        if ctx.needs_input_grad[1]:
            if plan.all_frozen:
                gw = _frozen_weight_grad(w, plan)
            elif dense_w:
                if plan.n_active != plan.n_channels:
                    gw.masked_fill_(plan.frozen_rows.view((-1,) + (1,) * (w.dim() - 1)), 0.0)
                if plan.weight_mask is not None:
                    gw.masked_fill_(~plan.weight_mask, 0.0)
            else:
                rows, chans = conv_weight_grad_active(x, g, w, spec, plan.active)
                full = rows.new_zeros(w.shape)
                full.index_copy_(0, chans, rows)
                if chans.numel() != plan.n_active:     # whole groups were computed: zero their frozen filters
                    full[plan.frozen_rows] = 0.0
                if plan.weight_mask is not None:
                    full.masked_fill_(~plan.weight_mask, 0.0)
                gw = full
        return gx, gw, gb if want_b else None, None, None


def planned_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: ChannelPlan | None):
    """F.linear, with the planned backward when a plan is given and gradients are being recorded."""
    if plan is None or not torch.is_grad_enabled():
        return F.linear(x, w, b)
    return ActiveLinear.apply(x, w, b, plan)


def planned_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, spec: ConvSpec,
                 plan: ChannelPlan | None):
    """conv1d/conv2d, with the planned backward when a plan is given and gradients are being recorded."""
    if plan is None or not torch.is_grad_enabled():
        return _conv(x, w, b, spec)
    return ActiveConv.apply(x, w, b, spec, plan)


def plan_from_frozen(frozen: torch.Tensor, per_weight: bool, none_when_frozen: bool = True) -> ChannelPlan:
    """The plan for a layer's frozen mask (bool, the weight's shape): an output channel is active while it
    has an unfrozen weight. `per_weight` adds the weight mask (frozen weights inside active channels give no
    gradient, so they add nothing to the bounds' gradient)."""
    rows = frozen.reshape(frozen.shape[0], -1)
    active = torch.nonzero(~rows.all(dim=1)).flatten()
    mask = None
    if per_weight and bool(frozen.any()):
        mask = ~frozen
    return ChannelPlan(active=active, n_channels=int(frozen.shape[0]), weight_mask=mask,
                       none_when_frozen=none_when_frozen)


class ActiveIntervalQuantize(torch.autograd.Function):
    """The learned-interval quantizer (`LearnedIntervalQuantizer.forward`) for a layer with a plan: the forward
    pass is the same ops on the same tensors (bit-identical ŵ, and the quantizer remembers x and k as usual);
    the backward pass runs the straight-through chain on the **active rows only** (the gradient of ŵ is zero
    elsewhere, so the dense chain would spend most of its passes on zeros), giving the weight's gradient on
    those rows and the bounds' gradient as the sum over them:

        x = (w − l)/b, b = u − l;  g_x = g_q·[0 ≤ x ≤ 1],  g_q = 2·g ("unit") or b·g ("denorm");
        g_w = g_x / b;  g_l = Σ g_x·(x − 1)/b (+ Σ g·(1 − q) for "denorm");  g_u = Σ −g_x·x/b (+ Σ g·q);
        symmetric (l = −u): g_u ← g_u − g_l.

    The same terms as autograd's chain, summed in another order: equal within float32 rounding (tested).
    """

    @staticmethod
    def forward(ctx, w, lower, upper, quantizer, plan: ChannelPlan):
        ctx.set_materialize_grads(False)
        lo, up = quantizer._lu()
        x = quantizer.normalized(w)
        L1 = quantizer.n_levels - 1
        level = torch.round(torch.clamp(x, 0, 1) * L1)      # RoundToGrid's forward, op for op
        q = level / L1
        quantizer._remember(w, x, level)
        ctx.save_for_backward(x, lo, up)
        ctx.plan, ctx.unit, ctx.symmetric = plan, quantizer.output == "unit", quantizer.symmetric
        ctx.n_levels = quantizer.n_levels
        if ctx.unit:
            return (q - 0.5) * 2
        return lo + q * (up - lo)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None, None
        x, lo, up = ctx.saved_tensors
        plan: ChannelPlan = ctx.plan
        partial = plan.n_active != plan.n_channels
        if partial:
            g = g.index_select(0, plan.active)
            x = x.index_select(0, plan.active)
        b = up - lo
        inside = (x >= 0) & (x <= 1)
        gq = g * 2 if ctx.unit else g * b
        gx = gq * inside
        gw_rows = gx / b
        g_lo = (gx * (x - 1)).sum() / b
        g_up = -(gx * x).sum() / b
        if not ctx.unit:
            q = torch.round(torch.clamp(x, 0, 1) * (ctx.n_levels - 1)) / (ctx.n_levels - 1)
            gq_sum = (g * q).sum()
            g_lo = g_lo + (g.sum() - gq_sum)
            g_up = g_up + gq_sum
        if ctx.symmetric:
            g_up, g_lo = g_up - g_lo, None
        gw = gw_rows
        if partial:
            gw = gw_rows.new_zeros((plan.n_channels,) + tuple(gw_rows.shape[1:]))
            gw.index_copy_(0, plan.active, gw_rows)
        return (gw if ctx.needs_input_grad[0] else None,
                None if (g_lo is None or not ctx.needs_input_grad[1]) else g_lo.reshape(lo.shape),
                g_up.reshape(up.shape) if ctx.needs_input_grad[2] else None, None, None)


def planned_quantize(quantizer, w: torch.Tensor, plan: ChannelPlan | None) -> torch.Tensor:
    """ŵ = quantizer(w), through `ActiveIntervalQuantize` when the layer has a plan and the quantizer is the
    learned-interval one (others keep autograd's chain: its backward then runs on the zeros too)."""
    from .quantizers import LearnedIntervalQuantizer
    if plan is None or not torch.is_grad_enabled() or type(quantizer) is not LearnedIntervalQuantizer \
            or not bool(quantizer.initialized):
        return quantizer(w)
    return ActiveIntervalQuantize.apply(w, quantizer.lower, quantizer.upper, quantizer, plan)

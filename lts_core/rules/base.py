"""Freezing-rule machinery shared by LTS and oscillation freezing.

A rule watches every quantized weight of a model. Call `rule.step()` once per optimizer step, after
`loss.backward()` and before `optimizer.step()`: it measures each weight (the values this step's forward
used), updates the rule's state, freezes weights, and zeroes the gradient of frozen weights. A post-step
hook on the optimizer writes frozen weights back, so no optimizer (momentum, weight decay, Adam) moves them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..channel_grad import ConvSpec, plan_from_frozen
from ..channels import check_bound_grad, fully_frozen_channels
from ..fused import compiled_for, const, cpu_kernels, fused_enabled, kernel
from ..layers import quantized_layers

_F32_EXACT = 2 ** 24   # float32 holds every integer below this: counts and step numbers stay exact


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class FreezingRule:
    """Base class. Subclasses implement `_observe(i, level, r, w) -> (newly_frozen, freeze_value | None)`
    (`newly_frozen`: bool, or float32 1.0 / 0.0, of the weight's shape).

    `bound_grad` says what the quantizer bounds learn from: `"all"` (the reference: every weight of the layer,
    frozen or not, so the weight-gradient GEMM runs in full and nothing is saved) or `"active"` (only unfrozen
    weights: each layer gets a `ChannelPlan`, its backward computes the weight gradient of output channels
    with an unfrozen weight only, and a layer whose weights are all frozen gets no weight or bound gradient at
    all, so its bounds stop too). A weight's contribution to the bounds stops from the step after it froze.

    A rule built while `fused.fused_enabled()` (the default) keeps its masks also as float32 (1.0 / 0.0) and
    freeze steps as float32, and freezes, masks gradients and restores weights with arithmetic on those
    (`torch.lerp` with weights 0 and 1 returns one of its two ends exactly; bool-masked kernels cost 10–40× a
    float pass on the CPU): the same values as the bool operations of a rule built under `use_fused(False)`.
    `freeze_step` (int64) is brought up to date when read.
    """

    name = "none"
    moves_weights = False   # whether step() may write weights (oscillation freezing puts them on their level)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int,
                 layer_filter=None, bound_grad: str = "all"):
        if total_steps < 1:
            raise ValueError(f"total_steps must be ≥ 1, got {total_steps}")
        self.bound_grad = check_bound_grad(bound_grad)
        named = quantized_layers(model)
        if layer_filter is not None:
            named = [(n, m) for n, m in named if layer_filter(m)]
        if not named:
            raise ValueError("the model has no quantized layer to watch: call quantize_model() first")
        self.model = model
        self.total_steps = int(total_steps)
        self.layer_names = [n for n, _ in named]
        self.modules = [m for _, m in named]
        for m in self.modules:  # the measure_* methods then reuse the forward pass's position and level
            m.weight_quantizer.remember_forward = True
        self.numels = [m.weight.numel() for m in self.modules]
        self.n_levels = [int(m.weight_quantizer.n_levels) for m in self.modules]
        flops = [int(getattr(m, "flops", 0) or 0) for m in self.modules]
        # FLOP weights: measured forward FLOPs; without a measurement fall back to weight counts.
        # The denominator is the backward pass of the watched layers (2·Σ F): a fraction f of weight
        # updates eliminated, FLOP-weighted, saves f/2 of it (spec).
        self.layer_flops = flops if all(f > 0 for f in flops) else list(self.numels)
        self.total_model_flops = sum(self.layer_flops)
        self.n_channels = [int(m.weight.shape[0]) for m in self.modules]
        # whether a layer's backward honours a ChannelPlan (every Linear; convolutions with zero padding)
        self._plannable = [not hasattr(m, "padding_mode") or ConvSpec.of(m) is not None for m in self.modules]
        # The reference's denominator of "updates eliminated": every trainable parameter of the model
        # (weights, biases, BatchNorm affine, quantizer bounds), counted once here.
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.t = 0
        self.fused = fused_enabled()
        self.frozen = [torch.zeros_like(m.weight, dtype=torch.bool) for m in self.modules]
        self._unfrozen = [torch.ones_like(m.weight, dtype=torch.bool) for m in self.modules]
        self._freeze_step = [torch.full_like(m.weight, -1, dtype=torch.int64) for m in self.modules]
        self.frozen_values = [torch.zeros_like(m.weight) for m in self.modules]
        # fused path: 1.0 where unfrozen (float32), freeze steps as float32 (-1 never), frozen weights per channel
        self._live: list[torch.Tensor] = []
        self._freeze_step_f: list[torch.Tensor] = []
        self._channel_frozen: list[torch.Tensor] = []
        self._freeze_step_stale = False
        if self.fused:
            self._live = [torch.ones_like(m.weight, dtype=torch.float32) for m in self.modules]
            self._freeze_step_f = [torch.full_like(m.weight, -1, dtype=torch.float32) for m in self.modules]
            self._channel_frozen = [m.weight.new_zeros(m.weight.shape[0], dtype=torch.float32) for m in self.modules]
        # What the last step measured: level index (float32) and raw distance in normalised units (float32,
        # `measure_norm`); and, only for steps a Recorder asked for (`record_codes`), the uint8-grid distance
        # code of the forward pass (float32 0..255, `measure_code`) before any freezing moved a weight.
        self.last_level: list[torch.Tensor | None] = [None] * len(self.modules)
        self.last_raw: list[torch.Tensor | None] = [None] * len(self.modules)
        self.last_dist_code: list[torch.Tensor | None] = [None] * len(self.modules)
        self.record_codes = False
        self._n_frozen = [0] * len(self.modules)   # frozen weights per layer (Python ints: no device sync)
        self._mask_version = [0] * len(self.modules)   # + 1 whenever a layer's frozen mask may have changed
        # per layer, on CPU: its frozen weights listed while they are few (`fused_cpu.FrozenList`), for a cheaper
        # restore; only rules that keep the list up to date when they freeze (`_lists_kept`)
        self._lists: list = [None] * len(self.modules)
        self._n_frozen_channels = [0] * len(self.modules)  # output channels all of whose weights are frozen
        self._n_total = sum(self.numels)
        self._frozen_count_sum = 0  # Σ over steps of the number of frozen weights (after that step's freezes)
        self._flops_sum = 0.0    # Σ over steps of the backward-FLOPs fraction saved
        self._skip_sum = 0.0     # Σ over steps of the structurally skippable backward-FLOPs fraction
        self._hook = None
        self._buffers: dict[str, list[torch.Tensor | None]] = {}
        self.resyncs = 0
        # the frozen masks as of the last sync(), identical on every rank (what a DDP hook may rely on)
        self.comm_frozen: list[torch.Tensor] | None = None
        self.comm_version = 0
        if optimizer is not None:
            self.attach(optimizer)

    # ---- wiring -------------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore frozen weights after every `optimizer.step()`."""
        self._hook = optimizer.register_step_post_hook(lambda *_: self.restore())

    def detach(self) -> None:
        """Stop restoring frozen weights and give the layers their dense backward back."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for m in self.modules:
            m.channel_plan = None

    @property
    def granularity(self) -> str:
        return "weight"

    @property
    def freeze_step(self) -> list[torch.Tensor]:
        """Per layer, int64 of the weight's shape: the step each weight froze at, -1 = not frozen."""
        if self._freeze_step_stale:
            for dst, src in zip(self._freeze_step, self._freeze_step_f):
                dst.copy_(src)
            self._freeze_step_stale = False
        return self._freeze_step

    def _update_layer(self, i: int) -> None:
        """After layer i's frozen mask changed: count its fully frozen channels and, with `bound_grad="active"`,
        give it the plan of its active channels."""
        frozen = self.frozen[i]
        self._mask_version[i] += 1
        if self._n_frozen[i] in (0, self.numels[i]):
            self._n_frozen_channels[i] = self.n_channels[i] if self._n_frozen[i] else 0
        elif self.fused:
            k = self.numels[i] // self.n_channels[i]
            self._n_frozen_channels[i] = int(torch.eq(self._channel_frozen[i], k).sum())
        else:
            self._n_frozen_channels[i] = int(fully_frozen_channels(frozen).sum())
        if self.bound_grad == "active" and self._n_frozen[i]:
            self.modules[i].channel_plan = plan_from_frozen(frozen, per_weight=self.granularity == "weight",
                                                            none_when_frozen=not _distributed())
    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen weights back to the values they had when they froze."""
        for i, (m, val, n, k) in enumerate(zip(self.modules, self.frozen_values, self._n_frozen, self.numels)):
            if n and not (n == k and m.weight.grad is None):   # no gradient: no optimizer moved it
                if self.fused and (cpu := cpu_kernels(m.weight, val, self._unfrozen[i])) is not None:
                    w = cpu.flat(m.weight)
                    if (listed := self._frozen_list(i, cpu, build=True)) is not None:   # the listed ones only
                        cpu.run_split(cpu.restore_listed, listed.n, 1, w, listed.idx, listed.values)
                    else:   # one pass reading the bool mask, writing frozen weights only
                        cpu.run_split(cpu.restore, w.size, k // self.n_channels[i], w, cpu.flat(val),
                                      cpu.flat(self._unfrozen[i]))
                elif self.fused:   # live 1 → the weight, 0 → its frozen value (both exact)
                    torch.lerp(val, m.weight, self._live[i], out=m.weight)
                else:
                    torch.where(self.frozen[i], val, m.weight, out=m.weight)

    _lists_kept = False   # whether this rule's CPU step appends its freezes to the layer's FrozenList

    def _frozen_list(self, i: int, cpu, build: bool = False):
        """Layer i's `FrozenList` when it matches the frozen mask; with `build`, (re)built from the mask where
        the frozen weights are few enough; None where the full pass is used."""
        listed = self._lists[i]
        if listed is not None and listed.version == self._mask_version[i]:
            return listed
        self._lists[i] = None
        if not (build and self._lists_kept and self._n_frozen[i] <= cpu.LIST_MAX * self.numels[i]):
            return None
        idx = torch.nonzero(self.frozen[i].view(-1)).view(-1).to(torch.int32).numpy()
        self._lists[i] = cpu.FrozenList(self.numels[i], idx, cpu.flat(self.frozen_values[i])[idx],
                                        self._mask_version[i])
        return self._lists[i]

    def _buffer(self, name: str, i: int, dtype: torch.dtype) -> torch.Tensor:
        """A per-layer scratch tensor of layer i's weight shape, reused every step (large CPU allocations are
        page faults each time; the values are overwritten before use)."""
        bufs = self._buffers.setdefault(name, [None] * len(self.modules))
        if bufs[i] is None:
            bufs[i] = torch.empty(self.modules[i].weight.shape, dtype=dtype, device=self.modules[i].weight.device)
        return bufs[i]

    @property
    def _any_frozen(self) -> bool:
        return any(self._n_frozen)

    # ---- the per-step update ------------------------------------------------------------------------
    def _observe(self, i: int, level: torch.Tensor, r: torch.Tensor, w: torch.Tensor):
        raise NotImplementedError

    def _measure_observe(self, i: int, q, w: torch.Tensor):
        """Measure layer i (`last_level`, `last_raw`) and `_observe` it. Subclasses may do both in one kernel."""
        # float32 level index, exact raw distance (normalised units; a new tensor: `last_raw` stays valid)
        level, r = q.measure_norm(w)
        self.last_level[i] = level
        self.last_raw[i] = r
        return self._observe(i, level, r, w)

    @torch.no_grad()
    def step(self) -> None:
        """Observe step `self.t`, freeze, and zero the gradient of frozen weights."""
        for i, m in enumerate(self.modules):
            w = m.weight
            q = m.weight_quantizer
            if self._step_cpu(i, q, w):   # the numba loop did it all
                continue
            # the forward's distance code, before a freeze may move the weight; with the compiled kernels a rule
            # that never moves weights in step() leaves it to the recorder (one pass from the same forward)
            self.last_dist_code[i] = q.measure_code(w)[1] if self.record_codes and (
                self.moves_weights or not compiled_for(w)) else None
            newly, value = self._measure_observe(i, q, w)
            n_new = self._freeze(i, newly, value) if newly is not None else 0
            self._mask_grads(i, newly if n_new else None)
        self._frozen_count_sum += sum(self._n_frozen)
        self._flops_sum += sum(n / k * f for n, k, f in zip(self._n_frozen, self.numels, self.layer_flops)) \
            / (2 * self.total_model_flops)
        self._skip_sum += sum(c / k * f for c, k, f in zip(self._n_frozen_channels, self.n_channels,
                                                           self.layer_flops)) / (2 * self.total_model_flops)
        self.t += 1

    def _step_cpu(self, i: int, q, w: torch.Tensor) -> bool:
        """Step layer i in one numba pass (`fused_cpu`) where a subclass can: returns whether it did."""
        return False

    @torch.no_grad()
    def _freeze(self, i: int, newly: torch.Tensor, value: torch.Tensor | None = None) -> int:
        """Freeze layer i's weights selected by `newly` (bool or float32 1.0 / 0.0, the weight's shape; consumed)
        at step `self.t`, at their current value or at `value`. Returns how many were not frozen before."""
        if self.fused:
            return self._freeze_fused(i, newly, value)
        w = self.modules[i].weight
        newly &= self._unfrozen[i]
        n_new = int(newly.sum())
        if n_new:
            self.frozen[i] |= newly
            self._unfrozen[i] &= ~newly
            self.freeze_step[i].masked_fill_(newly, self.t)
            new_val = w if value is None else value
            self.frozen_values[i] = torch.where(newly, new_val, self.frozen_values[i])
            self._n_frozen[i] += n_new
            if value is not None:  # oscillation freezing moves the weight onto its level
                w.copy_(torch.where(newly, value, w))
            self._update_layer(i)
        return n_new

    def _freeze_fused(self, i: int, newly: torch.Tensor, value: torch.Tensor | None) -> int:
        """`_freeze` on the float32 masks: the same weights frozen, at the same step and values. `newly` may
        be a float32 mask already limited to unfrozen weights (`_live_only`), else it is limited here."""
        w = self.modules[i].weight
        live = self._live[i]
        if newly.dtype == torch.float32 and getattr(newly, "_live_only", False):
            new = newly
        else:
            new = torch.mul(newly if newly.dtype == torch.float32 else newly.to(torch.float32), live,
                            out=self._buffer("newly", i, torch.float32))
        n_new = int(new.sum() if new.numel() < _F32_EXACT else new.sum(dtype=torch.float64))
        if not n_new:
            return 0
        as_bool = new.to(torch.int16).to(torch.uint8).view(torch.bool)   # the fast cast (bool casts are slow)
        self.frozen[i] |= as_bool
        torch.logical_not(self.frozen[i], out=self._unfrozen[i])
        t = const(self.t, w.device)
        if self.t >= _F32_EXACT:   # step numbers beyond float32's integers: the int64 record directly
            self.freeze_step[i].masked_fill_(as_bool, self.t)
            self._freeze_step_f[i].copy_(self._freeze_step[i])
        if value is None and self.t < _F32_EXACT and compiled_for(new, w) and w.is_contiguous():
            kernel("freeze_update")(new.view(-1), w.view(-1), self.frozen_values[i].view(-1),
                                    self._freeze_step_f[i].view(-1), live.view(-1), t)
            self._freeze_step_stale = True
        else:
            if self.t < _F32_EXACT:
                torch.lerp(self._freeze_step_f[i], t, new, out=self._freeze_step_f[i])
                self._freeze_step_stale = True
            torch.lerp(self.frozen_values[i], w if value is None else value, new, out=self.frozen_values[i])
            if value is not None:  # oscillation freezing moves the weight onto its level
                torch.lerp(w, value, new, out=w)
            live.sub_(new)
        self._channel_frozen[i].add_(new.reshape(new.shape[0], -1).sum(dim=1))
        self._n_frozen[i] += n_new
        self._update_layer(i)
        return n_new

    def _refresh_fused_state(self) -> None:
        """Rebuild the float32 masks and freeze steps from `frozen` and `freeze_step` (after loading a state)."""
        if not self.fused:
            return
        for i, fz in enumerate(self.frozen):
            self._live[i].copy_(~fz)
            self._freeze_step_f[i].copy_(self._freeze_step[i])
            self._channel_frozen[i].copy_(fz.reshape(fz.shape[0], -1).sum(dim=1))

    def freeze_weights(self, i: int, mask: torch.Tensor) -> int:
        """Freeze the weights of layer i selected by `mask` now, at their current value (freeze step
        `self.t`), as if the rule had decided it: e.g. to put a model into a known frozen state (benchmarks,
        resuming from a mask). Returns how many were newly frozen."""
        mask = torch.as_tensor(mask, device=self.frozen[i].device).to(torch.bool).reshape(self.frozen[i].shape)
        return self._freeze(i, mask.clone())

    def _mask_grads(self, i: int, newly: torch.Tensor | None) -> None:
        """Zero the gradient of layer i's frozen weights. Under `bound_grad="active"` the layer's plan already
        gave zeros for the weights frozen before this step, so only this step's new ones (`newly`) are masked;
        a fully frozen layer's weight and bounds get no gradient at all (None: no optimizer moves them)."""
        m = self.modules[i]
        w = m.weight
        if not self._n_frozen[i] or w.grad is None:
            return
        if self.bound_grad == "active":
            if self._n_frozen[i] == self.numels[i]:
                w.grad = None
                for p in m.weight_quantizer.parameters():
                    p.grad = None
                return
            if self._plannable[i]:
                if newly is not None:
                    if self.fused:
                        self._mul_live(i, w.grad)
                    else:
                        w.grad.masked_fill_(newly, 0.0)
                return
        if self.fused:   # 0 (of either sign) where frozen, the gradient elsewhere
            self._mul_live(i, w.grad)
        else:
            w.grad.masked_fill_(self.frozen[i], 0.0)

    def _mul_live(self, i: int, grad: torch.Tensor) -> None:
        """grad × the float32 live mask (frozen weights' gradient × 0): a numba pass over the bool mask on CPU."""
        if grad.dtype == torch.float32 and (cpu := cpu_kernels(grad, self._unfrozen[i])) is not None:
            g = cpu.flat(grad)
            cpu.run_split(cpu.mask_grad, g.size, self.numels[i] // self.n_channels[i], g, cpu.flat(self._unfrozen[i]))
        else:
            grad.mul_(self._live[i])

    # ---- accounting ---------------------------------------------------------------------------------
    def frozen_count(self) -> int:
        """Number of watched weights frozen now."""
        return sum(self._n_frozen)

    def frozen_fraction(self) -> float:
        """Frozen share of all watched (quantized) weights now."""
        return sum(self._n_frozen) / self._n_total

    def frozen_fraction_all_params(self) -> float:
        """Frozen weights ÷ all trainable parameters now (the reference's per-iteration `iter_fixed_ratio`)."""
        return sum(self._n_frozen) / self.n_trainable

    def layer_frozen_fractions(self) -> dict[str, float]:
        return {n: k / t for n, k, t in zip(self.layer_names, self._n_frozen, self.numels)}

    def updates_eliminated(self) -> float:
        """Whole-run figure over the watched quantized weights: mean over the steps taken so far of the frozen
        fraction of those weights, counted after each step's freezes."""
        return self._frozen_count_sum / (self._n_total * max(self.t, 1))

    def updates_eliminated_all_params(self) -> float:
        """The paper's "weight updating eliminated": mean over the steps taken so far (warm-up included) of
        frozen weights ÷ all trainable parameters (weights, biases, BatchNorm affine, quantizer bounds)."""
        return self._frozen_count_sum / (self.n_trainable * max(self.t, 1))

    def backward_flops_saved(self) -> float:
        """Accounted, as the paper counts it: mean over steps of Σ_l frac_l·F_l / (2·Σ_l F_l), F = forward
        FLOPs of each watched layer: only the weight-gradient half of a frozen weight's backward cost is saved."""
        return self._flops_sum / max(self.t, 1)

    def backward_flops_skippable(self) -> float:
        """Structural: mean over steps of Σ_l c_l·F_l / (2·Σ_l F_l), c_l the share of layer l's output channels
        all of whose weights are frozen — the weight-gradient FLOPs a planned backward can skip
        (`bound_grad="active"` skips them; under `"all"` the GEMM still runs for the bounds)."""
        return self._skip_sum / max(self.t, 1)

    def frozen_channel_fraction(self) -> float:
        """Share of the watched layers' output channels that are fully frozen now."""
        return sum(self._n_frozen_channels) / sum(self.n_channels)

    def freeze_steps_flat(self) -> torch.Tensor:
        return torch.cat([f.flatten() for f in self.freeze_step]).cpu()

    def frozen_flat(self) -> torch.Tensor:
        return torch.cat([f.flatten() for f in self.frozen]).cpu()

    def settings(self) -> dict:
        return {"rule": self.name, "total_steps": self.total_steps, "bound_grad": self.bound_grad}

    def record_state(self) -> dict[str, list[torch.Tensor]]:
        """Per-layer uint8 arrays of the rule's own state for the recorder."""
        return {}

    # ---- persistence / DDP --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"frozen": self.frozen, "freeze_step": self.freeze_step, "frozen_values": self.frozen_values}

    def state_dict(self) -> dict:
        return {"t": self.t, "n_frozen": list(self._n_frozen), "frozen_count_sum": self._frozen_count_sum,
                "flops_sum": self._flops_sum, "skip_sum": self._skip_sum,
                **{k: [x.clone() for x in v] for k, v in self._state_tensors().items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.t = int(sd["t"])
        self._n_frozen = [int(n) for n in sd["n_frozen"]]
        self._frozen_count_sum, self._flops_sum = int(sd["frozen_count_sum"]), float(sd["flops_sum"])
        self._skip_sum = float(sd.get("skip_sum", 0.0))
        for k, tensors in self._state_tensors().items():
            for dst, src in zip(tensors, sd[k]):
                dst.copy_(src)
        self._unfrozen = [~f for f in self.frozen]
        self._refresh_fused_state()
        for i in range(len(self.modules)):
            self._update_layer(i)

    @torch.no_grad()
    def sync(self, src: int = 0) -> bool:
        """Under torch.distributed, check that every rank holds the same frozen masks and, if not, broadcast
        the rule's state from rank `src`. Returns True when a re-synchronisation was needed (counted in
        `self.resyncs`; identical weights on every rank make it 0). Afterwards `comm_frozen` holds the masks
        every rank agrees on (`ddp_comm.FrozenAwareAllReduce` sends no gradient for those weights)."""
        if not _distributed():
            return False
        resynced = self._sync(src)
        self.comm_frozen = [f.clone() for f in self.frozen]
        self.comm_version += 1
        return resynced

    def _sync(self, src: int) -> bool:
        fp = torch.stack([torch.stack([f.sum().double(), (f.flatten().double() *
                                                           torch.arange(f.numel(), device=f.device)).sum()])
                          for f in self.frozen]).flatten()
        lo, hi = fp.clone(), fp.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if torch.equal(lo, hi):
            return False
        self.resyncs += 1
        for tensors in self._state_tensors().values():
            for x in tensors:
                if x.dtype == torch.bool:
                    y = x.to(torch.uint8)
                    dist.broadcast(y, src)
                    x.copy_(y.bool())
                else:
                    dist.broadcast(x, src)
        self._n_frozen = [int(f.sum()) for f in self.frozen]
        self._unfrozen = [~f for f in self.frozen]
        self._refresh_fused_state()
        for i in range(len(self.modules)):
            self._update_layer(i)
        return True

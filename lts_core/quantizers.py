"""Weight and activation quantizers with a straight-through estimator.

Every weight quantizer maps a tensor to a *position* in quantization steps (level 0 at 0, unclamped);
the level index is `clamp(round(position), 0, L-1)` and the distance to it, in steps (Δ units), is
`|position - level|`. Inside the quantization interval the distance is in [0, 0.5].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .distance import DIST_MAX_CODE, DIST_SCALE
from .fused import fused_enabled, interval_quantize

QUANTIZER_KINDS = ("liq", "lsq", "binary", "ternary")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by `scale` (LSQ)."""
    return x * scale + (x - x * scale).detach()


class RoundToGrid(torch.autograd.Function):
    """(q, k) = (round(x·(L−1)) / (L−1), round(x·(L−1))) with the identity gradient for q (straight-through).

    The reference's `STE_discretizer`, op for op: `x` is the clamped normalised position in [0, 1], `k` the level
    index (float, no gradient) and `q = k/(L−1)` the quantized value in normalised units.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, n_levels: int):
        k = torch.round(x * (n_levels - 1))
        q = k / (n_levels - 1)
        ctx.mark_non_differentiable(k)
        ctx.set_materialize_grads(False)  # no gradient in (a fully frozen layer) → none out, nothing computed
        return q, k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        return grad_q, None


class WeightQuantizer(nn.Module):
    """Common interface: normalized(), position(), measure(), measure_norm(), level_value(), bounds().

    Two units: the *normalised* position x (the quantization range is [0, 1], one step is Δ = 1/(L−1); the
    LTS rule works in these units exactly as the reference code does) and the *step* position x·(L−1)
    (Δ units, level k at k; the recorder and the app use these).
    """

    kind = "base"

    def __init__(self, n_levels: int, bits: int):
        super().__init__()
        self.n_levels = int(n_levels)
        self.bits = int(bits)
        # Rules and recorders set this: forward() then keeps its normalised position and level for the
        # measure_* methods.
        self.remember_forward = False
        # (stamp, normalised position x, level k, k/(L−1) or None) of the last forward pass
        self._seen: tuple | None = None

    def normalized(self, w: torch.Tensor) -> torch.Tensor:
        """Unclamped normalised position (range [0, 1] maps to levels 0 … L−1). Default: position/(L−1)."""
        return self.position(w) / (self.n_levels - 1)

    def position(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def measure(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(level index int64 in [0, L-1], distance to that level in Δ units, float32)."""
        pos, level = self._position_level(w.detach())
        return level.to(torch.int64), pos.sub_(level).abs_()

    def _position_level(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in steps, level index) as fresh float32 tensors: the level the forward pass rounds to.
        Default: level = round(position) clamped to [0, L−1]."""
        pos = self.position(w).float()
        return pos, torch.round(pos).clamp_(0, self.n_levels - 1)

    def _remembered(self, w: torch.Tensor) -> tuple | None:
        """(normalised position x, level k, k/(L−1) or None) of the last forward pass when it saw this very `w`
        and these bounds (same storage, no in-place change since: torch's version counters), else None."""
        seen = self._seen
        if seen is not None and seen[0] == self._stamp(w):
            if seen[2] is None:   # the numba forward keeps x and k/(L−1) only: k = round(k/(L−1)·(L−1)), exact
                self._seen = seen = (seen[0], seen[1], torch.round(seen[3] * (self.n_levels - 1)), seen[3])
            return seen[1:]
        return None

    @torch.no_grad()
    def measure_norm(self, w: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The LTS rule's measurement, as the reference computes it: (level index k as float32, raw distance
        r = |x − k/(L−1)| in *normalised* units, float32), x the unclamped normalised position and
        k = round(clamp(x, 0, 1)·(L−1)). Multiply r by L−1 for Δ units. Reuses the forward pass's x and k
        when nothing changed since (bit for bit the same result). `out` (float32, w's shape) receives r."""
        seen = self._remembered(w)
        x, level = (seen[0].float(), seen[1].float()) if seen is not None else self._fresh_x_level(w.detach())
        if seen is not None and seen[2] is not None:   # the fused forward's k/(L−1): one division fewer
            return level, torch.sub(x, seen[2], **({} if out is None else {"out": out})).abs_()
        step = torch.div(level, self.n_levels - 1, out=out) if out is not None else level / (self.n_levels - 1)
        return level, torch.sub(x, step, out=step).abs_()

    def _fresh_x_level(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised position, level index) as float32, computed from `w`; level = round(position) clamped."""
        pos, level = self._position_level(w)
        return pos.div_(self.n_levels - 1), level

    @torch.no_grad()
    def measure_code(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorder's measurement: (level index, distance code) both as float32.

        The code is `clamp(round(dist·128), 0, 255)` with dist = |x·(L−1) − k| in Δ units, the value
        `distance.encode_distance` stores as uint8. Reuses the forward pass's x and k when nothing changed since.
        """
        seen = self._remembered(w)
        if seen is not None:
            level = seen[1].float()
            code = seen[0].float() * (self.n_levels - 1)
        else:
            code, level = self._position_level(w.detach())
        code.sub_(level).abs_().mul_(DIST_SCALE).round_().clamp_(max=DIST_MAX_CODE)
        return level, code

    def __getstate__(self):  # pickling a model does not carry the remembered tensors
        state = dict(self.__dict__)
        state["_seen"] = None
        return state

    def _stamp(self, w: torch.Tensor) -> tuple | None:
        """Identity of `w` and of this quantizer's parameters: storage and in-place version of each."""
        try:
            return ((w.data_ptr(), w._version),) + tuple((p.data_ptr(), p._version) for p in self.parameters())
        except RuntimeError:  # inference tensors carry no version counter
            return None

    def _remember(self, w: torch.Tensor, x: torch.Tensor, level: torch.Tensor,
                  step: torch.Tensor | None = None) -> None:
        """Called by forward(): keep its (unclamped normalised position, level index and, when at hand,
        level/(L−1)) of `w`. The level may be None when level/(L−1) is given (`_remembered` derives it)."""
        if not self.remember_forward:
            return
        stamp = self._stamp(w)
        self._seen = None if stamp is None else (stamp, x.detach(), None if level is None else level.detach(),
                                                 None if step is None else step.detach())

    def level_value(self, level: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bounds(self) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError


class LearnedIntervalQuantizer(WeightQuantizer):
    """The reference's learnable-interval quantizer: levels evenly spaced on [lower, upper].

    x = (w - l) / (u - l) clamped to [0, 1]; k = round(x·(L-1)); q = k/(L-1).
    output="denorm" returns l + q·(u - l) (weight units, for layers without BatchNorm);
    output="unit" returns 2q - 1 (the reference's choice before a BatchNorm).
    symmetric=True ties lower = -upper (ternary {-a, 0, +a} with 3 levels).
    """

    kind = "liq"

    def __init__(self, bits: int = 2, n_levels: int | None = None, output: str = "denorm",
                 symmetric: bool = False):
        if n_levels is None:
            if not 1 <= bits <= 8:
                raise ValueError(f"bits must be in 1..8, got {bits}")
            n_levels = 2 ** bits
        super().__init__(n_levels, bits)
        if output not in ("denorm", "unit"):
            raise ValueError(f"output must be 'denorm' or 'unit', got {output!r}")
        self.output = output
        self.symmetric = symmetric
        self.kind = "ternary" if (symmetric and n_levels == 3) else ("binary" if n_levels == 2 else "liq")
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.lower = nn.Parameter(torch.tensor(-1.0), requires_grad=not symmetric)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Bounds at ∓3·std(w) (spec)."""
        w = w.detach().float()
        a = 3 * (w.std() if w.numel() > 1 else w.abs().max()).clamp_min(1e-8)
        self.upper.fill_(a)
        self.lower.fill_(-a)
        self.initialized.fill_(True)

    def _lu(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower = -self.upper if self.symmetric else self.lower
        return lower, self.upper

    def normalized(self, w: torch.Tensor) -> torch.Tensor:
        """x = (w − l)/(u − l), unclamped (the reference's pre-quantization weight)."""
        if not bool(self.initialized):
            self.init_from(w)
        lower, upper = self._lu()
        return (w - lower) / (upper - lower)

    def position(self, w: torch.Tensor) -> torch.Tensor:
        return self.normalized(w) * (self.n_levels - 1)

    def _fresh_x_level(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalized(w).float()
        return x, torch.round(torch.clamp(x, 0, 1) * (self.n_levels - 1))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The reference's weight quantization, op for op: x = (w − l)/(u − l), clamp to [0, 1],
        q = round(x·(L−1))/(L−1) with a straight-through gradient, then 2q − 1 ("unit") or l + q·(u − l).
        Runs as one autograd Function (`fused.IntervalQuantize`, the same bits) unless `fused.use_fused(False)`."""
        if fused_enabled() and w.dtype == torch.float32:
            return interval_quantize(self, w)
        lower, upper = self._lu()
        x = self.normalized(w)
        q, level = RoundToGrid.apply(torch.clamp(x, 0, 1), self.n_levels)
        self._remember(w, x, level)
        if self.output == "unit":
            return (q - 0.5) * 2
        return lower + q * (upper - lower)

    def level_value(self, level: torch.Tensor) -> torch.Tensor:
        """Latent weight value (weight units) sitting exactly on `level`."""
        lower, upper = self._lu()
        return (lower + level.to(upper.dtype) / (self.n_levels - 1) * (upper - lower)).detach()

    def bounds(self) -> dict[str, float]:
        lower, upper = self._lu()
        return {"lower": float(lower), "upper": float(upper)}


class LSQQuantizer(WeightQuantizer):
    """LSQ (Esser et al. 2020): learned step s, signed integer levels Qn..Qp, gradient scale 1/sqrt(n·Qp).

    position = w/s - Qn, so level 0 is the most negative value; step units are s.
    """

    kind = "lsq"

    def __init__(self, bits: int = 2):
        if not 2 <= bits <= 8:
            raise ValueError(f"LSQ supports 2..8 bits (use 'liq' for 1 bit), got {bits}")
        super().__init__(2 ** bits, bits)
        self.qn = -(2 ** (bits - 1))
        self.qp = 2 ** (bits - 1) - 1
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """s = 2·mean|w| / sqrt(Qp) (LSQ paper)."""
        self.step.fill_(2 * w.detach().abs().mean().clamp_min(1e-8) / math.sqrt(self.qp))
        self.initialized.fill_(True)

    def position(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(w)
        return w / self.step - self.qn

    def _position_level(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The level from w/s, as the forward pass rounds it: round(w/s) − Qn. Rounding w/s − Qn instead can
        differ at a tie, where adding Qn loses the bits that put w/s just above or below k + ½."""
        if not bool(self.initialized):
            self.init_from(w)
        u = (w / self.step).float()
        k = torch.round(u).clamp_(self.qn, self.qp)
        return u.sub_(self.qn), k.sub_(self.qn)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(w)
        s = grad_scale(self.step, 1.0 / math.sqrt(w.numel() * self.qp))
        return round_ste(torch.clamp(w / s, self.qn, self.qp)) * s

    def level_value(self, level: torch.Tensor) -> torch.Tensor:
        return ((level.to(self.step.dtype) + self.qn) * self.step).detach()

    def bounds(self) -> dict[str, float]:
        return {"step": float(self.step)}


class ActivationQuantizer(nn.Module):
    """Unsigned learnable-interval quantizer for activations; bounds set on the first training batch.

    lower = batch min, upper = 3·std / sqrt(1 - 2/π) (spec); output in activation units.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"activation bits must be in 1..8, got {bits}")
        self.bits = bits
        self.n_levels = 2 ** bits
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            if not self.training:
                return x  # never calibrated: pass through until the first training batch
            with torch.no_grad():
                lo = x.detach().min()
                hi = 3 * x.detach().float().std() / math.sqrt(1 - 2 / math.pi)
                self.lower.fill_(lo)
                self.upper.fill_(torch.maximum(hi, lo + 1e-3))
                self.initialized.fill_(True)
        span = self.upper - self.lower
        k = round_ste(torch.clamp((x - self.lower) / span, 0, 1) * (self.n_levels - 1))
        return self.lower + k / (self.n_levels - 1) * span


def make_weight_quantizer(method: str = "liq", bits: int = 2, output: str = "denorm") -> WeightQuantizer:
    """Factory: 'liq' (1..8 bits; 1 bit = binary), 'ternary' (3 symmetric levels), 'lsq' (2..8 bits)."""
    if method == "liq":
        return LearnedIntervalQuantizer(bits=bits, output=output)
    if method == "binary":
        return LearnedIntervalQuantizer(bits=1, output=output)
    if method == "ternary":
        return LearnedIntervalQuantizer(bits=2, n_levels=3, output=output, symmetric=True)
    if method == "lsq":
        return LSQQuantizer(bits=bits)
    raise ValueError(f"unknown quantizer {method!r}; expected one of {', '.join(QUANTIZER_KINDS)}")

"""Trainer: full-precision pre-training, then QAT with rule none (baseline), lts or osc.

The same seed gives the same pre-trained checkpoint and the same data order for all three rules.
Runs under `torchrun` with DDP (gloo on CPU, NCCL on GPU); only rank 0 records.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .datasets import DatasetSplit, data_dir, load_dataset
from .fused import use_compile
from .layers import quantize_model, quantized_layers
from .models import ARCH_VERSION, build_model
from .progress import report as report_progress
from .rules import FreezingRule, LTSRule, OscillationRule
from .store import StoreWriteError, write_file_atomic



class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainResult:
    run_dir: Path | None
    fp_test_acc: float
    metrics: list[dict] = field(default_factory=list)
    status: str = "complete"
    frozen_mask: torch.Tensor | None = None


# ---- devices, seeds, distributed ----------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed(device: torch.device) -> torch.device:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_order(n: int, seed: int, epoch: int, phase: str) -> torch.Tensor:
    """The data order of one epoch: a permutation fixed by (seed, phase, epoch), identical for every rule."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + (0 if phase == "fp" else 1))
    return torch.randperm(n, generator=g)


def batches(order: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1, drop_last: bool = True):
    """Index batches of one epoch (the last partial batch is dropped unless `drop_last` is False); under DDP
    each rank takes its slice of every global batch."""
    for b in range(steps_per_epoch(len(order), batch_size, drop_last)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield idx[rank::world]


def steps_per_epoch(n_train: int, batch_size: int, drop_last: bool = True) -> int:
    """Optimizer steps per epoch: full batches only, or (drop_last=False, as the reference) every batch."""
    return max(1, n_train // batch_size if drop_last else -(-n_train // batch_size))


# ---- evaluation and loops -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, bs: int = 1024) -> float:
    """Test accuracy in %."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        correct += (model(x[i:i + bs].to(device)).argmax(1).cpu() == y[i:i + bs]).sum().item()
    model.train(was)
    return 100.0 * correct / max(len(x), 1)


def lr_factor(kind: str, step: int, total: int) -> float:
    """LR multiplier at a step: cosine to 0, step decay ×0.1 at 50% and 75%, or constant."""
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    if kind == "step":
        return 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))
    return 1.0


def fp_cache_path(cfg: TrainConfig) -> Path:
    key = {k: getattr(cfg, k) for k in ("model", "dataset", "width", "max_train", "fp_epochs", "fp_lr",
                                        "batch_size", "seed", "momentum", "weight_decay", "data_root")}
    key["arch"] = ARCH_VERSION  # module names changed (layer names by module path): old checkpoints don't load
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return data_dir() / "cache" / "fp" / f"{cfg.model}-{cfg.dataset}-{digest}.pt"


def _load_fp_cache(path: Path, model: nn.Module, device: torch.device) -> bool:
    """Load the cached FP weights into `model`. A file that does not load (truncated, corrupt, another
    model's) is reported in one warning line naming it, removed, and False is returned: it is rebuilt."""
    try:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return True
    except Exception as e:
        warnings.warn(f"the cached pre-trained model {path} is unreadable ({type(e).__name__}: truncated or "
                      "corrupt?); pre-training again to rebuild it", RuntimeWarning, stacklevel=3)
        path.unlink(missing_ok=True)
        return False


def pretrain_fp(cfg: TrainConfig, data: DatasetSplit, device: torch.device, run: str | None = None) -> nn.Module:
    """Full-precision pre-training (cached on disk by config and seed, so every rule starts identical).
    `run` names the run in progress reports (`lts_core.progress`). A cache that cannot be written raises
    StoreWriteError (no temp file is left)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.in_shape, data.n_classes, width=cfg.width).to(device)
    path = fp_cache_path(cfg)
    if path.is_file():
        if _load_fp_cache(path, model, device):
            report_progress("fp", cfg.fp_epochs, cfg.fp_epochs, run)
            return model
        torch.manual_seed(cfg.seed)  # a failed load may have changed some weights: start from scratch
        model = build_model(cfg.model, data.in_shape, data.n_classes, width=cfg.width).to(device)
    report_progress("fp", 0, cfg.fp_epochs, run)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.fp_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(data.x_train)
    spe = steps_per_epoch(n, cfg.batch_size)
    total, t = spe * cfg.fp_epochs, 0
    model.train()
    for epoch in range(cfg.fp_epochs):
        for idx in batches(epoch_order(n, cfg.seed, epoch, "fp"), cfg.batch_size):
            for g in opt.param_groups:
                g["lr"] = cfg.fp_lr * lr_factor("cosine", t, total)
            loss = F.cross_entropy(model(data.x_train[idx].to(device)), data.y_train[idx].to(device))
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"NaN/inf loss during full-precision pre-training at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t += 1
        report_progress("fp", epoch + 1, cfg.fp_epochs, run)
    if dist_info()[0] == 0:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)  # in memory: a full disk then gives an OSError, not torch's message
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreWriteError.from_oserror(e, path.parent) from None
        write_file_atomic(path, buf.getvalue())
    return model


def epoch_line(row: dict, epochs: int, has_rule: bool) -> str:
    """One log line per epoch, every figure labelled with its denominator."""
    line = (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  acc {row['test_acc']:.2f}%  "
            f"{row['seconds']:.1f} s (steps {row['step_seconds']:.1f} s, of which backward "
            f"{row['backward_seconds']:.1f} s)")
    if has_rule:
        line += (f"  frozen {row['frozen_fraction']:.1%} of quantized weights  updates eliminated so far "
                 f"{row['updates_eliminated']:.1%} of quantized weights = "
                 f"{row['updates_eliminated_all_params']:.1%} of all trainable params (the paper's denominator)"
                 f"  backward FLOPs saved: accounted {row['backward_flops_saved']:.1%}, structurally skippable "
                 f"{row['backward_flops_skippable']:.1%}")
    return line


class StepClock:
    """Wall-clock sums over an epoch's steps: whole steps and their backward passes (seconds). On CUDA the
    device is synchronised before each reading, so queued kernels are counted where they run."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.step_seconds = self.backward_seconds = 0.0

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def make_rule(cfg: TrainConfig, model: nn.Module, opt, total_steps: int, spe: int) -> FreezingRule | None:
    if cfg.rule == "lts":
        return LTSRule(model, opt, total_steps, warmup_steps=int(round(cfg.warmup * spe)), schedule=cfg.schedule,
                       ratio=cfg.ratio, decay=cfg.decay, granularity=cfg.granularity,
                       channel_quantile=cfg.channel_quantile, bound_grad=cfg.bound_grad)
    if cfg.rule == "osc":
        return OscillationRule(model, opt, total_steps, decay=cfg.osc_decay, start_frac=cfg.osc_start_frac,
                               bound_grad=cfg.bound_grad)
    return None


class _SigtermAsInterrupt:
    """Turn SIGTERM into KeyboardInterrupt so a stopped run is closed as 'interrupted'."""

    def __enter__(self):
        self.prev = None
        try:
            self.prev = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)
        return False


def train(cfg: TrainConfig, run_dir: str | Path | None = None, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Pre-train (or load the cached FP model), then run QAT with `cfg.rule`, recording to `run_dir`.

    `run_dir=None` records nothing. `should_stop()` is polled every step: True closes the run 'interrupted'.
    `cfg.compile` switches the compiled kernels on for the run (`fused.use_compile`).
    """
    with use_compile(cfg.compile):
        return _train(cfg, run_dir, progress, on_epoch, should_stop)


def _train(cfg: TrainConfig, run_dir, progress, on_epoch, should_stop) -> TrainResult:
    from .recorder import Recorder  # the recorder imports the store; keep engine import light

    device = maybe_init_distributed(pick_device(cfg.device))
    rank, world = dist_info()
    seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, root=cfg.data_root, seed=cfg.seed, max_train=cfg.max_train,
                        max_test=cfg.max_test)
    run_name = Path(run_dir).name if run_dir is not None else None
    model = pretrain_fp(cfg, data, device, run=run_name)
    fp_acc = evaluate(model, data.x_test, data.y_test, device)

    if cfg.weight_output == "unit" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                               for m in model.modules()):
        warnings.warn(f"weight_output='unit' (the reference's 2q − 1) relies on a BatchNorm after each layer for "
                      f"scale, and model {cfg.model!r} has none: expect poor accuracy (the reference uses it with "
                      "ResNets and MobileNets; e.g. cnn1d, cnn2d, resnet20 here)", UserWarning, stacklevel=2)
    quantize_model(model, bits=cfg.bits, method=cfg.quantizer, act_bits=cfg.act_bits,
                   first_last_bits=cfg.first_last_bits, output=cfg.weight_output,
                   example_input=data.x_test[:2].to(device))
    model.train()
    qparams = [p for n, p in model.named_parameters() if "quantizer" in n]
    wparams = [p for n, p in model.named_parameters() if "quantizer" not in n]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(wparams, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(wparams, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bound_opt = torch.optim.Adam(qparams, lr=cfg.bound_lr) if qparams else None

    n = len(data.x_train)
    spe = steps_per_epoch(n, cfg.batch_size, cfg.drop_last)
    total = spe * cfg.epochs
    rule = make_rule(cfg, model, opt, total, spe)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if rule is not None:   # no gradient traffic for weights frozen as of the last rule.sync()
            from .ddp_comm import FrozenAwareAllReduce
            comm = FrozenAwareAllReduce(rule)
            net.register_comm_hook(comm, comm.hook)

    rec = None
    if run_dir is not None and rank == 0 and cfg.record:
        run_dir = Path(run_dir)
        rec = Recorder.create(run_dir.parent, model, config=cfg.model_dump(), rule=rule,
                              every=cfg.record_every or spe, steps_per_epoch=spe, total_steps=total,
                              run_id=run_dir.name, record_side=True,
                              extra_manifest={"device": str(device), "fp_test_acc": fp_acc, "world_size": world,
                                              "warmup_steps": int(round(cfg.warmup * spe)),
                                              "label": cfg.label(), "dataset_sizes": [n, len(data.x_test)]})
    result = TrainResult(run_dir=Path(run_dir) if rec else None, fp_test_acc=fp_acc)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs, desc=cfg.label(), unit="epoch")
    t = 0
    report_progress("qat", 0, cfg.epochs, run_name)
    try:
        with _SigtermAsInterrupt():
            for epoch in range(cfg.epochs):
                t0 = time.perf_counter()
                clock = StepClock(device)
                loss_sum = torch.zeros((), device=device)
                n_b = 0
                for idx in batches(epoch_order(n, cfg.seed, epoch, "qat"), cfg.batch_size, rank, world,
                                   cfg.drop_last):
                    s0 = clock.now()
                    lr = cfg.lr * lr_factor(cfg.lr_schedule, t, total)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    out = net(data.x_train[idx].to(device, non_blocking=True))
                    loss = F.cross_entropy(out, data.y_train[idx].to(device, non_blocking=True))
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch + 1}, step {t}: "
                                            f"try a lower learning rate (lr={cfg.lr})")
                    opt.zero_grad(set_to_none=True)
                    if bound_opt:
                        bound_opt.zero_grad(set_to_none=True)
                    b0 = clock.now()
                    loss.backward()
                    clock.backward_seconds += clock.now() - b0
                    if rule is not None:
                        rule.step()
                    if rec is not None:
                        rec.step()
                    opt.step()
                    if bound_opt:
                        bound_opt.step()  # bounds keep learning: a frozen weight's level may still move
                    clock.step_seconds += clock.now() - s0
                    loss_sum += loss.detach()
                    n_b += 1
                    t += 1
                    if should_stop is not None and should_stop():
                        raise KeyboardInterrupt
                if rule is not None and world > 1:
                    rule.sync()
                acc = evaluate(model, data.x_test, data.y_test, device)
                row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(n_b, 1), "test_acc": acc,
                       "frozen_fraction": rule.frozen_fraction() if rule else 0.0,
                       "updates_eliminated": rule.updates_eliminated() if rule else 0.0,
                       "backward_flops_saved": rule.backward_flops_saved() if rule else 0.0,
                       "seconds": time.perf_counter() - t0, "lr": lr,
                       "updates_eliminated_all_params": rule.updates_eliminated_all_params() if rule else 0.0,
                       "backward_flops_skippable": rule.backward_flops_skippable() if rule else 0.0,
                       "step_seconds": clock.step_seconds, "backward_seconds": clock.backward_seconds}
                result.metrics.append(row)
                if rec is not None:
                    rec.log_epoch(row)  # after the epoch's records are on disk (each is written as taken)
                report_progress("qat", epoch + 1, cfg.epochs, run_name)
                if on_epoch is not None:
                    on_epoch(row)
                if bar is not None:
                    bar.update(1)
                    bar.write(epoch_line(row, cfg.epochs, rule is not None))
                    bar.set_postfix(acc=f"{acc:.1f}%", frozen=f"{row['frozen_fraction']:.0%}")
    except KeyboardInterrupt:
        result.status = "interrupted"
        if rec is not None:
            rec.finish("interrupted", reason=f"interrupted by user at step {t} (epoch {t / spe:.2f})")
        raise
    except NonFiniteLoss as e:
        result.status = "failed"
        if rec is not None:
            rec.finish("failed", reason=str(e))
        raise
    except BaseException as e:
        result.status = "failed"
        if rec is not None:
            rec.finish("failed", reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        if bar is not None:
            bar.close()
    if rec is not None:
        rec.finish("complete")
    if rule is not None:
        result.frozen_mask = rule.frozen_flat()
    return result

"""Training configuration, validated with pydantic; one clear line per invalid field.

Types are strict: a JSON/TOML config must give numbers as numbers (``"bits": true`` or ``"epochs": "30"``
is refused, an integer is accepted where a float is expected), and NaN or infinity nowhere.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .manifest import one_line

from .channels import DEFAULT_CHANNEL_QUANTILE
from .datasets import DATASETS
from .models import MODELS


class ConfigError(ValueError):
    """An invalid training configuration (message is one line, suitable for a CLI)."""


PRESETS = ("default", "reference")

# What `preset="reference"` sets (unless given explicitly): training as the LTS reference code's main_fixed.py.
REFERENCE_PRESET = {
    "first_last_bits": "bits",   # every conv/linear layer quantized at the same bits, first and last included
    "weight_output": "unit",     # the quantizer's 2q − 1 output everywhere
    "drop_last": False,          # steps per epoch count the partial last batch
    "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4,   # weights and biases
    "bound_lr": 1e-4,            # Adam over the quantizer bounds
}

SEED_LIMIT = 2 ** 32
BUILT_IN_DATASETS = ("digits", "mnist1d", "mnist1d-seq")  # bundled or generated locally; the others need files
NEEDS_DATA_ROOT = tuple(d for d in DATASETS if d not in BUILT_IN_DATASETS)
QUANTIZER_BITS = {"binary": 1, "ternary": 2}  # fixed widths: binary has 2 levels, ternary 3 (stored as 2 bits)


class TrainConfig(BaseModel):
    """Everything that defines a run. Epoch counts are QAT epochs unless prefixed fp_.

    `preset="reference"` sets up QAT as the LTS reference code does (`REFERENCE_PRESET`); any field given
    explicitly still wins. Example::

        cfg = TrainConfig(preset="reference", model="resnet20", dataset="cifar10", bits=2, schedule="linear")
        cfg.first_last_bits, cfg.weight_output, cfg.drop_last, cfg.bound_lr   # (2, 'unit', False, 0.0001)
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    preset: Literal["default", "reference"] = "default"

    model: str = "mlp"
    dataset: str = "digits"
    data_root: str | None = None
    width: int | None = Field(None, ge=1)
    max_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)

    bits: int = Field(2, ge=1, le=8, description="weight bits of the quantized layers")
    quantizer: Literal["liq", "lsq", "binary", "ternary"] = "liq"
    act_bits: int | None = Field(None, ge=1, le=8)
    first_last_bits: int | None = Field(None, ge=1, le=8, description="None keeps first/last layers in FP")
    weight_output: Literal["denorm", "unit"] = Field(
        "denorm", description="quantized weight as l + q·(u − l) (denorm) or the reference's 2q − 1 (unit)")

    rule: Literal["none", "lts", "osc"] = "lts"
    schedule: Literal["fixed", "linear", "sine"] = "linear"
    threshold: float | None = Field(None, ge=0, description="ratio ρ in Δ (default 0.1 fixed, 1.0 growth)")
    decay: float = Field(0.99, ge=0, lt=1, description="EMA decay m")
    warmup_epochs: float | None = Field(None, ge=0, description="default: 20% of epochs")
    granularity: Literal["weight", "channel"] = Field(
        "weight", description="LTS freezes single weights (the paper) or whole output channels")
    channel_quantile: float = Field(
        DEFAULT_CHANNEL_QUANTILE, gt=0, le=1, description="channel granularity: freeze a channel when this "
        "quantile of its weights' EMA distances passes the threshold (0.25, the default: a quarter of them "
        "settled; 0.5 = median; 1 = max: every weight settled)")
    bound_grad: Literal["all", "active"] = Field(
        "all", description="quantizer bounds learn from all weights (the reference; no backward time saved) "
        "or only unfrozen ones (frozen channels skip their weight-gradient computation)")
    osc_decay: float = Field(0.01, gt=0, lt=1)
    osc_start_frac: float = Field(0.25, ge=0, lt=1)

    epochs: int = Field(30, ge=1, description="QAT epochs")
    fp_epochs: int = Field(20, ge=0, description="full-precision pre-training epochs")
    batch_size: int = Field(128, ge=1)
    drop_last: bool = Field(True, description="QAT epochs drop the partial last batch (the reference keeps it)")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    fp_lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    bound_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the quantizer bounds")
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="0 ≤ seed < 2**32 (numpy's and sklearn's range)")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    record: bool = True
    record_every: int | None = Field(None, ge=1, description="steps between records; default once per epoch")
    compile: bool = Field(False, description="run the quantizer's, the rule's and the recorder's elementwise work "
                          "as torch.compile'd C++ kernels on the CPU (same results; needs a C++ compiler; "
                          "compiling takes 10–60 s at the start)")

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data):
        """`binary` / `ternary` without bits: their own width; then the preset's settings into the fields not
        given explicitly."""
        if isinstance(data, dict) and data.get("quantizer") in QUANTIZER_BITS and data.get("bits") is None:
            data = {**data, "bits": QUANTIZER_BITS[data["quantizer"]]}
        if isinstance(data, dict) and data.get("preset") == "reference":
            data = dict(data)
            for key, value in REFERENCE_PRESET.items():
                if data.get(key) is None:
                    data[key] = data.get("bits", cls.model_fields["bits"].default) if value == "bits" else value
        return data

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warm-up ({self.warmup_epochs} epochs) must be shorter than training "
                             f"({self.epochs} epochs)")
        if self.granularity == "channel" and self.rule != "lts":
            raise ValueError(f"granularity 'channel' is an LTS setting; it needs rule 'lts', not {self.rule!r}")
        if self.quantizer == "lsq" and self.bits < 2:
            raise ValueError("the lsq quantizer needs 2..8 bits (use liq or binary for 1 bit)")
        fixed = QUANTIZER_BITS.get(self.quantizer)
        if fixed is not None and self.bits != fixed:
            raise ValueError(f"the {self.quantizer} quantizer is {fixed} bit{'s' if fixed > 1 else ''} wide; "
                             f"bits={self.bits} does not apply (leave bits out)")
        if self.compile:
            from .fused import compile_unavailable
            if (reason := compile_unavailable()) is not None:
                raise ValueError(f"compile is not available here: {reason}")
        return self

    # -- derived values ---------------------------------------------------------------------------
    @property
    def ratio(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.1 if self.schedule == "fixed" else 1.0

    @property
    def warmup(self) -> float:
        return 0.2 * self.epochs if self.warmup_epochs is None else self.warmup_epochs

    def label(self) -> str:
        """A short human name, e.g. 'mlp-digits-2b-lts-linear-r1'."""
        tail = {"none": "baseline", "osc": "osc", "lts": f"lts-{self.schedule}-r{self.ratio:g}"}[self.rule]
        if self.rule == "lts" and self.granularity == "channel":
            tail += f"-ch{self.channel_quantile:g}"
        if self.rule != "none" and self.bound_grad == "active":
            tail += "-active"
        ref = "-ref" if self.preset == "reference" else ""
        return f"{self.model}-{self.dataset}-{self.bits}b{ref}-{tail}"


def format_validation_error(err: ValidationError) -> str:
    """One line: 'bits: Input should be less than or equal to 8; …'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(one_line(f"{loc}: {msg}" if loc != "config" else msg, 300))
    return "invalid config — " + "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")


def make_config(**fields) -> TrainConfig:
    """Build a TrainConfig, raising ConfigError with a one-line message."""
    try:
        return TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


MAX_CONFIG_BYTES = 1 << 20


def load_config_file(path: str | Path) -> dict:
    """Read a .json or .toml config file into a dict of TrainConfig fields (ConfigError, one line, if it is
    missing, unreadable, not UTF-8, not parsable, too deep or not a table of options)."""
    p = Path(path)
    name = one_line(str(p), 300)
    if not p.exists():
        raise ConfigError(f"config file not found: {name}")
    if not p.is_file():
        raise ConfigError(f"config file {name} is not a file")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {name} is over {MAX_CONFIG_BYTES >> 20} MiB; not a config")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {name} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {name}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else one_line(e, 200)
        raise ConfigError(f"cannot parse config file {name}: {why}") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise ConfigError(f"config file {name} must hold a table of options (a JSON object), not {kind}")
    return data

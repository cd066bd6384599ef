"""Training configuration, validated with pydantic; one clear line per invalid field."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .datasets import DATASETS
from .models import MODELS


class ConfigError(ValueError):
    """An invalid training configuration (message is one line, suitable for a CLI)."""


class TrainConfig(BaseModel):
    """Everything that defines a run. Epoch counts are QAT epochs unless prefixed fp_."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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

    rule: Literal["none", "lts", "osc"] = "lts"
    schedule: Literal["fixed", "linear", "sine"] = "linear"
    threshold: float | None = Field(None, ge=0, description="ratio ρ in Δ (default 0.1 fixed, 1.0 growth)")
    decay: float = Field(0.99, ge=0, lt=1, description="EMA decay m")
    warmup_epochs: float | None = Field(None, ge=0, description="default: 20% of epochs")
    osc_decay: float = Field(0.01, gt=0, lt=1)
    osc_start_frac: float = Field(0.25, ge=0, lt=1)

    epochs: int = Field(30, ge=1, description="QAT epochs")
    fp_epochs: int = Field(20, ge=0, description="full-precision pre-training epochs")
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    fp_lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    bound_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the quantizer bounds")
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    record: bool = True
    record_every: int | None = Field(None, ge=1, description="steps between records; default once per epoch")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warm-up ({self.warmup_epochs} epochs) must be shorter than training "
                             f"({self.epochs} epochs)")
        if self.quantizer == "lsq" and self.bits < 2:
            raise ValueError("the lsq quantizer needs 2..8 bits (use liq or binary for 1 bit)")
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
        return f"{self.model}-{self.dataset}-{self.bits}b-{tail}"


def format_validation_error(err: ValidationError) -> str:
    """One line: 'bits: Input should be less than or equal to 8; …'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc != "config" else msg)
    return "invalid config — " + "; ".join(parts)


def make_config(**fields) -> TrainConfig:
    """Build a TrainConfig, raising ConfigError with a one-line message."""
    try:
        return TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config_file(path: str | Path) -> dict:
    """Read a .json or .toml config file into a dict of TrainConfig fields."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        if p.suffix == ".toml":
            return tomllib.loads(p.read_text())
        return json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot parse config file {p}: {e}") from None

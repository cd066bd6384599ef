"""The schema of a run's ``manifest.json``, checked on every read (pydantic, strict types).

A manifest that does not fit makes that one run *broken* with a one-line reason (`describe_errors`); the
other runs of the folder still list and open. Fields the readers use are typed strictly (no bool for an
int, no string for a number, no NaN); fields nobody reads are kept as they are (``extra="allow"``), so
runs written by other versions and by your own training loop (any ``config`` keys) still read.

    RunManifest.model_validate(json.loads(text))   # raises pydantic.ValidationError

Schema versions 1 and 2 share this schema (2 only adds level arrays stored as changes, see
`lts_core.level_delta`). Which array names a chunk may list is the store's business
(`lts_core.store.TRAJ_ARRAYS`); here a name only has to be a safe file-name part.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

STATUSES = ("running", "complete", "interrupted", "failed")
SCHEMA_VERSION = 2  # 2: a chunk's levels may be stored as changes (level_delta); version 1 runs still read
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,254}"  # also a safe folder name (≤ 255 bytes, no newline)
ARRAY_NAME_PATTERN = r"[A-Za-z0-9_]{1,64}"  # an array's part of a file name: no dot, no path separator

_STRICT = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
ArrayName = Annotated[str, StringConstraints(pattern=f"^{ARRAY_NAME_PATTERN}$")]
ShortText = Annotated[str, StringConstraints(max_length=4096)]
Time = ShortText | float | None


class RunConfig(BaseModel):
    """The training options a run was made with (`TrainConfig.model_dump()`, or anything your own loop
    passed). Only the keys readers interpret are typed; others pass through."""
    model_config = _STRICT
    name: ShortText | None = None
    model: ShortText | None = None
    dataset: ShortText | None = None
    data_root: ShortText | None = None
    bits: Annotated[int, Field(ge=1, le=8)] | None = None
    quantizer: ShortText | None = None
    act_bits: Annotated[int, Field(ge=1, le=8)] | None = None
    first_last_bits: Annotated[int, Field(ge=1, le=8)] | None = None
    rule: ShortText | None = None
    schedule: ShortText | None = None
    threshold: Annotated[float, Field(ge=0)] | None = None
    decay: Annotated[float, Field(ge=0, le=1)] | None = None
    warmup_epochs: Annotated[float, Field(ge=0)] | None = None
    epochs: NonNegInt | None = None
    fp_epochs: NonNegInt | None = None
    width: PosInt | None = None
    batch_size: PosInt | None = None
    max_train: PosInt | None = None
    max_test: PosInt | None = None
    lr: float | None = None
    seed: int | None = None
    record_every: PosInt | None = None


class RuleSettings(BaseModel):
    model_config = _STRICT
    schedule: ShortText | None = None
    ratio: Annotated[float, Field(ge=0)] | None = None
    decay: Annotated[float, Field(ge=0, le=1)] | None = None
    warmup_steps: NonNegInt | None = None
    total_steps: NonNegInt | None = None


class RuleInfo(BaseModel):
    model_config = _STRICT
    name: ShortText = "none"
    settings: RuleSettings | None = None
    layers: list[ShortText] | None = None


class LayerEntry(BaseModel):
    model_config = _STRICT
    name: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    shape: list[NonNegInt]
    numel: NonNegInt
    offset: NonNegInt
    n_levels: Annotated[int, Field(ge=1, le=256)] | None = None  # levels are stored as uint8
    bits: NonNegInt | None = None
    flops: NonNegInt | None = None
    kind: ShortText | None = None

    @model_validator(mode="after")
    def _numel_matches_shape(self) -> "LayerEntry":
        if self.shape and math.prod(self.shape) != self.numel:
            raise ValueError(f"layer {self.name!r}: numel {self.numel} is not the product of shape {self.shape}")
        return self


class ChunkEntry(BaseModel):
    model_config = _STRICT
    index: NonNegInt
    n_records: NonNegInt
    first_step: NonNegInt | None = None
    last_step: NonNegInt | None = None
    arrays: list[ArrayName] | None = None  # None: schema-1 runs listing no arrays (core + state arrays)


class OpenChunk(BaseModel):
    """The chunk being appended to: its records are counted from the size of its ``step`` file."""
    model_config = _STRICT
    index: NonNegInt
    arrays: list[ArrayName]


class RunManifest(BaseModel):
    model_config = _STRICT
    schema_version: Annotated[int, Field(ge=1, le=SCHEMA_VERSION)]
    run_id: Annotated[str, StringConstraints(pattern=f"^{RUN_ID_PATTERN}$")] | None = None
    status: Literal[STATUSES] = "running"
    reason: Annotated[str, StringConstraints(max_length=100_000)] | None = None
    config: RunConfig = RunConfig()
    device: ShortText | None = None
    torch_version: ShortText | None = None
    seed: int | None = None
    created: Time = None
    updated: Time = None
    pid: int | None = None
    host: ShortText | None = None
    layers: list[LayerEntry]
    n_weights: NonNegInt | None = None
    steps_per_epoch: PosInt | None = None
    total_steps: PosInt | None = None
    record_every: PosInt | None = None
    n_records: NonNegInt | None = None
    steps_taken: NonNegInt | None = None
    warmup_steps: NonNegInt | None = None
    rule: RuleInfo = RuleInfo()
    chunks: list[ChunkEntry]
    open_chunk: OpenChunk | None = None
    state_arrays: list[ArrayName] = []

    @model_validator(mode="after")
    def _consistent(self) -> "RunManifest":
        offset = 0
        for lay in self.layers:
            if lay.offset != offset:
                raise ValueError(f"layer {lay.name!r} starts at {lay.offset}, expected {offset} (layers are contiguous)")
            offset += lay.numel
        if self.n_weights is not None and self.n_weights != offset:
            raise ValueError(f"n_weights {self.n_weights} != {offset}, the sum of the layers' numel")
        last = -1
        for i, ch in enumerate(self.chunks):
            if ch.index != i:
                raise ValueError(f"chunks[{i}] has index {ch.index}")
            if ch.first_step is not None and ch.last_step is not None and ch.n_records:
                if ch.first_step <= last or ch.last_step < ch.first_step:
                    raise ValueError(f"chunk {i}: steps {ch.first_step}..{ch.last_step} out of order")
                last = ch.last_step
        if self.open_chunk is not None and self.open_chunk.index != len(self.chunks):
            raise ValueError(f"open chunk {self.open_chunk.index} is not the next chunk ({len(self.chunks)})")
        return self


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line: control characters shown escaped, cut to `limit` characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def describe_errors(err: ValidationError, at_most: int = 3) -> str:
    """A pydantic error as one line: 'status: Input should be …; layers.0.numel: …'."""
    parts = []
    for e in err.errors()[:at_most]:
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(one_line(f"{loc}: {msg}" if loc else msg, 200))
    more = len(err.errors()) - at_most
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def validate_manifest(data: Any) -> RunManifest:
    """The checked manifest (raises pydantic.ValidationError)."""
    return RunManifest.model_validate(data)


__all__ = ["RunManifest", "RunConfig", "LayerEntry", "ChunkEntry", "OpenChunk", "RuleInfo", "STATUSES",
           "SCHEMA_VERSION", "RUN_ID_PATTERN", "ARRAY_NAME_PATTERN", "describe_errors", "one_line",
           "validate_manifest"]

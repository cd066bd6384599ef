"""Recorder: streams per-weight trajectories of a QAT run into the run store, from any training loop.

    rec = Recorder.create(runs_dir, model, config={...}, rule=rule, every=steps_per_epoch,
                          steps_per_epoch=S, total_steps=T)
    loss.backward(); rule.step(); rec.step(); optimizer.step()
    rec.log_epoch({...}); rec.finish()

A record (at steps where ``t % every == 0`` or ``t == total_steps - 1``) holds, for every quantized weight,
its level index and distance code (uint8 each: 2 bytes per weight), the rule's state arrays (uint8) and the
per-layer quantizer bounds. With ``raw_distances`` (the default when recording every step) it also holds the
exact float32 raw distance the LTS rule decided on (normalised units, 4 more bytes per weight), so that a
replay of the run reproduces the rule's freeze steps exactly. Records go into preallocated buffers of at most
``chunk_bytes`` in all, one chunk's worth, so memory stays bounded whatever the run length.

Every record is appended to the run's open chunk on disk as soon as it is taken (`RunWriter.open_chunk`),
and the next record waits until it is there: a process killed at any moment (SIGKILL, OOM killer) loses at
most the record it was writing, i.e. at most one record interval (``every`` steps). A full chunk is sealed
and the next one opened. `log_epoch` writes metrics.parquet only after the records before it are on disk
and fsynced, so the metrics never list an epoch whose records are missing, even after a power cut. With
``background=True`` (default) the writes happen on one background thread (file writes and fsync release the
GIL) while training goes on, with two buffer sets so that a chunk is sealed while the next one fills.

The first failed write (disk full…) stops the recording: the next `step()`, `log_epoch()`, `flush()` or
`finish()` raises `StoreWriteError` ("disk full at <file>, N records kept"); every record already written
stays readable and no temp file is left. The only host transfer per record is one copy of one flat uint8
tensor (plus the quantizers' scalar bounds).
"""
from __future__ import annotations

import math
import os
import re
import secrets
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distance import encode_distance
from .fused import encode_remembered
from .npy_direct import aligned_empty
from .store import METRIC_COLUMNS, RAW_DIST, ChunkAppender, RunWriter, StoreWriteError

_SLUG_RE = re.compile(r"[^A-Za-z0-9]+")


def _slug(text: str, max_len: int = 40) -> str:
    return _SLUG_RE.sub("-", str(text)).strip("-").lower()[:max_len].strip("-")


def default_run_id(config: dict | None = None) -> str:
    """``YYYYmmdd-HHMMSS-<slug>-<hex>``: the slug is config['name'] (or 'run_name'), else model-dataset-rule
    from the config when present; the random hex keeps ids unique."""
    config = config or {}
    name = config.get("name") or config.get("run_name")
    if name:
        slug = _slug(name)
    else:
        parts = [config.get(k) for k in ("model", "dataset", "rule")]
        slug = _slug("-".join(str(p) for p in parts if p not in (None, "")))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    hexpart = secrets.token_hex(3)
    return f"{stamp}-{slug}-{hexpart}" if slug else f"{stamp}-{hexpart}"


def _bounds_pair(b: dict) -> tuple[float, float]:
    """liq: (lower, upper); lsq: (step, nan); anything else: its first two values (nan-padded)."""
    b = dict(b or {})
    if "lower" in b or "upper" in b:
        return float(b.get("lower", math.nan)), float(b.get("upper", math.nan))
    if "step" in b:
        return float(b["step"]), math.nan
    vals = [float(v) for v in b.values()][:2]
    vals += [math.nan] * (2 - len(vals))
    return vals[0], vals[1]


def _flat_u8(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().reshape(-1).to(torch.uint8)


def _copy_u8(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (host uint8, flat) <- src (values 0..255, any dtype and device). On the CPU float32 -> uint8 is
    ~4x slower in torch than float32 -> int16 -> uint8; on a GPU the cast happens there and 1 byte/value
    crosses to the host."""
    src = src.reshape(-1)
    if src.dtype != torch.uint8:
        src = src.to(torch.uint8 if src.device.type != "cpu" else
                     (torch.int16 if src.is_floating_point() else torch.uint8))
    dst.copy_(src)


def _raw_distance(layer, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact raw distance of a layer's weights in normalised units: the quantizer's `measure_norm` (written into
    `out`, a float32 tensor of the weight's shape, when given and on the weight's device), or for a custom
    quantizer offering only `measure()`, its Δ-unit distance divided by L−1."""
    q = layer.weight_quantizer
    if hasattr(q, "measure_norm"):
        if out is not None and out.device == layer.weight.device:
            return q.measure_norm(layer.weight, out=out)[1]
        return q.measure_norm(layer.weight)[1]
    return q.measure(layer.weight)[1].float() / (int(q.n_levels) - 1)


def _rule_layer_names(rule, n_layers: int) -> list[str] | None:
    """Names of the layers the rule watches, if it says (rule.layer_names, or rule.layers as names)."""
    for attr in ("layer_names", "layers"):
        names = getattr(rule, attr, None)
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return list(names)
    return None


class Recorder:
    """Writes one run. Create with `Recorder.create(...)`; call `step()` once per optimizer step."""

    def __init__(self, writer: RunWriter, layers: list[tuple[str, Any]], rule, every: int,
                 steps_per_epoch: int, total_steps: int | None, chunk_bytes: int,
                 state_names: list[str], rule_map: list[int | None] | None, background: bool = True,
                 raw_distances: bool = False, record_side: bool = False):
        self.writer = writer
        self.record_side = bool(record_side)
        self._layers = layers
        self.rule = rule
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.chunk_bytes = chunk_bytes
        self.state_names = state_names
        self._rule_map = rule_map  # per recorded layer: index into the rule's lists, or None (measure)
        self.numels = [int(m.weight.numel()) for _, m in layers]
        self.n_weights = sum(self.numels)
        self.n_layers = len(layers)
        self.raw_distances = bool(raw_distances)
        n_u8 = 2 + len(state_names) + self.record_side
        self.bytes_per_record = (8 + n_u8 * self.n_weights + 8 * self.n_layers
                                 + (4 * self.n_weights if self.raw_distances else 0))
        self.background = bool(background)
        n_sets = 2 if self.background else 1
        chunk_records = max(1, chunk_bytes // (n_sets * self.bytes_per_record))
        if total_steps is not None:
            chunk_records = min(chunk_records, max(1, self.expected_records(total_steps)))
        self.chunk_records = int(chunk_records)
        self._bufs = [self._alloc()]  # the second set (background mode) is allocated when the first chunk is full
        self._cur = 0
        self._n_buf = 0
        self._n_taken = 0
        self._pending: Future | None = None  # the last write handed to the background thread
        self._executor: ThreadPoolExecutor | None = None
        self._chunk: ChunkAppender | None = None  # the open chunk (used by the writing thread only)
        self._sealed = 0  # records in sealed chunks
        self._error: BaseException | None = None  # the first failed write; recording stops there
        self._error_raised = False
        self.t = 0
        self.n_written = 0  # records on disk
        self.finished = False
        self._metric_rows: list[dict] = []
        self._warned_t = False
        # Quantizers whose forward pass this recorder asks to remember its position and level (measure_code
        # then reuses them), only before the steps it records: holding those tensors through every step
        # would change the allocator's pattern for nothing. Those a rule already set stay on.
        self._managed = [m.weight_quantizer for _, m in layers
                         if getattr(m.weight_quantizer, "remember_forward", None) is False]
        self._remembering = None
        self._set_remember(self.should_record(0))

    def _alloc(self) -> dict[str, np.ndarray]:
        c = self.chunk_records
        # np.empty: pages are only touched as records arrive.
        # Page-aligned, so that the store can write a chunk's leading rows with O_DIRECT.
        buf = {"step": np.empty(c, np.int64), "level": aligned_empty((c, self.n_weights), np.uint8),
               "dist": aligned_empty((c, self.n_weights), np.uint8)}
        for name in self.state_names + (["side"] if self.record_side else []):
            buf[name] = aligned_empty((c, self.n_weights), np.uint8)
        if self.raw_distances:
            buf[RAW_DIST] = aligned_empty((c, self.n_weights), np.float32)
        buf["bounds"] = np.empty((c, self.n_layers, 2), np.float32)
        return buf

    @property
    def _buf(self) -> dict[str, np.ndarray]:
        return self._bufs[self._cur]

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_dir: str | os.PathLike, model, config: dict, rule=None, *, every: int,
               steps_per_epoch: int, total_steps: int | None = None, run_id: str | None = None,
               chunk_bytes: int = 32 << 20, extra_manifest: dict | None = None,
               layers: list[tuple[str, Any]] | None = None, background: bool = True,
               raw_distances: bool | None = None, record_side: bool = False) -> "Recorder":
        """Create the run folder and its manifest. `layers` overrides `quantized_layers(model)`;
        `background=False` writes chunks synchronously from `step()`. `raw_distances` also stores the exact
        float32 raw distance of every weight per record (4 bytes more per weight; exact replays); None (the
        default) stores them when recording every step (`every == 1`). `record_side=True` also records the
        optional array `side` (uint8 [r, N], 1 where the weight's position is at or above its level), which
        makes the app's weight histogram exact (`analysis.distributions`); one byte per weight per record."""
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"record every must be an integer ≥ 1, got {every!r}")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be an integer ≥ 1, got {steps_per_epoch!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be an integer ≥ 1 or None, got {total_steps!r}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be ≥ 1, got {chunk_bytes}")
        if layers is None:
            from .layers import quantized_layers
            layers = quantized_layers(model)
        layers = list(layers)
        if not layers:
            raise ValueError("no quantized layer to record: call quantize_model() first")
        config = dict(config or {})
        layer_meta, offset = [], 0
        for name, m in layers:
            q = m.weight_quantizer
            numel = int(m.weight.numel())
            layer_meta.append({
                "name": name, "shape": [int(s) for s in m.weight.shape], "numel": numel, "offset": offset,
                "n_levels": int(getattr(q, "n_levels", getattr(m, "n_levels", 0))),
                "bits": int(getattr(q, "bits", getattr(m, "bits", 0))),
                "flops": int(getattr(m, "flops", 0) or 0),
                "kind": str(getattr(q, "kind", getattr(m, "kind", ""))),
            })
            if getattr(q, "output", None) is not None:   # liq: "denorm" (l + q(u − l)) or "unit" (2q − 1)
                layer_meta[-1]["output"] = str(q.output)
            offset += numel
        too_many = [lm["name"] for lm in layer_meta if lm["n_levels"] > 256]
        if too_many:
            raise ValueError(f"layers {too_many} have more than 256 levels; levels are stored as uint8")

        state_names: list[str] = []
        rule_map = None
        rule_info: dict[str, Any] = {"name": "none"}
        if rule is not None:
            state_names = list(rule.record_state().keys())
            names = [n for n, _ in layers]
            rnames = _rule_layer_names(rule, len(layers))
            if rnames is None:
                if len(rule.last_level) != len(layers):
                    raise ValueError(f"the rule watches {len(rule.last_level)} layers but {len(layers)} are "
                                     "recorded, and it does not name them (rule.layer_names)")
                rnames = names
            unknown = [n for n in rnames if n not in names]
            if unknown:
                raise ValueError(f"the rule watches layers {unknown} that are not among the recorded "
                                 f"quantized layers {names}")
            rule_map = [rnames.index(n) if n in rnames else None for n in names]
            settings = rule.settings() if hasattr(rule, "settings") else {}
            rule_info = {"name": str(getattr(rule, "name", type(rule).__name__)), "settings": settings,
                         "layers": rnames}

        device = str(layers[0][1].weight.device)
        raw_distances = (every == 1) if raw_distances is None else bool(raw_distances)
        n_trainable = getattr(rule, "n_trainable", None)
        if n_trainable is None and model is not None:
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fields = {
            "config": config, "device": device, "torch_version": torch.__version__,
            "n_trainable_params": None if n_trainable is None else int(n_trainable),
            "raw_distances": raw_distances,
            "seed": config.get("seed"), "layers": layer_meta, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "record_every": every, "rule": rule_info,
            "state_arrays": state_names + (["side"] if record_side else []), "chunk_bytes": int(chunk_bytes),
        }
        fields.update(extra_manifest or {})
        writer = RunWriter.create(runs_dir, run_id or default_run_id(config), fields)
        return cls(writer, layers, rule, every, steps_per_epoch, total_steps, chunk_bytes, state_names, rule_map,
                   background, raw_distances, record_side)

    # ---- properties -----------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.writer.path

    @property
    def run_id(self) -> str:
        return self.writer.manifest["run_id"]

    @property
    def n_records(self) -> int:
        """Records taken so far (written or being written)."""
        return self._n_taken

    @property
    def buffer_nbytes(self) -> int:
        """Bytes held by the record buffers (≤ max(chunk_bytes, bytes_per_record · number of sets))."""
        return sum(a.nbytes for buf in self._bufs for a in buf.values())

    def expected_records(self, total_steps: int | None = None) -> int:
        """Number of records a run of `total_steps` steps takes."""
        t = self.total_steps if total_steps is None else total_steps
        if t is None:
            raise ValueError("total_steps unknown")
        n = (t - 1) // self.every + 1
        return n + (0 if (t - 1) % self.every == 0 else 1)

    def should_record(self, t: int) -> bool:
        return t % self.every == 0 or (self.total_steps is not None and t == self.total_steps - 1)

    # ---- recording ------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Call once per optimizer step (after rule.step(), before optimizer.step()). Returns whether the
        step was recorded."""
        if self.finished:
            raise RuntimeError(f"run {self.run_id} is finished; create a new Recorder to record more")
        t = self.t
        recorded = self.should_record(t)
        if recorded:
            self._record(t)
        self.t = t + 1
        self._set_remember(self.should_record(self.t))
        return recorded

    def _set_remember(self, on: bool) -> None:
        if on == self._remembering:
            return
        self._remembering = on
        if self.rule is not None and hasattr(self.rule, "record_codes"):
            self.rule.record_codes = on  # the rule keeps the forward's distance code for the steps recorded
        for q in self._managed:
            q.remember_forward = on
            if not on:
                q._seen = None

    @torch.no_grad()
    def _record(self, t: int) -> None:
        rule = self.rule
        if rule is not None and not self._warned_t:
            rt = getattr(rule, "t", None)
            if isinstance(rt, int) and rt != t + 1:
                warnings.warn(f"recorder step {t} but rule.t = {rt}: call rule.step() once, right before "
                              "rec.step(), every optimizer step", RuntimeWarning, stacklevel=3)
                self._warned_t = True
        rstate = rule.record_state() if rule is not None else {}
        if list(rstate.keys()) != self.state_names:
            raise RuntimeError(f"rule.record_state() keys changed: {list(rstate)} != {self.state_names}")
        flat_state = {}
        for name, val in rstate.items():
            if isinstance(val, (list, tuple)):
                flat_state[name] = [v if isinstance(v, torch.Tensor) else _flat_u8(v) for v in val]
            else:  # one flat tensor over the rule's watched weights: split per rule layer
                flat = _flat_u8(val)
                sizes = [s for _, s in sorted((j, self.numels[i]) for i, j in enumerate(self._rule_map)
                                              if j is not None)]  # in the rule's layer order
                if flat.numel() != sum(sizes):
                    raise RuntimeError(f"rule state {name!r} has {flat.numel()} values, expected {sum(sizes)}")
                flat_state[name] = list(torch.split(flat, sizes))
        # Write straight into this record's row of the buffer: one (device→host, →uint8) copy per array.
        row, buf = self._n_buf, self._buf
        names = ("level", "dist", *self.state_names)
        raw_row = torch.from_numpy(buf[RAW_DIST][row]) if self.raw_distances else None
        dst = {name: torch.from_numpy(buf[name][row]) for name in names}
        off = 0
        for i, (lname, m) in enumerate(self._layers):
            n_i = self.numels[i]
            sl = slice(off, off + n_i)
            off += n_i
            j = self._rule_map[i] if self._rule_map is not None else None
            q = m.weight_quantizer
            raw = None
            # level, code (and raw distance) written straight into the row by one compiled kernel, when it applies
            fast = not self.record_side
            encoded = raw_done = False
            if j is not None:
                lev, code = rule.last_level[j], getattr(rule, "last_dist_code", [None] * (j + 1))[j]
                raw = getattr(rule, "last_raw", [None] * (j + 1))[j]
                if lev is None:
                    raise RuntimeError("the rule has no measurement for this step: call rule.step() "
                                       "before rec.step()")
                if code is None:  # the rule was not asked for codes this step: measure now
                    encoded = fast and encode_remembered(q, m.weight, dst["level"][sl], dst["dist"][sl])
                    if not encoded:
                        code = q.measure_code(m.weight)[1]
            elif hasattr(q, "measure_code"):
                encoded = raw_done = fast and encode_remembered(q, m.weight, dst["level"][sl], dst["dist"][sl],
                                                                None if raw_row is None else raw_row[sl])
                if not encoded:
                    lev, code = q.measure_code(m.weight)  # float32, copied into uint8 below
            else:  # a custom quantizer offering only measure()
                lev, dist = q.measure(m.weight)
                code = encode_distance(dist)
            if raw_row is not None and not raw_done:
                if raw is None:   # measured straight into this record's row
                    raw = _raw_distance(m, out=raw_row[sl].view(m.weight.shape))
                if raw.data_ptr() != raw_row[sl].data_ptr():
                    raw_row[sl].copy_(raw.reshape(-1))
            if not encoded:
                if lev.numel() != n_i or code.numel() != n_i:
                    raise RuntimeError(f"layer {lname!r}: measured {lev.numel()} values, expected {n_i}")
                _copy_u8(dst["level"][sl], lev)
                _copy_u8(dst["dist"][sl], code)
            for name in self.state_names:
                if j is None:
                    dst[name][sl].zero_()
                    continue
                st = flat_state[name][j]
                if st.numel() != n_i:
                    raise RuntimeError(f"rule state {name!r} of layer {lname!r} has {st.numel()} values, "
                                       f"expected {n_i}")
                _copy_u8(dst[name][sl], st)
            if self.record_side:  # optional: which side of its level each weight lies (sign of position − level)
                side = m.weight_quantizer.position(m.weight.detach()).float() >= lev.float()
                _copy_u8(torch.from_numpy(buf["side"][row])[sl], side)
        buf["step"][row] = t
        for i, (_, m) in enumerate(self._layers):
            buf["bounds"][row, i] = _bounds_pair(m.weight_quantizer.bounds())
        self._n_buf = row + 1
        self._n_taken += 1
        self._write_rows(seal=self._n_buf == self.chunk_records)

    # ---- writing (one task at a time, in order, on the background thread or inline) ---------------------
    def _write_rows(self, seal: bool) -> None:
        """Append the current buffer's new rows to the open chunk; with `seal`, seal it and switch to the
        other buffer set."""
        buf, n = self._buf, self._n_buf
        self._submit(lambda: self._append(buf, n, seal))
        if seal:
            if self.background and len(self._bufs) == 1:
                self._bufs.append(self._alloc())
            self._cur = (self._cur + 1) % len(self._bufs)
            self._n_buf = 0

    def _append(self, buf: dict[str, np.ndarray], n: int, seal: bool) -> None:
        if self._chunk is None:
            self._chunk = self.writer.open_chunk(buf)
        self._chunk.append(n)
        self.n_written = self._sealed + n
        if seal:
            self._chunk.seal()
            self._chunk = None
            self._sealed += n

    def _submit(self, task) -> None:
        """Run `task` after every earlier one: inline, or on the background thread once the previous task
        is done (so at most the latest record is not yet on disk)."""
        self._wait()
        if not self.background:
            self._guarded(task)
            self._raise_error()
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lts-recorder")
        self._pending = self._executor.submit(self._guarded, task)

    def _guarded(self, task) -> None:
        if self._error is not None:
            return
        try:
            task()
        except BaseException as e:  # the first failure stops every later write
            self._error = StoreWriteError.from_oserror(e) if isinstance(e, OSError) else e

    def _wait(self) -> None:
        """Wait for the task in flight; raise the first write error, if any."""
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()
        self._raise_error()

    def _raise_error(self) -> None:
        e = self._error
        if e is not None:
            if isinstance(e, StoreWriteError):
                e.records_kept = self.n_written
            self._error_raised = True
            raise e

    def _wait_pending(self) -> None:  # (name kept for callers of the earlier recorder)
        self._wait()

    def flush(self) -> None:
        """Seal the open chunk (its records become a listed chunk) and wait until everything is on disk."""
        if self._n_buf:
            self._write_rows(seal=True)
        self._wait()

    def sync(self) -> None:
        """Wait until every record taken is written and fsynced."""
        self._submit(lambda: self._chunk.sync() if self._chunk is not None else None)
        self._wait()

    # ---- metrics / closing ----------------------------------------------------------------------------
    def log_epoch(self, metrics: dict) -> None:
        """Append one epoch's metrics and rewrite metrics.parquet atomically, after the records taken so far
        are on disk and fsynced (in order with the records); returns once it is written."""
        import pandas as pd
        row = {}
        for k, v in dict(metrics).items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            elif isinstance(v, np.generic):
                v = v.item()
            row[str(k)] = v
        self._metric_rows.append(row)
        extra = [k for r in self._metric_rows for k in r if k not in METRIC_COLUMNS]
        columns = list(METRIC_COLUMNS) + list(dict.fromkeys(extra))
        df = pd.DataFrame(self._metric_rows, columns=columns)
        for c in METRIC_COLUMNS:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")

        def write():
            if self._chunk is not None:
                self._chunk.sync()
            self.writer.write_metrics(df)
        self._submit(write)
        self._wait()

    def finish(self, status: str = "complete", reason: str | None = None) -> None:
        """Flush, write summaries (freeze_step when a rule exists) and set the final status. Idempotent."""
        if self.finished:
            return
        if status not in ("complete", "interrupted", "failed"):
            raise ValueError(f"final status must be complete, interrupted or failed, got {status!r}")
        self.finished = True
        self._set_remember(False)
        raised_before = self._error_raised  # the caller already has the write error: do not raise it again
        errors = []
        for action in (self.flush, self._write_summaries):
            try:
                action()
            except Exception as e:  # still close the run; report the first error afterwards
                errors.append(e)
                break
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        write_error = next((e for e in [self._error, *errors] if isinstance(e, StoreWriteError)), None)
        if write_error is not None:  # a write failed: the run keeps what is on disk
            write_error.records_kept = self.n_written
            status, reason = "failed", str(write_error)
            if self._chunk is not None:
                self._chunk.abandon()  # cut half-written rows: frees blocks for the manifest below
                self._chunk = None
        elif errors and status == "complete":
            status, reason = "failed", f"while finishing: {type(errors[0]).__name__}: {errors[0]}"
        try:
            self.writer.update_manifest(n_records=self.n_written, steps_taken=self.t, status=status, reason=reason)
        except StoreWriteError as e:  # still no room: readers see the records on disk (and a dead writer)
            if not errors:
                e.records_kept = self.n_written
                errors.append(e)
        if errors and not (raised_before and errors[0] is self._error):
            raise errors[0]

    def _write_summaries(self) -> None:
        self._write_level_summaries()
        self._write_freeze_steps()
        self._cache_first_views()

    def _write_freeze_steps(self) -> None:
        rule = self.rule
        if rule is None or getattr(rule, "freeze_step", None) is None:
            return
        parts = []
        for i in range(self.n_layers):
            j = self._rule_map[i] if self._rule_map is not None else None
            if j is None:
                parts.append(np.full(self.numels[i], -1, dtype=np.int64))
            else:
                parts.append(torch.as_tensor(rule.freeze_step[j]).detach().reshape(-1).cpu()
                             .to(torch.int64).numpy())
        self.writer.write_summary("freeze_step", np.concatenate(parts))

    def _write_level_summaries(self) -> None:
        """Per-weight summaries from the written records: final_level (uint8), settle_record (int32: the record
        from which the level stays final) and flips (int32: level changes between consecutive records). They
        come from the analysis cache (`lts_core.analysis.build_cache`), brought up to date here in one streamed
        pass (memory O(weights), all cores), so that the app opens the finished run without reading its
        records."""
        from .analysis.summaries import build_cache
        from .store import open_run
        run = open_run(self.path)
        if not run.n_records:
            return
        stats = build_cache(run)["levels"]
        for name in ("final_level", "settle_record", "flips"):
            self.writer.write_summary(name, np.asarray(getattr(stats, name)))

    FIRST_VIEW_REPLAY_LIMIT = 50_000_000   # weight-records: a bigger run without freeze steps is counted on first open

    def _cache_first_views(self) -> None:
        """The app's first Distributions view of the finished run (`analysis.first_view_distributions`: its first
        layer with its own freezing, or LTS replayed on a run that froze nothing), counted now and kept in the run's
        cache, so that opening the run reads binned counts instead of making a pass. A replay reads the run's
        levels whole, so runs without freeze steps above FIRST_VIEW_REPLAY_LIMIT are left to the first open."""
        from .analysis.summaries import first_view_distributions
        from .store import open_run
        try:
            run = open_run(self.path)
            if not run.n_records or (run.freeze_steps(0) is None
                                     and run.n_records * run.n_weights > self.FIRST_VIEW_REPLAY_LIMIT):
                return
            first_view_distributions(run)
        except Exception:   # noqa: BLE001 - a cache only, never a reason to fail a finished run: the page counts
            pass            # them itself when opened (and says why it cannot, if it cannot)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("complete")
        elif issubclass(exc_type, KeyboardInterrupt):
            self._finish_quietly("interrupted", "interrupted by user (Ctrl-C)")
        else:
            msg = str(exc)
            self._finish_quietly("failed", f"{exc_type.__name__}: {msg}" if msg else exc_type.__name__)
        return False

    def _finish_quietly(self, status: str, reason: str) -> None:
        try:
            self.finish(status, reason)
        except Exception as e:  # never mask the original exception
            warnings.warn(f"could not close run {self.run_id} cleanly: {e}", RuntimeWarning)

    def __repr__(self) -> str:
        return (f"Recorder({self.run_id!r}, t={self.t}, records={self.n_records}, "
                f"chunk_records={self.chunk_records})")


__all__ = ["Recorder", "default_run_id"]

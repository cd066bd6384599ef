"""A corpus of corrupted or crafted run folders, for tests/test_bad_runs.py and scripts/hardening_report.py.

Each case takes a good run folder (`make_good_run`) and damages it in one way. `expect` says what the store
must do with it:
- "broken":  `list_runs` lists it with ok=False and a one-line error containing `needle`;
- "metrics": the run opens, `run.metrics` raises a RunError containing `needle`;
- "levels":  the run opens, `run.levels()` raises a RunError containing `needle`;
- "summary": the run opens, `run.freeze_steps()` raises a RunError containing `needle`;
- "ok":      the run opens and reads the same arrays as the good run (a harmless oddity).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from lts_core.store import METRIC_COLUMNS, RunWriter, chunk_file

LAYERS = [{"name": "fc1", "shape": [3, 4], "n_levels": 4, "bits": 2, "flops": 24, "kind": "liq"},
          {"name": "fc2", "shape": [5], "n_levels": 4, "bits": 2, "flops": 10, "kind": "lsq"}]
N = 17


def make_good_run(folder: Path, run_id: str, seed: int = 0) -> Path:
    """Two chunks (the first dense, the second with levels stored as changes; both with the optional
    `raw_dist` and `side`, stored as `side_bits`), metrics, a summary."""
    rng = np.random.default_rng(seed)
    w = RunWriter.create(folder, run_id, {"layers": LAYERS, "steps_per_epoch": 4, "total_steps": 12,
                                          "record_every": 2, "state_arrays": ["ema", "side"],
                                          "config": {"model": "mlp", "threshold": 0.1, "epochs": 3},
                                          "rule": {"name": "lts", "settings": {"warmup_steps": 2, "ratio": 0.1}}})
    dense = {"step": np.array([0, 2, 4]), "level": rng.integers(0, 4, (3, N), dtype=np.uint8),
             "dist": rng.integers(0, 256, (3, N), dtype=np.uint8), "ema": rng.integers(0, 256, (3, N), np.uint8),
             "bounds": rng.standard_normal((3, 2, 2)).astype(np.float32),
             "raw_dist": rng.random((3, N), np.float32), "side": rng.integers(0, 2, (3, N), np.uint8)}
    w.append_chunk(dense)
    lv = np.repeat(rng.integers(0, 4, (1, N), dtype=np.uint8), 4, axis=0)
    lv[3, 5] = (lv[3, 5] + 1) % 4  # one change in four records: stored as changes
    sparse = {"step": np.array([6, 8, 10, 11]), "level": lv,
              "dist": rng.integers(0, 256, (4, N), dtype=np.uint8), "ema": rng.integers(0, 256, (4, N), np.uint8),
              "bounds": rng.standard_normal((4, 2, 2)).astype(np.float32),
              "raw_dist": rng.random((4, N), np.float32), "side": rng.integers(0, 2, (4, N), np.uint8)}
    w.append_chunk(sparse)
    w.write_metrics(pd.DataFrame([{c: float(i + 1) for c in METRIC_COLUMNS} for i in range(3)]))
    w.write_summary("freeze_step", np.arange(N, dtype=np.int64) - 1)
    w.set_status("complete")
    return folder / run_id


# ---- damage helpers ---------------------------------------------------------------------------------------
def _edit_manifest(fn: Callable[[dict], None]):
    def damage(run: Path, outside: Path) -> None:
        p = run / "manifest.json"
        m = json.loads(p.read_text())
        fn(m)
        p.write_text(json.dumps(m))
    return damage


def _set(path: str, value):
    """Manifest edit: set the dotted `path` (list indices as numbers) to `value`."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def fn(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return _edit_manifest(fn)


def _write_manifest_bytes(data: bytes):
    def damage(run: Path, outside: Path) -> None:
        (run / "manifest.json").write_bytes(data)
    return damage


def _replace_file(rel: str, fn: Callable[[Path, Path], None]):
    def damage(run: Path, outside: Path) -> None:
        p = run / rel
        p.unlink()
        fn(p, outside)
    return damage


def _symlink_outside(rel: str, make_target: Callable[[Path], Path]):
    """Replace `rel` with a symlink to a file outside the run (a valid file of the right kind)."""
    def damage(run: Path, outside: Path) -> None:
        p = run / rel
        target = make_target(outside)
        if p.is_dir() and not p.is_symlink():
            import shutil
            shutil.rmtree(p)
        else:
            p.unlink()
        p.symlink_to(target)
    return damage


def _outside_npy(like: str):
    def make(outside: Path) -> Path:
        t = outside / f"secret-{like.replace('/', '_')}.npy"
        np.save(t, np.zeros((3, N), np.uint8) if "traj" in like else np.arange(N, dtype=np.int64))
        return t
    return make


def _outside_traj(outside: Path) -> Path:
    d = outside / "elsewhere-traj"
    if not d.exists():
        make_good_run(outside, "donor")
        (outside / "donor" / "traj").rename(d)
    return d


def _cut(rel: str, keep: int | None = None, drop: int | None = None):
    def damage(run: Path, outside: Path) -> None:
        p = run / rel
        data = p.read_bytes()
        p.write_bytes(data[:keep] if keep is not None else data[:len(data) - drop])
    return damage


def _save(rel: str, arr):
    def damage(run: Path, outside: Path) -> None:
        np.save(run / rel, arr, allow_pickle=True)
    return damage


def _level_file(value: int, chunk: int = 0):
    def damage(run: Path, outside: Path) -> None:
        p = chunk_file(run, chunk, "level")
        lv = np.load(p)
        lv[1, 13] = value  # fc2 (4 levels)
        np.save(p, lv)
    return damage


def _level_change_to(value: int):
    def damage(run: Path, outside: Path) -> None:
        p = chunk_file(run, 1, "level_change_to")
        to = np.load(p)
        to[0] = value
        np.save(p, to)
    return damage


def _delta(at: list[int], to: list[int]):
    def damage(run: Path, outside: Path) -> None:
        np.save(chunk_file(run, 1, "level_change_at"), np.array(at, np.int64))
        np.save(chunk_file(run, 1, "level_change_to"), np.array(to, np.uint8))
    return damage


def _symlink_inside(rel: str):
    def damage(run: Path, outside: Path) -> None:
        p = run / rel
        p.rename(run / "moved.npy")
        p.symlink_to(run / "moved.npy")
    return damage


def _orphans(run: Path, outside: Path) -> None:
    """What a crash leaves: a chunk's files renamed but never listed, and temp files."""
    for name in ("step", "level", "dist", "ema", "bounds"):
        np.save(chunk_file(run, 2, name), np.zeros((1, N) if name != "step" else 1, np.uint8))
    (run / "traj" / "000003.dist.npy.tmp-123").write_bytes(b"partial")
    (run / "manifest.json.tmp-123").write_text("{")


def _metrics(df_fn: Callable[[], pd.DataFrame]):
    def damage(run: Path, outside: Path) -> None:
        df_fn().to_parquet(run / "metrics.parquet", index=False)
    return damage


def _fifo(rel: str):
    def damage(run: Path, outside: Path) -> None:
        p = run / rel
        p.unlink()
        os.mkfifo(p)
    return damage


def _deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _chunk_arrays(arrays: list[str], chunk: int = 0):
    return _set(f"chunks.{chunk}.arrays", arrays)


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    damage: Callable[[Path, Path], None]
    expect: str
    needle: str


_GOOD_ARRAYS_0 = ["step", "level", "dist", "ema", "bounds", "raw_dist", "side_bits"]

CASES: list[Case] = [
    # ---- manifest: not JSON, not an object, not a file --------------------------------------------------
    Case("manifest-empty", "manifest file", _write_manifest_bytes(b""), "broken", "not valid JSON"),
    Case("manifest-garbage", "manifest file", _write_manifest_bytes(b"{not json"), "broken", "not valid JSON"),
    Case("manifest-array", "manifest file", _write_manifest_bytes(b"[1, 2]"), "broken", "expected a JSON object"),
    Case("manifest-null", "manifest file", _write_manifest_bytes(b"null"), "broken", "expected a JSON object"),
    Case("manifest-string", "manifest file", _write_manifest_bytes(b'"run"'), "broken", "expected a JSON object"),
    Case("manifest-not-utf8", "manifest file", _write_manifest_bytes(b'{"a": "\xff\xfe"}'), "broken",
         "not valid JSON"),
    Case("manifest-nested-100k", "manifest file", _write_manifest_bytes(_deep_json(100_000)), "broken",
         "not valid JSON"),
    Case("manifest-huge", "manifest file", lambda run, o: os.truncate(run / "manifest.json", 65 << 20), "broken",
         "too big for a manifest"),
    Case("manifest-missing", "manifest file", lambda run, o: (run / "manifest.json").unlink(), "broken",
         "manifest missing"),
    Case("manifest-is-folder", "manifest file", _replace_file("manifest.json", lambda p, o: p.mkdir()), "broken",
         "not a regular manifest"),
    Case("manifest-fifo", "manifest file", _fifo("manifest.json"), "broken", "not a regular manifest"),
    Case("manifest-symlink-outside", "paths",
         _symlink_outside("manifest.json", lambda o: Path(o / "m.json").write_text("{}") and o / "m.json"),
         "broken", "outside the run folder"),
    # ---- manifest: fields of the wrong type or value -----------------------------------------------------
    Case("schema-missing", "manifest fields", _edit_manifest(lambda m: m.pop("schema_version")), "broken",
         "schema_version"),
    Case("schema-string", "manifest fields", _set("schema_version", "2"), "broken", "schema_version"),
    Case("schema-bool", "manifest fields", _set("schema_version", True), "broken", "schema_version"),
    Case("schema-zero", "manifest fields", _set("schema_version", 0), "broken", "schema_version"),
    Case("schema-newer", "manifest fields", _set("schema_version", 99), "broken", "newer scratchoff"),
    Case("status-integer", "manifest fields", _set("status", 1), "broken", "status"),
    Case("status-unknown", "manifest fields", _set("status", "paused"), "broken", "status"),
    Case("status-null", "manifest fields", _set("status", None), "broken", "status"),
    Case("run-id-newline", "manifest fields", _set("run_id", "evil\nrun"), "broken", "run_id"),
    Case("run-id-path", "manifest fields", _set("run_id", "../../etc"), "broken", "run_id"),
    Case("config-list", "manifest fields", _set("config", ["mlp", "digits"]), "broken", "config"),
    Case("config-string", "manifest fields", _set("config", "mlp"), "broken", "config"),
    Case("config-threshold-string", "manifest fields", _set("config.threshold", "0.1"), "broken", "threshold"),
    Case("config-threshold-nan", "manifest fields",
         _write_manifest_bytes(b""), "broken", "not valid JSON"),  # replaced below (needs the good manifest)
    Case("config-bits-true", "manifest fields", _set("config.bits", True), "broken", "bits"),
    Case("config-epochs-string", "manifest fields", _set("config.epochs", "3"), "broken", "epochs"),
    Case("config-decay-above-1", "manifest fields", _set("config.decay", 2.5), "broken", "decay"),
    Case("config-seed-float", "manifest fields", _set("config.seed", 0.5), "broken", "seed"),
    Case("steps-per-epoch-string", "manifest fields", _set("steps_per_epoch", "4"), "broken", "steps_per_epoch"),
    Case("steps-per-epoch-zero", "manifest fields", _set("steps_per_epoch", 0), "broken", "steps_per_epoch"),
    Case("total-steps-negative", "manifest fields", _set("total_steps", -12), "broken", "total_steps"),
    Case("record-every-float", "manifest fields", _set("record_every", 1.5), "broken", "record_every"),
    Case("rule-list", "manifest fields", _set("rule", ["lts"]), "broken", "rule"),
    Case("rule-warmup-string", "manifest fields", _set("rule.settings.warmup_steps", "2"), "broken",
         "warmup_steps"),
    Case("rule-ratio-string", "manifest fields", _set("rule.settings.ratio", "0.1"), "broken", "ratio"),
    Case("created-list", "manifest fields", _set("created", [2026]), "broken", "created"),
    Case("reason-number", "manifest fields", _set("reason", 5), "broken", "reason"),
    Case("pid-string", "manifest fields", _set("pid", "123"), "broken", "pid"),
    Case("seed-string", "manifest fields", _set("seed", "0"), "broken", "seed"),
    Case("manifest-bom", "manifest file",
         lambda run, o: (run / "manifest.json").write_bytes(b"\xef\xbb\xbf" + (run / "manifest.json").read_bytes()),
         "broken", "not valid JSON"),
    # ---- manifest: layers -------------------------------------------------------------------------------
    Case("layers-not-list", "layers", _set("layers", {"fc1": 12}), "broken", "layers"),
    Case("layers-missing", "layers", _edit_manifest(lambda m: m.pop("layers")), "broken", "layers"),
    Case("layer-numel-string", "layers", _set("layers.0.numel", "12"), "broken", "numel"),
    Case("layer-numel-vs-shape", "layers", _set("layers.0.numel", 11), "broken", "not the product of shape"),
    Case("layer-offset-gap", "layers", _set("layers.1.offset", 13), "broken", "contiguous"),
    Case("layer-levels-zero", "layers", _set("layers.0.n_levels", 0), "broken", "n_levels"),
    Case("layer-levels-300", "layers", _set("layers.0.n_levels", 300), "broken", "n_levels"),
    Case("layer-name-empty", "layers", _set("layers.0.name", ""), "broken", "name"),
    Case("layer-shape-negative", "layers", _set("layers.0.shape", [-3, -4]), "broken", "shape"),
    Case("n-weights-wrong", "layers", _set("n_weights", 99), "broken", "n_weights"),
    # ---- manifest: chunks and array names ---------------------------------------------------------------
    Case("chunks-not-list", "chunks", _set("chunks", {"0": 3}), "broken", "chunks"),
    Case("chunk-index-wrong", "chunks", _set("chunks.1.index", 5), "broken", "index"),
    Case("chunk-records-negative", "chunks", _set("chunks.0.n_records", -1), "broken", "n_records"),
    Case("chunk-records-string", "chunks", _set("chunks.0.n_records", "3"), "broken", "n_records"),
    Case("chunk-records-more", "chunks", _set("chunks.0.n_records", 4), "broken", "does not match"),
    Case("chunk-steps-out-of-order", "chunks", _set("chunks.1.first_step", 0), "broken", "out of order"),
    Case("chunk-array-unknown", "array names", _chunk_arrays(_GOOD_ARRAYS_0 + ["evil"]), "broken",
         "unknown array 'evil'"),
    Case("chunk-array-path", "array names", _chunk_arrays(_GOOD_ARRAYS_0 + ["../../../../etc/passwd"]), "broken",
         "arrays"),
    Case("chunk-array-dot", "array names", _chunk_arrays(_GOOD_ARRAYS_0 + ["x.y"]), "broken", "arrays"),
    Case("chunk-array-slash", "array names", _chunk_arrays(_GOOD_ARRAYS_0 + ["a/b"]), "broken", "arrays"),
    Case("chunk-array-empty-name", "array names", _chunk_arrays(_GOOD_ARRAYS_0 + [""]), "broken", "arrays"),
    Case("chunk-without-dist", "array names", _chunk_arrays(["step", "level", "ema", "bounds"]), "broken",
         "has no dist"),
    Case("chunk-without-levels", "array names", _chunk_arrays(["step", "dist", "ema", "bounds"]), "broken",
         "has no level"),
    Case("state-array-path", "array names", _set("state_arrays", ["../ema"]), "broken", "state_arrays"),
    Case("state-array-core-name", "array names", _set("state_arrays", ["ema", "level"]), "broken",
         "name of a core array"),
    Case("state-array-undeclared", "array names", _set("state_arrays", []), "broken", "unknown array 'ema'"),
    Case("open-chunk-wrong-index", "chunks", _set("open_chunk", {"index": 0, "arrays": ["step"]}), "broken",
         "open chunk"),
    # ---- chunk files ------------------------------------------------------------------------------------
    Case("chunk-truncated", "chunk files", _cut("traj/000000.level.npy", drop=7), "broken", "truncated"),
    Case("chunk-trailing-data", "chunk files",
         lambda run, o: open(chunk_file(run, 0, "dist"), "ab").write(b"xx"), "broken", "trailing data"),
    Case("chunk-header-cut", "chunk files", _cut("traj/000000.level.npy", keep=40), "broken", "header"),
    Case("chunk-zero-bytes", "chunk files", _cut("traj/000000.dist.npy", keep=0), "broken", "header"),
    Case("chunk-missing", "chunk files", lambda run, o: chunk_file(run, 0, "ema").unlink(), "broken", "missing"),
    Case("chunk-wrong-shape", "chunk files", _save("traj/000000.dist.npy", np.zeros((3, N + 1), np.uint8)),
         "broken", "does not match"),
    Case("chunk-wrong-dtype", "chunk files", _save("traj/000000.dist.npy", np.zeros((3, N), np.float64)),
         "broken", "dtype"),
    Case("chunk-fortran-order", "chunk files",
         _save("traj/000000.dist.npy", np.asfortranarray(np.zeros((3, N), np.uint8))), "broken", "Fortran"),
    Case("chunk-pickled-objects", "chunk files", _save("traj/000000.dist.npy", np.array([{}] * 3, dtype=object)),
         "broken", "object"),
    Case("chunk-step-float", "chunk files", _save("traj/000000.step.npy", np.zeros(3)), "broken", "dtype"),
    Case("level-base-wrong-length", "chunk files", _save("traj/000001.level_base.npy", np.zeros(N + 1, np.uint8)),
         "broken", "does not match"),
    Case("side-bits-unpacked", "chunk files", _save("traj/000000.side_bits.npy", np.zeros((3, N), np.uint8)),
         "broken", "shape 3×17 does not match the manifest (3×3)"),
    Case("raw-dist-float64", "chunk files", _save("traj/000001.raw_dist.npy", np.zeros((4, N))), "broken",
         "dtype"),
    Case("bounds-wrong-layers", "chunk files", _save("traj/000000.bounds.npy", np.zeros((3, 3, 2), np.float32)),
         "broken", "does not match"),
    Case("orphan-and-temp-files", "chunk files", _orphans, "ok", ""),
    Case("chunk-is-folder", "chunk files", _replace_file("traj/000000.dist.npy", lambda p, o: p.mkdir()),
         "broken", "not a regular chunk file"),
    Case("chunk-fifo", "chunk files", _fifo("traj/000000.dist.npy"), "broken", "not a regular chunk file"),
    Case("delta-lengths-differ", "chunk files",
         _save("traj/000001.level_change_at.npy", np.array([2 * N + 1, 3 * N + 5])), "broken", "change values"),
    Case("delta-not-increasing", "level values", _delta([3 * N + 5, 2 * N + 1], [1, 2]), "levels",
         "not strictly increasing"),
    Case("delta-outside-chunk", "level values", _delta([9 * N], [1]), "levels", "outside records"),
    # ---- paths leaving the run --------------------------------------------------------------------------
    Case("chunk-symlink-outside", "paths", _symlink_outside("traj/000000.level.npy", _outside_npy("traj/level")),
         "broken", "outside the run folder"),
    Case("traj-folder-symlink-outside", "paths", _symlink_outside("traj", _outside_traj), "broken",
         "outside the run folder"),
    Case("summary-symlink-outside", "paths",
         _symlink_outside("summary/freeze_step.npy", _outside_npy("summary/freeze_step")), "summary",
         "outside the run folder"),
    Case("metrics-symlink-outside", "paths",
         _symlink_outside("metrics.parquet", lambda o: (o / "m.parquet").write_bytes(b"x") and o / "m.parquet"),
         "metrics", "outside the run folder"),
    Case("chunk-symlink-inside", "paths", _symlink_inside("traj/000000.ema.npy"), "ok", ""),
    # ---- level values -----------------------------------------------------------------------------------
    Case("levels-above-range", "level values", _level_file(7), "levels", "level 7 in layer 'fc2'"),
    Case("levels-255", "level values", _level_file(255), "levels", "which has 4 levels"),
    Case("level-change-above-range", "level values", _level_change_to(4), "levels", "level 4 in layer"),
    # ---- metrics.parquet --------------------------------------------------------------------------------
    Case("metrics-zero-bytes", "metrics", lambda run, o: (run / "metrics.parquet").write_bytes(b""), "metrics",
         "cannot be read"),
    Case("metrics-garbage", "metrics", lambda run, o: (run / "metrics.parquet").write_bytes(b"PAR1garbagePAR1"),
         "metrics", "cannot be read"),
    Case("metrics-wrong-columns", "metrics", _metrics(lambda: pd.DataFrame({"foo": [1.0]})), "metrics",
         "missing"),
    Case("metrics-string-column", "metrics",
         _metrics(lambda: pd.DataFrame({**{c: [1.0] for c in METRIC_COLUMNS}, "test_acc": ["high"]})), "metrics",
         "not numbers"),
    Case("metrics-fifo", "metrics", _fifo("metrics.parquet"), "metrics", "not a regular metrics file"),
    # ---- summaries --------------------------------------------------------------------------------------
    Case("summary-wrong-shape", "summaries", _save("summary/freeze_step.npy", np.zeros(N + 3, np.int64)),
         "summary", "does not match"),
    Case("summary-float", "summaries", _save("summary/freeze_step.npy", np.zeros(N)), "summary", "dtype"),
    Case("summary-unknown-name", "summaries", _save("summary/evil.npy", np.array([None], dtype=object)), "ok", ""),
    Case("summary-pickled", "summaries", _save("summary/freeze_step.npy", np.array([None] * N, dtype=object)),
         "summary", "object"),
]


def _nan_threshold(run: Path, outside: Path) -> None:
    p = run / "manifest.json"
    p.write_text(p.read_text().replace('"threshold": 0.1', '"threshold": NaN'))


CASES = [c if c.name != "config-threshold-nan" else Case(c.name, c.group, _nan_threshold, "broken", "threshold")
         for c in CASES]


def build_corpus(folder: Path) -> tuple[Path, Path]:
    """Every case's damaged run under `folder/runs/<case>`, plus a good run `folder/runs/good`; files the cases
    point to live in `folder/outside`. Returns (runs folder, outside folder)."""
    runs, outside = folder / "runs", folder / "outside"
    runs.mkdir(parents=True)
    outside.mkdir()
    make_good_run(runs, "good")
    for case in CASES:
        run = make_good_run(runs, case.name)
        case.damage(run, outside)
    return runs, outside

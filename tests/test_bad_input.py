"""Issue 13, items 9-13: bad options, configs, output folders and data files get one line and exit 2 before
anything is written or trained; a truncated FP cache is named and rebuilt; two runs never share a folder."""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lts_core.config import ConfigError, make_config

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lts_core", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def one_error_line(r, code=2) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture
def env(tmp_path):
    return {"SCRATCHOFF_DATA": str(tmp_path / "data"), "SCRATCHOFF_RUNS": str(tmp_path / "runs")}


# ---- configs ----------------------------------------------------------------------------------------------
def config_file_cases(tmp_path: Path) -> dict[str, Path]:
    files = {"json-array": ("c.json", b"[1, 2]"), "json-null": ("c.json", b"null"),
             "json-string": ("c.json", b'"mlp"'), "non-utf8": ("c.json", b'{"model": "\xff\xfe"}'),
             "nested-100k": ("c.json", b"[" * 100_000 + b"]" * 100_000),
             "nested-100k-value": ("c.json", b'{"bits": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
             "toml-array-of-tables": ("c.toml", b"[[model]]\nx = 1\n"),
             "bits-true": ("c.json", b'{"bits": true}'), "epochs-string": ("c.json", b'{"epochs": "30"}'),
             "lr-nan": ("c.json", b'{"lr": NaN}'), "seed-huge": ("c.json", b'{"seed": 9223372036854775808}'),
             "key-with-newline": ("c.json", b'{"bits\\nx": 2}'), "folder": ("c.json", None)}
    out = {}
    for case, (name, data) in files.items():
        p = tmp_path / case / name
        if data is None:
            p.mkdir(parents=True)
        else:
            p.parent.mkdir()
            p.write_bytes(data)
        out[case] = p
    return out


NEEDLES = {"json-array": "must hold a table of options", "json-null": "not null",
           "json-string": "not str", "non-utf8": "not UTF-8", "nested-100k": "nested too deeply",
           "nested-100k-value": "nested too deeply", "toml-array-of-tables": "model",
           "bits-true": "bits: Input should be a valid integer", "epochs-string": "epochs",
           "lr-nan": "lr: Input should be a finite number", "seed-huge": "seed: Input should be less than 4294967296",
           "key-with-newline": "bits\\nx", "folder": "is not a file"}


def test_bad_config_files_one_line_exit_2_nothing_written(tmp_path, env):
    for case, path in config_file_cases(tmp_path).items():
        out = tmp_path / "runs" / case
        line = one_error_line(cli("train", "--config", str(path), "--out", str(out), env=env))
        assert NEEDLES[case] in line, (case, line)
        assert not out.exists() and not (tmp_path / "data").exists(), case


@pytest.mark.parametrize("fields,needle", [
    ({"bits": True}, "bits: Input should be a valid integer"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"seed": 2 ** 63}, "seed: Input should be less than 4294967296"),
    ({"quantizer": "binary", "bits": 4}, "binary quantizer is 1 bit wide"),
    ({"quantizer": "ternary", "bits": 3}, "ternary quantizer is 2 bits wide"),
    ({"lr": float("inf")}, "finite"),
])
def test_config_refuses(fields, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        make_config(**fields)
    assert "\n" not in str(e.value)


def test_fixed_width_quantizers_default_to_their_width():
    assert make_config(quantizer="binary").bits == 1 and make_config(quantizer="binary").label().startswith("mlp-digits-1b")
    assert make_config(quantizer="ternary").bits == 2
    assert make_config(seed=2 ** 32 - 1).seed == 2 ** 32 - 1


# ---- options and --out -----------------------------------------------------------------------------------
def option_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Bad `train` options: case -> (arguments, text the one error line must contain)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {
        "seed -1": (["--seed", "-1"], "seed"),
        "seed 2**63": (["--seed", str(2 ** 63)], "seed"),
        "binary 4 bits": (["--quantizer", "binary", "--bits", "4"], "binary"),
        "ternary 3 bits": (["--quantizer", "ternary", "--bits", "3"], "ternary"),
        "mnist no root": (["--dataset", "mnist"], "needs --data-root"),
        "mnist root missing": (["--dataset", "mnist", "--data-root", str(tmp_path / "nope")], "not a folder"),
        "out is a file": (["--out", str(a_file)], "is a file"),
        "out under a file": (["--out", str(a_file / "run")], "is not a folder"),
        "out name 256 bytes": (["--out", str(tmp_path / ("r" * 256))], "at most 255"),
        "out trailing newline": (["--out", str(tmp_path / "run\n")], "is not allowed"),
        "out name with space": (["--out", str(tmp_path / "my run")], "is not allowed"),
        "out starts with dot": (["--out", str(tmp_path / ".hidden")], "is not allowed"),
    }


def sweep_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Bad `sweep` invocations: case -> (arguments, text the one error line must contain)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    mnist = tmp_path / "mnist.json"
    mnist.write_text(json.dumps({"dataset": "mnist"}))
    files = tmp_path / "mnist-files"
    files.mkdir(exist_ok=True)
    mnist_empty = tmp_path / "mnist-empty.json"
    mnist_empty.write_text(json.dumps({"dataset": "mnist", "data_root": str(files)}))
    out = ["--out", str(tmp_path / "sweep")]
    return {"seeds -1": (["--seeds", "-1", *out], "seed"), "seeds not numbers": (["--seeds", "1,x", *out], "--seeds"),
            "thresholds not numbers": (["--thresholds", "0.1,abc", *out], "--thresholds"),
            "out is a file": (["--out", str(a_file)], "is a file"),
            "mnist without data root": (["--config", str(mnist), *out], "needs --data-root"),
            "mnist files missing": (["--config", str(mnist_empty), *out], "not found")}


def test_bad_options_and_out_folders_one_line_exit_2(tmp_path, env):
    for case, (args, needle) in option_cases(tmp_path).items():
        r = cli("train", "--epochs", "2", "--fp-epochs", "1", *args, env=env)
        line = one_error_line(r)
        assert needle in line, (case, line)
        assert not (tmp_path / "data").exists(), f"{case}: something was trained or cached"
        assert not (tmp_path / "runs").exists(), f"{case}: a folder was made"
    assert not (tmp_path / "run\n").exists() and (tmp_path / "a-file").read_text() == "x"


def test_read_only_place(tmp_path, env):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: use a read-only mount
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
            pytest.skip("running as root and cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o500)
    try:
        line = one_error_line(cli("train", "--out", str(ro / "run"), env=env))
        assert "ro" in line and ("not writable" in line or "cannot create" in line)
        assert not (tmp_path / "data").exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])
        else:
            ro.chmod(0o700)


def test_sweep_validates_before_making_its_folder(tmp_path, env):
    for case, (args, needle) in sweep_cases(tmp_path).items():
        line = one_error_line(cli("sweep", *args, env=env))
        assert needle in line, (case, line)
        assert not (tmp_path / "sweep").exists() and not (tmp_path / "data" / "runs").exists(), case


def test_two_runs_with_the_same_out(tmp_path, env):
    """The folder is taken at start with one mkdir: the second run exits 2 at once, before pre-training."""
    out = tmp_path / "runs" / "same"
    first = subprocess.Popen([sys.executable, "-m", "lts_core", "train", "--epochs", "3", "--fp-epochs", "2",
                              "--out", str(out), "--quiet", "--device", "cpu"], cwd=ROOT, text=True,
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.time()
    second = cli("train", "--epochs", "3", "--fp-epochs", "2", "--out", str(out), "--quiet", env=env)
    line = one_error_line(second)
    assert "already exists" in line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    from lts_core.store import open_run
    assert open_run(out).status == "complete"
    assert time.time() - t0 < 120


def test_sigint_during_startup_says_nothing_was_recorded(tmp_path, env):
    out = tmp_path / "runs" / "early"
    proc = subprocess.Popen([sys.executable, "-m", "lts_core", "train", "--fp-epochs", "200", "--out", str(out),
                             "--quiet", "--device", "cpu"], cwd=ROOT, text=True, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # inside imports or pre-training
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["interrupted before QAT started: nothing was recorded"], err[-2000:]
    assert not out.exists()  # the empty folder it had taken is given back


# ---- data files -------------------------------------------------------------------------------------------
IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path, monkeypatch):
    """A .gz whose header promises 28×28 images but which inflates to far more is refused after reading at
    most the size its header announces (+1 byte)."""
    from lts_core import datasets
    from lts_core.datasets import DatasetError, load_dataset
    header = struct.pack(">I", 0x0803) + struct.pack(">3I", 100, 28, 28)
    with gzip.open(tmp_path / (IDX[0] + ".gz"), "wb") as f:
        f.write(header)
        chunk = bytes(1 << 20)
        for _ in range(64):  # 64 MiB of zeros: a few dozen kB compressed
            f.write(chunk)
    assert (tmp_path / (IDX[0] + ".gz")).stat().st_size < 200_000
    asked = []
    real_open = datasets.gzip.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            asked.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(datasets.gzip, "open", lambda *a, **k: Spy(real_open(*a, **k)))
    with pytest.raises(DatasetError, match=r"wrong length: \d+\+ bytes, header \(100, 28, 28\) implies 78416"):
        load_dataset("mnist", root=tmp_path)
    assert asked and all(0 <= n <= 100 * 28 * 28 + 1 for n in asked)
    monkeypatch.undo()
    with gzip.open(tmp_path / (IDX[0] + ".gz"), "wb") as f:  # a header announcing 4 GB
        f.write(struct.pack(">I", 0x0803) + struct.pack(">3I", 2 ** 32 - 1, 1024, 1024))
    with pytest.raises(DatasetError, match="more than 256 MiB"):
        load_dataset("mnist", root=tmp_path)


# ---- the FP cache -----------------------------------------------------------------------------------------
def test_truncated_fp_cache_is_named_and_rebuilt(tmp_path, env):
    args = ["train", "--epochs", "2", "--fp-epochs", "2", "--no-record", "--quiet", "--device", "cpu"]
    r = cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    (cache,) = (tmp_path / "data" / "cache" / "fp").glob("*.pt")
    good = cache.read_bytes()
    first = json.loads(r.stdout.strip().splitlines()[-1])
    cache.write_bytes(good[:len(good) // 2])
    r = cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and str(cache) in warn[0] and "again" in warn[0]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == first  # the same model, rebuilt
    assert cache.read_bytes() == good or len(cache.read_bytes()) == len(good)
    r = cli(*args, env=env)  # and the next run uses it quietly
    assert r.returncode == 0 and not r.stderr.strip()
    assert not [p for p in cache.parent.iterdir() if ".tmp-" in p.name]

"""The README's library example runs as written, and its commands are the ones CI uses."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_library_example_runs_and_is_at_most_15_lines(tmp_path):
    section = README.split("## Use it in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 15
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"updates eliminated \d+% of quantized weights \(\d+% of all trainable parameters\), "
                     r"backward FLOPs saved \d+%", r.stdout)
    from lts_core import list_runs
    (entry,) = list_runs(tmp_path / "data" / "runs")
    assert entry.ok and entry.status == "complete" and entry.run.n_records == 11  # steps 0, 20, …, 180, 199


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[dev]" -c constraints.txt' in ci
    assert "pytest" in ci
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" -c constraints.txt && python -m pytest' in README
    assert "pip install -e . -c constraints.txt && streamlit run app/scratchoff_app.py" in README


def test_constraints_pin_what_is_installed():
    """constraints.txt pins every package the project needs (dev extras included) except torch, to one version."""
    import importlib.metadata as md
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    assert "torch" not in pins
    for req in ("numpy", "pandas", "pyarrow", "pydantic", "streamlit", "plotly", "typer", "tqdm", "scikit-learn",
                "mnist1d", "pytest", "hypothesis", "playwright"):
        assert req in pins, f"{req} is not pinned"
        assert md.version(req) == pins[req], f"{req}: installed {md.version(req)}, constraints.txt says {pins[req]}"


def test_frozen_channels_example_runs_in_the_library_loop(tmp_path):
    """The README's channel + active snippet, dropped into the library example's setup, trains and reports."""
    first = re.search(r"```python\n(.*?)```", README.split("## Use it in your own training loop", 1)[1], re.S).group(1)
    setup = first.split("rule = LTSRule", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", README.split("## Frozen channels that save time", 1)[1], re.S).group(1)
    loop = ("for step in range(200):\n    opt.zero_grad(); F.cross_entropy(model(x), y).backward(); rule.step(); opt.step()\n"
            "print(rule.granularity, rule.bound_grad, rule.frozen_channel_fraction() > 0, "
            "rule.backward_flops_skippable() > 0)\n")
    r = subprocess.run([sys.executable, "-c", setup + snippet + loop], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["channel", "active", "True", "True"]

"""Count the bad inputs the hardening tests try and how many are handled, for docs/HARDENING.md.

    python scripts/hardening_report.py [--no-cli]

Runs the corrupted-run corpus (tests/bad_runs.py) through `list_runs`/`open_run` exactly as
tests/test_bad_runs.py checks it, and (unless --no-cli) each bad config file, `train` option and `sweep`
invocation of tests/test_bad_input.py through the real CLI, and prints a markdown table: cases tried and
cases handled (a one-line error naming the problem, exit code 2, nothing written) per group.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def store_corpus() -> dict[str, list[bool]]:
    from bad_runs import CASES, build_corpus
    from lts_core.store import RunError, list_runs
    out = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        runs, _ = build_corpus(Path(tmp))
        entries = {e.path.name: e for e in list_runs(runs)}
        for case in CASES:
            e = entries[case.name]
            ok = False
            if case.expect == "broken":
                ok = not e.ok and case.needle in e.error and "\n" not in e.error
            elif e.ok and case.expect == "ok":
                ok = True
            elif e.ok:
                read = {"metrics": lambda: e.run.metrics, "levels": lambda: e.run.levels(),
                        "summary": lambda: e.run.freeze_steps()}[case.expect]
                try:
                    read()
                except RunError as err:
                    ok = case.needle in str(err)
            out[f"run folders: {case.group}"].append(ok)
        r = subprocess.run([sys.executable, "-m", "lts_core", "runs", "--folder", str(runs)], capture_output=True,
                           text=True, cwd=ROOT)
        out["`runs` over the whole corpus (one line per run, no traceback)"].append(
            r.returncode == 0 and len(r.stdout.splitlines()) == len(entries) and "Traceback" not in r.stderr)
    return out


def cli_cases() -> dict[str, list[bool]]:
    from test_bad_input import NEEDLES, config_file_cases, option_cases, sweep_cases
    out = collections.defaultdict(list)

    def handled(args, needle, tmp) -> bool:
        r = subprocess.run([sys.executable, "-m", "lts_core", *args], capture_output=True, text=True, cwd=ROOT,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SCRATCHOFF_DATA": f"{tmp}/data",
                                "SCRATCHOFF_RUNS": f"{tmp}/runs"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        return (r.returncode == 2 and len(lines) == 1 and needle in lines[0]
                and not Path(tmp, "data", "cache").exists() and not Path(tmp, "sweep").exists())

    with tempfile.TemporaryDirectory() as tmp:
        for case, path in config_file_cases(Path(tmp)).items():
            out["config files"].append(handled(["train", "--config", str(path), "--out", f"{tmp}/runs/x"],
                                               NEEDLES[case], tmp))
    with tempfile.TemporaryDirectory() as tmp:
        for args, needle in option_cases(Path(tmp)).values():
            out["`train` options and --out"].append(handled(["train", "--epochs", "2", *args], needle, tmp))
    with tempfile.TemporaryDirectory() as tmp:
        for args, needle in sweep_cases(Path(tmp)).values():
            out["`sweep` invocations"].append(handled(["sweep", *args], needle, tmp))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-cli", action="store_true", help="only the run-folder corpus")
    args = ap.parse_args()
    groups = store_corpus()
    if not args.no_cli:
        groups.update(cli_cases())
    print("| group | tried | handled |\n|---|---:|---:|")
    for name, results in groups.items():
        print(f"| {name} | {len(results)} | {sum(results)} |")
    tried = sum(len(r) for r in groups.values())
    print(f"| **all** | **{tried}** | **{sum(sum(r) for r in groups.values())}** |")


if __name__ == "__main__":
    main()

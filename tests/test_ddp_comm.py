"""DDP (2 CPU processes, gloo): the frozen-aware communication hook sends no gradient for frozen weights and
the entries it sends equal a dense all-reduce."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bound_grad", ["active", "all"])
def test_frozen_weights_send_no_gradient_and_the_rest_is_exact(tmp_path, bound_grad):
    prefix = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests" / "ddp_worker.py"), str(prefix), bound_grad],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    a, b = (json.loads(Path(f"{prefix}.rank{k}.json").read_text()) for k in (0, 1))
    assert a["frozen"] == b["frozen"]                     # identical masks on both ranks
    assert 0.1 < a["comm_frozen_fraction"] < 1.0
    assert a["sent"] == b["sent"] and a["sent"] < a["total"]   # frozen entries were not sent
    assert a["checked"] > 0 and a["max_diff"] == 0.0 and b["max_diff"] == 0.0

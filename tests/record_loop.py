"""A training loop with a Recorder that says after every optimizer step how many records it has taken, for
the SIGKILL tests: `python tests/record_loop.py RUNS_DIR RUN_ID STEPS CHUNK_BYTES EPOCH_STEPS`.
Prints "taken <n> epochs <m>" (flushed) after each step; the parent kills it at a random moment."""
from __future__ import annotations

import sys

import torch
from torch import nn

from lts_core import LTSRule, Recorder, quantize_model


def main() -> None:
    runs, run_id, steps, chunk_bytes, epoch_steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                         nn.Linear(256, 10)), bits=2, example_input=torch.randn(2, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rule = LTSRule(model, opt, total_steps=steps, warmup_steps=steps // 5, schedule="linear")
    rec = Recorder.create(runs, model, {"name": run_id}, rule=rule, every=1, steps_per_epoch=epoch_steps,
                          total_steps=steps, run_id=run_id, chunk_bytes=chunk_bytes)
    x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    epochs = 0
    for t in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        rule.step()
        rec.step()
        opt.step()
        if (t + 1) % epoch_steps == 0:
            epochs += 1
            rec.log_epoch({"epoch": epochs, "train_loss": 0.0, "test_acc": 0.0})
        print(f"taken {rec.n_records} epochs {epochs}", flush=True)
    rec.finish()


if __name__ == "__main__":
    main()

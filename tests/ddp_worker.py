"""Run under torchrun (2 CPU processes, gloo) by tests/test_ddp_comm.py: DDP with FrozenAwareAllReduce.

Checks, at every step, that the gradient entries the hook sent equal a dense all-reduce of the local gradients
(divide by the world size, then sum, as DDP's default hook), and writes counts and masks to OUT.rank<N>.json.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lts_core import LTSRule, quantize_model
from lts_core.ddp_comm import FrozenAwareAllReduce

out, bound_grad = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = quantize_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
                       bits=2, first_last_bits=2, example_input=torch.randn(2, 8))
wparams = [p for n, p in model.named_parameters() if "quantizer" not in n]
opt = torch.optim.SGD(wparams, lr=0.05, momentum=0.9)
STEPS = 40
rule = LTSRule(model, opt, total_steps=STEPS, warmup_steps=3, schedule="linear", ratio=0.4, granularity="channel",
               channel_quantile=0.75, bound_grad=bound_grad)
net = nn.parallel.DistributedDataParallel(model)
comm = FrozenAwareAllReduce(rule)
net.register_comm_hook(comm, comm.hook)
g = torch.Generator().manual_seed(100 + rank)          # each rank its own data
x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
params = list(model.parameters())
max_diff, checked = 0.0, 0
for step in range(STEPS):
    # dense reference: this rank's local gradients (same plans), all-reduced by hand
    ref = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True, materialize_grads=True)
    ref = [r / world for r in ref]
    for r in ref:
        dist.all_reduce(r)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    for p, r in zip(params, ref):
        sent = torch.ones_like(p, dtype=torch.bool)
        for i, m in enumerate(rule.modules):
            if p is m.weight and rule.comm_frozen is not None:
                sent = ~rule.comm_frozen[i]
        if p.grad is not None and bool(sent.any()):
            max_diff = max(max_diff, float((p.grad[sent] - r[sent]).abs().max()))
            checked += int(sent.sum())
    rule.step()
    opt.step()
    if step % 5 == 4:
        rule.sync()
dist.barrier()   # both ranks done with every collective before either leaves
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump({"sent": comm.sent, "total": comm.total, "max_diff": max_diff, "checked": checked,
               "frozen": torch.cat([f.flatten() for f in rule.frozen]).tolist(),
               "comm_frozen_fraction": float(torch.cat([f.flatten() for f in rule.comm_frozen]).float().mean())},
              f)
dist.barrier()
dist.destroy_process_group()
# torch 2.13's gloo threads can abort the interpreter's exit now and then ("terminate called without an active
# exception", SIGABRT; pytorch/pytorch#190489): everything is written, so leave without that teardown
os._exit(0)

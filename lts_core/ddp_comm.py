"""DDP without gradient traffic for frozen weights: a communication hook that all-reduces only the gradient
entries of unfrozen weights.

DDP all-reduces every gradient bucket whole. A frozen weight's gradient is zero (planned backward) or masked
to zero by the rule afterwards, so sending it is wasted bandwidth. `FrozenAwareAllReduce` keeps, per bucket, the
flat positions of the entries that still learn (every parameter the rule does not watch, and the unfrozen
weights of those it does), gathers them into one compact tensor, divides by the world size and all-reduces
it, and writes the result back; the frozen entries of the bucket keep their local value (zero, or masked by
the rule right after). The result on the entries sent is what DDP's default hook computes (divide, then sum).

Every rank must send the same positions. The hook therefore uses the frozen masks as of the last
`rule.sync()` (which checks, across ranks, that the masks agree and re-broadcasts them if not), not the live
masks: weights frozen since the last sync are still sent until the next one (the trainer syncs once per epoch).

    net = DistributedDataParallel(model)
    hook = FrozenAwareAllReduce(rule)
    net.register_comm_hook(hook, hook.hook)   # then rule.sync() at each epoch end

`hook.sent` / `hook.total` count gradient elements sent and the dense total (per rank, since creation).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class FrozenAwareAllReduce:
    """State and hook function for `DistributedDataParallel.register_comm_hook` (module docstring)."""

    def __init__(self, rule, process_group=None):
        self.rule = rule
        self.group = process_group
        self._layer_of = {m.weight: i for i, m in enumerate(rule.modules)}   # parameters hash by identity
        self._index: dict[int, tuple[int, torch.Tensor | None]] = {}         # bucket → (sync version, positions)
        self.sent = 0
        self.total = 0

    def positions(self, bucket) -> torch.Tensor | None:
        """Flat positions of the bucket's entries to all-reduce (None: all of them)."""
        version = self.rule.comm_version
        key = bucket.index()
        cached = self._index.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        frozen = self.rule.comm_frozen
        parts, off, any_frozen = [], 0, False
        device = bucket.buffer().device
        for p in bucket.parameters():
            n = p.numel()
            i = self._layer_of.get(p)
            if frozen is not None and i is not None and bool(frozen[i].any()):
                any_frozen = True
                parts.append(torch.nonzero(~frozen[i].reshape(-1)).flatten().to(device) + off)
            else:
                parts.append(torch.arange(off, off + n, device=device))
            off += n
        if off != bucket.buffer().numel():   # the bucket layout is not the parameters back to back
            raise RuntimeError(f"DDP bucket {key} holds {bucket.buffer().numel()} elements, its parameters {off}")
        idx = torch.cat(parts) if any_frozen else None
        self._index[key] = (version, idx)
        return idx

    def hook(self, state, bucket):  # (DDP checks annotations: none given)
        buf = bucket.buffer()
        world = dist.get_world_size(self.group)
        idx = self.positions(bucket)
        self.total += buf.numel()
        if idx is None:
            self.sent += buf.numel()
            buf.div_(world)
            fut = dist.all_reduce(buf, group=self.group, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])
        compact = buf.index_select(0, idx).div_(world)
        self.sent += compact.numel()
        fut = dist.all_reduce(compact, group=self.group, async_op=True).get_future()

        def write_back(f):
            buf.index_copy_(0, idx, f.value()[0])
            return buf
        return fut.then(write_back)

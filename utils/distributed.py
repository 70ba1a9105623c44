"""Data-parallel training through Paddle's own engine (paddle.distributed.launch).

    python -m paddle.distributed.launch --devices 0,1,2,3 main.py ...      # GPUs
    python -m paddle.distributed.launch --nproc_per_node 2 main.py ...     # CPU (gloo)

Every rank draws the same seeded global batch order and trains on its share of each batch
(DistributedBatchSampler's split, kept in step with the single-process order); gradients
are averaged by paddle.DataParallel. Evaluation is sharded the same way and the
predictions are gathered on every rank, so all ranks compute the same metrics; rank 0
alone writes checkpoints, training states, results and reports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import paddle


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This rank's share: every world_size-th item from its rank (may be empty)."""
        return items[self.rank::self.world_size] if self.parallel else items

    def shard_batch(self, batch: list) -> list:
        """This rank's share of a training batch, equal on every rank: the batch is padded
        by repeating its first items up to a multiple of world_size (as
        DistributedBatchSampler pads an epoch), since every rank must take every step."""
        if not self.parallel:
            return batch
        short = -len(batch) % self.world_size
        padded = list(batch) + [batch[i % len(batch)] for i in range(short)]
        return padded[self.rank::self.world_size]


def init(cpu: bool = False) -> Context:
    """Join the process group when started by paddle.distributed.launch (or alone). On the
    CPU the group uses gloo: Paddle's "auto" picks NCCL on any CUDA build, which a CPU run
    cannot use."""
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) <= 1:
        return Context()
    import paddle.distributed as dist

    if cpu:
        os.environ["PADDLE_DISTRI_BACKEND"] = "gloo"
    dist.init_parallel_env()
    return Context(dist.get_rank(), dist.get_world_size())


def local_world_size() -> int:
    """Processes of this run on this machine (paddle.distributed.launch sets it): they share
    its memory."""
    try:
        return max(1, int(os.environ.get("PADDLE_LOCAL_SIZE", "1")))
    except ValueError:
        return 1


def all_true(ctx: Context, flag: bool) -> bool:
    """`flag` on every rank (one all-reduce when data-parallel): all ranks decide alike."""
    if not ctx.parallel:
        return flag
    agreed = paddle.to_tensor([1 if flag else 0], dtype="int32")
    paddle.distributed.all_reduce(agreed, op=paddle.distributed.ReduceOp.MIN)
    return bool(int(agreed.numpy()[0]))


def gather_shards(ctx: Context, total: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reassemble arrays sharded by Context.shard (rank r holds items r, r+W, ...)."""
    if not ctx.parallel:
        return arrays
    import paddle.distributed as dist

    parts: list = []
    dist.all_gather_object(parts, arrays)
    out = {}
    for key, first in arrays.items():
        full = np.empty((total, *first.shape[1:]), dtype=first.dtype)
        for rank, part in enumerate(parts):
            full[rank::ctx.world_size] = part[key]
        out[key] = full
    return out


def barrier(ctx: Context) -> None:
    if ctx.parallel:
        paddle.distributed.barrier()


def sync_buffers(ctx: Context, layer: paddle.nn.Layer) -> None:
    """Give every rank rank 0's BatchNorm running statistics. Gradients are averaged, but
    each rank's BatchNorm tracks its own shards' statistics, and the model rank 0 saves
    must be the one every rank evaluates (tests/test_distributed.py fails without this)."""
    if not ctx.parallel:
        return
    # Paddle keeps BatchNorm's running statistics as parameters with stop_gradient=True.
    frozen = [p for p in layer.parameters() if p.stop_gradient] + list(layer.buffers())
    with paddle.no_grad():
        for tensor in frozen:
            paddle.distributed.broadcast(tensor, src=0)

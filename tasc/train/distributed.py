"""Data-parallel fine-tuning over several processes (``torchrun`` / ``accelerate launch``).

A launcher starts one process per device and sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``. With ``WORLD_SIZE`` > 1, :func:`tasc.train.finetune.finetune` joins a process group
(nccl on CUDA, gloo on CPU), wraps the model in ``DistributedDataParallel`` and, at step
micro-batch ``i``, rank ``r`` of ``N`` takes the slice ``[r*b, (r+1)*b)`` of
``micro_batch(examples, i, N*b, seed)`` (``b``: the config's per-rank ``batch_size``). Every
rank's loss is scaled by ``N`` over the completion tokens of the whole global micro-batch
group, so the gradient DDP averages is the one a single process computes at batch ``N*b``:
same seed, same batches, same update.

Rank 0 alone writes checkpoints and the final folder, with barriers after each write; on
resume rank 0 picks the newest checkpoint and every rank loads that one. A checkpoint
records the world size when it is > 1: resuming with another one (another global batch)
fails with :class:`~tasc.train.io.ResumeError`. Ranks must share the output folder's
file system (one machine, or a shared mount across nodes).

Without a launcher (``WORLD_SIZE`` unset or 1) every helper here is a no-op, and
fine-tuning runs exactly as in a single process.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tasc.train.io import ResumeError, collate, micro_batch
from tasc.train.loss import completion_loss


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    owned: bool = False  # this module started the process group (and ends it)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> World:
    """The launcher's view of this process (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
    env = os.environ if env is None else env
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def join(device: str) -> tuple[World, str]:
    """Join the launcher's process group if there is one; returns the world and this rank's
    device (``cuda:<local rank>`` on CUDA, ``device`` otherwise)."""
    world = from_env()
    if not world.active:
        return world, device
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        # Some launchers expose one device per process; others all of them.
        index = world.local_rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    owned = not dist.is_initialized()
    if owned:  # env:// rendezvous: MASTER_ADDR and MASTER_PORT come from the launcher
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return replace(world, owned=owned), device


def leave(world: World) -> None:
    if world.owned:
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def agree(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not world.active:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], world: World, device: str) -> list[float]:
    """Element-wise sums over the ranks (float64; nccl reduces on the GPU)."""
    if not world.active:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def wrap(model, world: World, device: str):
    """``model`` in DistributedDataParallel, or ``model`` itself in a single process. The
    wrapper shares the parameters; the unwrapped model stays the one that is evaluated
    and saved."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return DistributedDataParallel(model, device_ids=ids)


def on_main(world: World, fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 only (None elsewhere), then a barrier, so no rank goes
    on before the write is complete."""
    out = fn(*args, **kwargs) if world.main else None
    barrier(world)
    return out


def check_world(ckpt: Path | None, world: World) -> None:
    """A checkpoint is resumed with the world size (hence global batch) it was written with."""
    if ckpt is None:
        return
    saved = json.loads((ckpt / "state.json").read_text()).get("world_size", 1)
    if saved != world.size:
        raise ResumeError(f"{ckpt} was written by {saved} process(es), this run has {world.size}: the global "
                          "batch would change; resume with the same number of processes or use a new folder")


def shard(batch: list, world: World) -> list:
    """This rank's slice of a global micro-batch of ``world.size * b`` examples."""
    b = len(batch) // world.size
    return batch[world.rank * b : (world.rank + 1) * b]


def train_step(model, examples, step: int, config, pad_id: int, device: str, autocast, world: World):
    """One optimiser step's forward/backward on this rank's shards (``model`` is the DDP
    wrapper). Returns what the single-process step returns, over all ranks: (mean loss per
    completion token, input tokens seen). A non-finite loss on any rank makes the summed
    loss non-finite on every rank, so all of them stop at the same step."""

    n, b = config.grad_accum, config.batch_size
    batches = [collate(shard(micro_batch(examples, step * n + j, b * world.size, config.seed), world), pad_id)
               for j in range(n)]
    local = sum(int((x["labels"] != -100).sum()) for x in batches)
    (n_target,) = all_sum([float(local)], world, device)
    total = 0.0
    for j, x in enumerate(batches):
        # Gradients are all-reduced (averaged over ranks) on the last micro-batch only.
        with model.no_sync() if j < n - 1 else contextlib.nullcontext():
            loss, _ = completion_loss(model, {k: v.to(device) for k, v in x.items()}, autocast)
            (loss * (world.size / n_target)).backward()
        total += loss.item()
    tokens = sum(int(x["attention_mask"].sum()) for x in batches)
    total, seen = all_sum([total, float(tokens)], world, device)
    return total / n_target, int(seen)

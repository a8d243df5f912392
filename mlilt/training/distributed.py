"""Training on several processes (``torchrun``): one process per device, one global batch.

Each rank embeds a contiguous slice of every global batch; the slices are all-gathered with
their gradient so every rank computes the same loss over the whole global batch, then the
trainable gradients are combined so that each rank holds exactly the 1-process gradient.
Only rank 0 writes files. Without ``torchrun`` (no ``WORLD_SIZE`` > 1) everything here is a
no-op on one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlilt.errors import UsageError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; ``world == 1`` means no process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() started the process group (so teardown() ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def local_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (batch order = rank order)."""
        if len(batch) % self.world:
            raise UsageError(f"a batch of {len(batch)} pairs cannot be split evenly over {self.world} processes; "
                             f"make --batch-size (and the training pairs) a multiple of the process count")
        size = len(batch) // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in rank order; only this rank's rows carry a gradient."""
        if self.world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local  # put the autograd-tracked tensor back in its own slot
        return torch.cat(parts)

    def combine_gradients(self, per_sample: list[torch.Tensor], replicated: list[torch.Tensor]) -> None:
        """Turn each rank's partial gradient into the full one, identical on every rank.

        Every rank computes the same global loss, but reaches the parameters that produce
        embeddings only through its own rows: the full gradient of those is the SUM over ranks.
        Parameters used on the whole batch in the loss itself (the temperature) already get
        their full gradient on each rank: summing counts it ``world`` times, so it is averaged.
        """
        if self.world == 1:
            return
        params = [p for p in per_sample + replicated if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective, not one per tensor
        dist.all_reduce(flat)
        replicated_ids = {id(p) for p in replicated}
        offset = 0
        for p in params:
            grad = flat[offset:offset + p.numel()].view_as(p.grad)
            p.grad.copy_(grad / self.world if id(p) in replicated_ids else grad)
            offset += p.numel()

    def broadcast(self, value):
        """Rank 0's picklable ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, ok: bool) -> bool:
        """True only if every rank says True (a failure anywhere stops everyone)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag)
        return int(flag.item()) == 0


def setup() -> Ranks:
    """Join the process group ``torchrun`` describes in the environment (nccl on CUDA, gloo on
    CPU) and pick this process's device; one plain process when there is no such group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return Ranks(device=device)
    owns_group = not dist.is_initialized()  # a caller may have started it already: then it is theirs
    if owns_group:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                 owns_group=owns_group)


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()

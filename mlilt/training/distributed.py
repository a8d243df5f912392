"""Training on several processes (``torchrun``): one process per device, one global batch.

Each rank embeds a contiguous slice of every global batch; the slices are all-gathered with
their gradient (``torch.distributed.nn.functional.all_gather``) so every rank computes the
same loss over the whole global batch, then the trainable gradients are averaged so that each
rank holds exactly the 1-process gradient. Only rank 0 writes files. Without ``torchrun`` (no
``WORLD_SIZE`` > 1) everything here is a no-op on one process.

The device is passed explicitly (``Ranks.device``, ``cuda:<local rank>``): nothing here sets
the process's current CUDA device for good (see ``Ranks.worker_scope``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

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
        """Every rank's rows in rank order, differentiable.

        Every rank computes the same loss from the gathered rows, so the gradient that flows back
        to this rank's rows is the sum of ``world`` equal gradients: ``world`` times the
        1-process one. ``average_gradients`` divides it out again.
        """
        if self.world == 1:
            return local
        with warnings.catch_warnings():
            # torch 2.14 marks it deprecated in favour of a private module; it is the public one.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(local))

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Turn each rank's gradient into the 1-process one, identical on every rank.

        Parameters that produce embeddings reach the loss only through this rank's rows, and
        ``gather``'s backward hands them ``world`` times their share of the gradient: the mean
        over ranks is the sum of the shares, the full gradient. Parameters used on the whole
        batch in the loss itself (the temperature) hold the full gradient on every rank, and
        the mean leaves it so.
        """
        if self.world == 1:
            return
        params = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective, not one per tensor
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def worker_scope(self) -> contextlib.AbstractContextManager:
        """This rank's GPU as the current CUDA device while a run lasts, under ``torchrun`` only;
        the previous one is current again afterwards.

        NCCL's object collectives (``broadcast_object_list``) and a barrier of a process group
        this process did not bind to a device use the current device; left at GPU 0, every
        rank would also open a CUDA context there. One process, or CPUs, need nothing.
        """
        if self.world > 1 and self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

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


def setup(device: str = "auto") -> Ranks:
    """Join the process group ``torchrun`` describes in the environment (nccl on CUDA, gloo on
    CPU) and pick this process's device (``device``: auto, cpu, cuda, cuda:N; under torchrun
    each process takes its local rank's GPU); one plain process when there is no such group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = _wants_cuda(device, world)
    if world <= 1 and device.startswith("cuda:"):
        return Ranks(device=torch.device(device))
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if world <= 1:
        return Ranks(device=device)
    owns_group = not dist.is_initialized()  # a caller may have started it already: then it is theirs
    if owns_group:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                 owns_group=owns_group)


def _wants_cuda(device: str, world: int) -> bool:
    if device == "cpu":
        return False
    if device == "auto":
        return torch.cuda.is_available()
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.startswith("cuda:"):
        index = device.partition(":")[2]
        if world > 1:
            raise UsageError(f"--device {device} under torchrun: each process takes the GPU of its local rank; "
                             f"pass --device cuda")
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return True


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()

"""The epochs of a run: steps in a seeded order, checkpoints, validation and keep-best."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mlilt.errors import UsageError
from mlilt.modeling.model import ContrastiveModel
from mlilt.training.callbacks import Callback, StepInfo
from mlilt.training.checkpoint import (FitState, NumericalError, checkpoint_dir, find_checkpoint, load_checkpoint,
                                       save_checkpoint)
from mlilt.training.config import TrainConfig
from mlilt.training.distill import DistillSource
from mlilt.training.distributed import Ranks
from mlilt.training.optim import build_optimizer, build_schedule
from mlilt.training.progress import TrainProgress
from mlilt.training.sources import ImageSource, TextSource
from mlilt.data.split import Split
from mlilt.training.split import batches
from mlilt.training.step import train_step
from mlilt.training.validate import validate_on_main


@dataclass
class Parts:
    """What a run trains and on what: the model, both splits, their sources, this process."""

    model: ContrastiveModel
    train_split: Split
    val_split: Split
    texts: TextSource
    images: ImageSource
    ranks: Ranks = field(default_factory=Ranks)
    distill: DistillSource | None = None

    def epoch_items(self) -> int:
        """What an epoch goes through once: the training captions, else the parallel pairs."""
        return len(self.train_split.captions) or len(self.distill or ())


class Loop:
    """Trains ``parts.model``, checkpointing every ``checkpoint_every`` steps and at each epoch
    end, validating after each epoch; continues from a checkpoint with ``--resume``."""

    def __init__(self, parts: Parts, config: TrainConfig, progress: TrainProgress, hooks: Callback = Callback(),
                 data_hash: str = ""):
        self.parts, self.config, self.progress, self.hooks, self.data_hash = parts, config, progress, hooks, data_hash
        self.steps_per_epoch = parts.epoch_items() // config.batch_size or 1
        self.optimizer = build_optimizer(parts.model, config)
        self.schedule = build_schedule(self.optimizer, self.steps_per_epoch * config.epochs, config)
        self.generator = torch.Generator().manual_seed(config.seed)  # same seed on every rank: same order
        self.where = checkpoint_dir(config.out)

    def fit(self) -> FitState:
        config = self.config
        if self._resuming():
            state = load_checkpoint(self.where, self.parts.model, self.optimizer, self.schedule, self.generator,
                                    config, self.data_hash)
        else:  # a checkpoint of another run is replaced now
            self.progress.note("epoch 0: validating the untrained pack, the start every epoch must beat")
            state = FitState(history=[{"epoch": 0, "val": self._validate()}])
            self._checkpoint(state)
        self.hooks.on_fit_start(state)
        size = min(config.batch_size, self.parts.epoch_items())
        with self.progress.task("training", self.steps_per_epoch * config.epochs * size,
                                completed=state.step * size) as advance:
            first = state.epoch
            while state.epoch <= config.epochs:
                self._epoch(state, advance)
                self.progress.log_epoch(state.history[-1])
                self.hooks.on_epoch_end(state.history[-1])
                cache_line = self.parts.texts.describe() if state.epoch == first + 1 else None  # the first filled it
                if cache_line:
                    self.progress.note(cache_line)
        return state

    def _resuming(self) -> bool:
        """Rank 0 finds (and repairs) the checkpoint first; every rank follows its decision."""
        config, ranks = self.config, self.parts.ranks
        found = bool(config.resume and find_checkpoint(config.out)) if ranks.is_main else False
        found = ranks.broadcast(found)
        if found and not ranks.is_main and not self.where.is_dir():
            raise UsageError(f"rank {ranks.rank}: {self.where} is not visible here; --resume on "
                             f"several nodes needs --out on a filesystem every node shares")
        return found

    def _checkpoint(self, state: FitState) -> None:
        if self.parts.ranks.is_main and self.config.checkpoint_every:  # 0: no checkpoints (short runs, studies)
            save_checkpoint(self.where, state, self.parts.model, self.optimizer, self.schedule, self.generator,
                            self.config, self.data_hash)
            self.hooks.on_checkpoint(state)

    def _validate(self) -> dict:
        """Image-text recall on the held-out pairs; with parallel pairs, their held-out recall
        too (``distill_`` keys), or alone when the run has no image-caption pairs."""
        parts = self.parts
        if parts.distill is None:
            return validate_on_main(parts.model, parts.val_split, parts.texts, parts.images, parts.ranks)
        distill = parts.ranks.broadcast(parts.distill.validate() if parts.ranks.is_main else None)
        if not parts.train_split.captions:
            return distill
        val = validate_on_main(parts.model, parts.val_split, parts.texts, parts.images, parts.ranks)
        return {**val, **{f"distill_{key}": value for key, value in distill.items()}}

    def _epoch(self, state: FitState, advance) -> None:
        """Run (the rest of) the epoch in progress, then validate and checkpoint it."""
        config = self.config
        params = self.parts.model.trainable_parameters()
        if state.order is None:
            state.order = torch.randperm(self.parts.epoch_items(), generator=self.generator).tolist()
        todo = batches(state.order, config.batch_size)
        started = time.perf_counter() - state.seconds
        while state.batch < len(todo):
            loss = self._step(state, todo[state.batch], params, len(todo))
            state.batch, state.step = state.batch + 1, state.step + 1
            state.seconds = time.perf_counter() - started
            advance(len(todo[state.batch - 1]), loss=loss)
            if state.batch < len(todo) and config.checkpoint_every and state.step % config.checkpoint_every == 0:
                self._checkpoint(state)
        self._end_epoch(state, len(todo), max(1e-9, time.perf_counter() - started))

    def _step(self, state: FitState, batch: list[int], params, of: int) -> float | None:
        """One step of batch ``state.batch + 1`` (of ``of``); a non-finite one stops the run or is skipped."""
        parts, config = self.parts, self.config
        info = StepInfo(epoch=state.epoch, step=state.step, batch=batch, local=parts.ranks.local_slice(batch),
                        split=parts.train_split, model=parts.model, params=params, texts=parts.texts,
                        images=parts.images, distill=parts.distill)
        if parts.distill is not None:
            pairs = (parts.distill.batch_for(state.epoch, state.batch, len(batch), config.seed)
                     if parts.train_split.captions else batch)
            info.distill_local = parts.ranks.local_slice(pairs)
        self.hooks.on_step_start(info)
        info.started = time.perf_counter()
        info.loss, info.fault = train_step(info, self.optimizer, config, parts.ranks, self.hooks)
        info.seconds = time.perf_counter() - info.started
        self.hooks.on_step_end(info)
        if info.fault and not config.skip_nonfinite:
            raise NumericalError(f"training stopped: {info.fault} at epoch {state.epoch}, step {state.step + 1} "
                                 f"(batch {state.batch + 1} of {of}); no pack was written and the "
                                 f"last good checkpoint is kept in {self.where}. Lower --lr, "
                                 f"or pass --skip-nonfinite to skip such batches")
        if info.fault:
            state.skipped += 1
        else:
            self.schedule.step()
            state.losses.append(info.loss)
        return info.loss

    def _end_epoch(self, state: FitState, steps: int, seconds: float) -> None:
        """The epoch's history row, keep-best, and the next epoch's start (checkpointed)."""
        row = {"epoch": state.epoch,
               "loss": sum(state.losses) / len(state.losses) if state.losses else float("nan"),
               "lr": self.schedule.get_last_lr()[0], "seconds": round(seconds, 3),
               "samples_per_s": round(steps * self.config.batch_size / seconds, 2), "val": self._validate()}
        state.history.append(row)
        if state.best is None or row["val"]["mean_recall"] > state.best["val"]["mean_recall"]:
            state.best, state.best_state = row, snapshot(self.parts.model)  # keep-best: the first of equals
        state.epoch, state.batch, state.order, state.losses, state.seconds = state.epoch + 1, 0, None, [], 0.0
        self._checkpoint(state)


def snapshot(model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors (the best epoch's, for keep-best)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model: ContrastiveModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)

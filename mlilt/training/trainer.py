"""Contrastive training of one language pack: ``Trainer`` runs it, ``train`` is the one-call form.

A run reads and splits the pairs (``split``), builds the model (``assemble``), prepares the
caption and image inputs (``sources``), trains (``loop``), keeps the best epoch and writes the
pack (``metadata``). Under ``torchrun`` every process embeds its slice of each global batch and
the loss sees the whole batch (``distributed``); only rank 0 writes checkpoints and the pack.

A run leaves the calling process as it found it: the global torch RNG is seeded inside a fork
of it, no allocator setting is changed, and the current CUDA device changes only for the run's length, under
``torchrun`` (``Ranks.worker_scope``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from mlilt.errors import UsageError
from mlilt.methods import MethodReport
from mlilt.packs import check_pack_destination, save_pack
from mlilt.speed import parse_speed_paths
from mlilt.training import distributed
from mlilt.training.assemble import build_model
from mlilt.training.callbacks import Callback, Callbacks
from mlilt.training.checkpoint import checkpoint_dir, remove_checkpoint
from mlilt.training.config import TrainConfig
from mlilt.training.distributed import Ranks
from mlilt.training.loop import Loop, Parts, restore
from mlilt.training.metadata import pack_config
from mlilt.training.precision import warn_slow_bf16
from mlilt.training.progress import TrainProgress
from mlilt.training.sources import ImageSource, TextSource
from mlilt.training.distill import DistillSource, load_parallel, sentences
from mlilt.training.split import check_split, load_data
from mlilt.training.teachers import Teacher, load_teacher

__all__ = ["TrainResult", "Trainer", "train"]


@dataclass
class TrainResult:
    pack: Path
    metrics: dict
    report: MethodReport
    history: list[dict] = field(default_factory=list)
    written: bool = True  # this process wrote the pack (under torchrun only rank 0 does)


class Trainer:
    """One training run of ``config``; ``callbacks`` hear its events (``mlilt.training.callbacks``),
    ``console`` shows its progress (rank 0's only)."""

    def __init__(self, config: TrainConfig, console=None, callbacks: Sequence[Callback] = ()):
        self.config = config
        self.console = console
        self.hooks = Callbacks(callbacks)

    def run(self) -> TrainResult:
        """Train the pack; under ``torchrun`` every process runs this and rank 0 writes the pack."""
        ranks = distributed.setup(self.config.device)
        try:
            with seeded_rng(self.config.seed), ranks.worker_scope():
                return self._run(ranks, self.console if ranks.is_main else None)
        finally:
            distributed.teardown(ranks)

    def _run(self, ranks: Ranks, console) -> TrainResult:
        config = self.config
        check_pack_destination(config.out, config.overwrite)  # before any work
        train_split, val_split, summary = load_data(config) if config.data else (sentences([]), sentences([]), {})
        parallel = load_parallel(config) if config.parallel else None
        check_split(len(train_split.captions) or len(parallel), config.batch_size, ranks.world)
        progress = TrainProgress(console)
        progress.note(loading_note(config))
        teacher = load_teacher(config.teacher) if parallel is not None else None
        model, report, anchor = build_model(config, *student_space(config, teacher))
        self.hooks.on_model_built(model, report)
        model.to(ranks.device)
        images = ImageSource(model.image, config, ranks.device)
        texts = TextSource(model.text, ranks.device,
                           prefix_cache="text-prefix-cache" in parse_speed_paths(config.speed_paths))
        warn_slow_bf16(config.bf16, ranks.device, console)
        distill = None
        if teacher is not None:
            with progress.task("teacher embeddings", len(set(parallel.sources))) as advance:
                distill = DistillSource(parallel, teacher, texts, config.holdout, config.seed, config.distill_loss,
                                        use_cache=config.cache_features, progress=advance)
            summary["parallel"] = parallel.summary()
            summary["teacher"] = {"spec": config.teacher, "fingerprint": teacher.fingerprint()}
        texts.prepare(train_split, val_split)
        started = time.perf_counter()
        images.prepare(train_split, val_split, progress, ranks)
        self.hooks.on_image_features(images, time.perf_counter() - started)
        parts = Parts(model, train_split, val_split, texts, images, ranks, distill)
        state = Loop(parts, config, progress, self.hooks, data_hash(summary)).fit()
        restore(model, state.best_state)
        pack = Path(config.out)
        if ranks.is_main:
            meta = pack_config(config, model, report, anchor, summary, state.best, images.cached, state.skipped)
            pack = save_pack(config.out, model, meta, overwrite=config.overwrite)
            (pack / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in state.history))
            remove_checkpoint(checkpoint_dir(config.out))  # the pack is complete: nothing left to resume
        ranks.barrier()  # the other ranks return once the pack exists
        return TrainResult(pack, state.best["val"], report, state.history, written=ranks.is_main)


def train(config: TrainConfig, console=None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train one pack (``Trainer(config, console, callbacks).run()``)."""
    return Trainer(config, console=console, callbacks=callbacks).run()


def loading_note(config: TrainConfig) -> str:
    """What the first, silent seconds of a run do."""
    from mlilt.towers.offline import me5_small_converted

    note = f"loading the towers (text {config.text_tower})"
    if config.text_tower == "me5-small" and not me5_small_converted():
        note += " (me5-small is converted once, about 30 s; later runs reuse it)"
    return note


def student_space(config: TrainConfig, teacher: Teacher | None) -> tuple[str | None, int | None]:
    """(anchor, width) of a student: it lives in its teacher's space, which must be the anchor's."""
    if teacher is None:
        return config.anchor, None
    anchor = config.anchor or teacher.anchor
    if anchor is None and not config.data:
        raise UsageError(f"--teacher {teacher.spec} has no image space: pass --anchor (the pack or open_clip model "
                         f"whose image space its embeddings live in) or --data (image-caption pairs to learn one)")
    return anchor, teacher.width


def data_hash(summary: dict) -> str:
    """What a resumed run must train on: the pairs' content hash, and with parallel pairs,
    theirs and the teacher's fingerprint."""
    if "parallel" not in summary:
        return summary.get("sha256", "")
    parts = (summary.get("sha256", ""), summary["parallel"]["sha256"], summary["teacher"]["fingerprint"])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@contextlib.contextmanager
def seeded_rng(seed: int):
    """torch's global RNGs (CPU and every visible GPU) seeded with ``seed`` inside, as the
    caller had them afterwards: a seed gives the same pack, and the caller's draws are untouched."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

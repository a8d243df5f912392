"""Contrastive training of one language pack: data, model, loop, keep-best, save.

The loop is a handful of small functions. Frozen means cached: when no image-tower weight
trains, image features come from the feature cache and the image tower never runs after
the first pass.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlilt.api import image_side_of
from mlilt.build import build_sides
from mlilt.checkpoint import (FitState, NumericalError, checkpoint_dir, find_checkpoint, load_checkpoint,
                              remove_checkpoint, save_checkpoint)
from mlilt.data.feature_cache import FeatureCache, tower_features
from mlilt.data.images import image_id, load_image
from mlilt.data.pairs import PairSet, read_pairs
from mlilt.errors import DataError, UsageError
from mlilt.evaluation.retrieval import retrieval_metrics
from mlilt.methods import MethodReport
from mlilt.model import ContrastiveModel, SideEncoder, contrastive_loss, image_side_id
from mlilt.packs import PACK_CONFIG, Pack, PackConfig, read_pack, save_pack
from mlilt.progress import TrainProgress
from mlilt.towers.registry import load_image_tower, load_text_tower
from mlilt.train_config import TrainConfig


@dataclass
class Split:
    """Captions, their image index, and the distinct images of one split."""

    captions: list[str]
    caption_image: list[int]
    images: list
    sources: list[str]

    @classmethod
    def from_pairs(cls, pairs: PairSet) -> "Split":
        index: dict[str, int] = {}
        split = cls([], [], [], [])
        for pair in pairs:
            key = image_id(pair.image, pair.source)
            if key not in index:
                index[key] = len(split.images)
                split.images.append(pair.image)
                split.sources.append(pair.source)
            split.captions.append(pair.caption)
            split.caption_image.append(index[key])
        return split


@dataclass
class TrainResult:
    pack: Path
    metrics: dict
    report: MethodReport
    history: list[dict] = field(default_factory=list)


def train(config: TrainConfig, console=None) -> TrainResult:
    _check_out(config)
    train_split, val_split, summary = _load_data(config)
    model, report, anchor = _build_model(config)
    images = ImageSource(model.image, config)
    progress = TrainProgress(console)
    images.prepare(train_split, val_split, progress)
    state = _fit(model, train_split, val_split, images, config, progress, summary.get("sha256", ""))
    best = state.best
    _restore(model, state.best_state)
    pack_config = _pack_config(config, model, report, anchor, summary, best, images, state.skipped)
    pack = save_pack(config.out, model, pack_config, overwrite=config.overwrite)
    (pack / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in state.history))
    remove_checkpoint(checkpoint_dir(config.out))  # the pack is complete: nothing left to resume
    return TrainResult(pack, best["val"], report, state.history)


def _check_out(config: TrainConfig) -> None:
    out = Path(config.out)
    if (out / PACK_CONFIG).exists() and not config.overwrite:
        raise UsageError(f"{out} already holds a pack; pass --overwrite to replace it")


def _load_data(config: TrainConfig) -> tuple[Split, Split, dict]:
    pairs = read_pairs(config.data, lang=config.lang, skip_bad=config.skip_bad)
    if config.exclude_leaks:
        from mlilt.data.leakage import exclude_leaks, find_leaks
        report = find_leaks(pairs, config.exclude_leaks, config.leak_root, config.lang, config.leak_threshold)
        pairs = exclude_leaks(pairs, report)
    holdout = int(config.holdout) if config.holdout >= 1 else config.holdout
    train_pairs, val_pairs = pairs.split(holdout, config.seed)
    train_split, val_split = Split.from_pairs(train_pairs), Split.from_pairs(val_pairs)
    if len(train_split.images) < 2 or len(val_split.images) < 2:
        raise DataError(f"{config.data}: {len(pairs)} pairs over {len(train_split.images) + len(val_split.images)} "
                        f"images are too few to hold out a validation split; give more data")
    summary = pairs.summary()
    summary.update(train_pairs=len(train_pairs), val_pairs=len(val_pairs))
    return train_split, val_split, summary


def _build_model(config: TrainConfig) -> tuple[ContrastiveModel, MethodReport, Pack | None]:
    text_tower = load_text_tower(config.text_tower, pooling=config.pooling, max_length=config.max_length,
                                 prefix=config.text_prefix)
    image_tower = load_image_tower(config.image_tower)
    frozen = ("image",) if config.anchor else ()
    sides, report = build_sides({"text": text_tower, "image": image_tower}, config.method, config.embed_dim,
                                frozen_sides=frozen, seed=config.seed)
    anchor = None
    if config.anchor:
        anchor = read_pack(config.anchor)
        sides["image"] = image_side_of(anchor, image_tower)
    return ContrastiveModel(sides["text"], sides["image"]), report, anchor


class ImageSource:
    """Image inputs for training: cached tower features when the tower is frozen, else pixels."""

    def __init__(self, encoder: SideEncoder, config: TrainConfig):
        self.encoder = encoder
        self.cached = not encoder.tower_trains()
        self.cache = FeatureCache(encoder.tower) if self.cached and config.cache_features else None
        self.features: dict[str, torch.Tensor] = {}

    def prepare(self, train_split: Split, val_split: Split, progress: "TrainProgress") -> None:
        if not self.cached:
            return
        for name, split in (("train", train_split), ("val", val_split)):
            with progress.task(f"image features ({name})", len(split.images)) as advance:
                self.features[name] = tower_features(self.encoder.tower, split.images, cache=self.cache,
                                                     sources=split.sources, progress=advance)

    def embed(self, name: str, split: Split, indices: list[int]) -> torch.Tensor:
        if self.cached:
            return self.encoder.project(self.features[name][indices])
        pixels = torch.stack([self.encoder.tower.preprocess(load_image(split.images[i], split.sources[i]))
                              for i in indices])
        return self.encoder(pixels)


def _fit(model, train_split, val_split, images: ImageSource, config: TrainConfig, progress,
         data_hash: str = "") -> FitState:
    """Train, checkpointing every ``checkpoint_every`` steps and at each epoch end; resume from one."""
    steps_per_epoch = len(train_split.captions) // config.batch_size or 1
    optimizer = _optimizer(model, config)
    schedule = _schedule(optimizer, steps_per_epoch * config.epochs, config)
    generator = torch.Generator().manual_seed(config.seed)
    where = checkpoint_dir(config.out)

    def checkpoint(state: FitState) -> None:
        save_checkpoint(where, state, model, optimizer, schedule, generator, config, data_hash)

    if config.resume and find_checkpoint(config.out):
        state = load_checkpoint(where, model, optimizer, schedule, generator, config, data_hash)
    else:  # a checkpoint of another run is replaced now
        state = FitState(history=[{"epoch": 0, "val": validate(model, val_split, images)}])
        checkpoint(state)
    size = min(config.batch_size, len(train_split.captions))
    with progress.task("training", steps_per_epoch * config.epochs * size) as advance:
        advance(state.step * size)
        while state.epoch <= config.epochs:
            _epoch(model, train_split, val_split, images, (optimizer, schedule, generator), config, state,
                   checkpoint, advance)
            progress.log_epoch(state.history[-1])
    return state


def _epoch(model, split: Split, val_split: Split, images: ImageSource, training, config: TrainConfig,
           state: FitState, checkpoint, advance) -> None:
    """Run (the rest of) the epoch in progress, then validate and checkpoint it."""
    optimizer, schedule, generator = training
    params = model.trainable_parameters()
    if state.order is None:
        state.order = torch.randperm(len(split.captions), generator=generator).tolist()
    batches = _batches(state.order, config.batch_size)
    started = time.perf_counter() - state.seconds
    while state.batch < len(batches):
        loss, fault = _step(model, split, images, batches[state.batch], params, optimizer, config)
        if fault and not config.skip_nonfinite:
            raise NumericalError(f"training stopped: {fault} at epoch {state.epoch}, step {state.step + 1} "
                                 f"(batch {state.batch + 1} of {len(batches)}); no pack was written and the "
                                 f"last good checkpoint is kept in {checkpoint_dir(config.out)}. Lower --lr, "
                                 f"or pass --skip-nonfinite to skip such batches")
        if fault:
            state.skipped += 1
        else:
            schedule.step()
            state.losses.append(loss)
        state.batch, state.step = state.batch + 1, state.step + 1
        state.seconds = time.perf_counter() - started
        advance(len(batches[state.batch - 1]), loss=loss)
        if state.batch < len(batches) and state.step % config.checkpoint_every == 0:
            checkpoint(state)
    seconds = max(1e-9, time.perf_counter() - started)
    row = {"epoch": state.epoch, "loss": sum(state.losses) / len(state.losses) if state.losses else float("nan"),
           "lr": schedule.get_last_lr()[0], "seconds": round(seconds, 3),
           "samples_per_s": round(len(batches) * config.batch_size / seconds, 2),
           "val": validate(model, val_split, images)}
    state.history.append(row)
    if state.best is None or row["val"]["mean_recall"] > state.best["val"]["mean_recall"]:
        state.best, state.best_state = row, _snapshot(model)  # keep-best: the first of equals
    state.epoch, state.batch, state.order, state.losses, state.seconds = state.epoch + 1, 0, None, [], 0.0
    checkpoint(state)


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    size = min(batch_size, len(order))
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]  # full batches: equal negatives


def _step(model, split: Split, images: ImageSource, batch: list[int], params, optimizer,
          config) -> tuple[float | None, str | None]:
    """One optimizer step; (loss, None), or (None, what went non-finite) with no step taken."""
    captions = [split.captions[i] for i in batch]
    image_rows = [split.caption_image[i] for i in batch]
    tokens = model.text.tower.tokenize(captions)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        text = model.text(tokens["input_ids"], tokens["attention_mask"])
        image = images.embed("train", split, image_rows)
        loss = contrastive_loss(text.float(), image.float(), model.scale())
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None, f"the loss became {loss.item()}"
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None, f"the gradient norm became {norm.item()}"
    optimizer.step()
    return loss.item(), None


def _optimizer(model: ContrastiveModel, config: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices only: decaying norms' scales, biases or the temperature pulls them to 0.
    decay = [p for p in model.trainable_parameters() if p.ndim >= 2]
    no_decay = [p for p in model.trainable_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _schedule(optimizer, total: int, config: TrainConfig):
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def validate(model: ContrastiveModel, split: Split, images: ImageSource, batch_size: int = 64) -> dict:
    from mlilt.encode import encode_texts
    text = encode_texts(model.text, split.captions, batch_size)
    image = torch.cat([images.embed("val", split, list(range(i, min(i + batch_size, len(split.images)))))
                       for i in range(0, len(split.images), batch_size)])
    return {k: round(v, 4) for k, v in retrieval_metrics(text, image.float(), split.caption_image).items()}


def _snapshot(model: ContrastiveModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: ContrastiveModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _pack_config(config: TrainConfig, model, report, anchor: Pack | None, summary: dict, best: dict,
                 images: ImageSource, skipped: int = 0) -> PackConfig:
    text_tower, image_tower = model.text.tower, model.image.tower
    image_tensors = {k[len("image."):]: v for k, v in model.pack_state().items() if k.startswith("image.")}
    towers = {"text": {"spec": text_tower.spec, "fingerprint": model.text.base_fingerprint,
                       "options": {"pooling": text_tower.pooling, "max_length": text_tower.max_length,
                                   "prefix": text_tower.prefix}},
              "image": {"spec": image_tower.spec, "fingerprint": model.image.base_fingerprint, "options": {}}}
    training = {k: v for k, v in config.to_dict().items() if k not in ("out", "overwrite", "data", "resume")}
    training.update(best_epoch=best["epoch"], feature_cache=images.cached, nonfinite_batches_skipped=skipped)
    return PackConfig(
        language=config.lang, method=config.method,
        image_method=anchor.config.image_method if anchor else config.method,
        embed_dim=config.embed_dim, towers=towers,
        image_side_id=image_side_id(model.image.base_fingerprint, image_tensors),
        anchor={"name": str(config.anchor), "image_side_id": anchor.config.image_side_id} if anchor else None,
        data=summary, metrics={"val": best["val"]}, training=training, trainable=report.to_dict())

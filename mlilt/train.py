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
    history = _fit(model, train_split, val_split, images, config, progress)
    best = max(history[1:], key=lambda row: row["val"]["mean_recall"])
    _restore(model, best.pop("_state"))
    for row in history:
        row.pop("_state", None)
    pack_config = _pack_config(config, model, report, anchor, summary, best, images)
    pack = save_pack(config.out, model, pack_config, overwrite=config.overwrite)
    (pack / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    return TrainResult(pack, best["val"], report, history)


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


def _fit(model, train_split, val_split, images: ImageSource, config: TrainConfig, progress) -> list[dict]:
    params = model.trainable_parameters()
    steps_per_epoch = len(train_split.captions) // config.batch_size or 1
    total = steps_per_epoch * config.epochs
    optimizer = _optimizer(model, config)
    schedule = _schedule(optimizer, total, config)
    generator = torch.Generator().manual_seed(config.seed)
    history = [{"epoch": 0, "val": validate(model, val_split, images), "_state": None}]
    with progress.task("training", total * min(config.batch_size, len(train_split.captions))) as advance:
        for epoch in range(1, config.epochs + 1):
            started, losses = time.perf_counter(), []
            for batch in _batches(len(train_split.captions), config.batch_size, generator):
                loss = _step(model, train_split, images, batch, params, optimizer, config)
                schedule.step()
                losses.append(loss)
                advance(len(batch), loss=loss)
            seconds = time.perf_counter() - started
            row = {"epoch": epoch, "loss": sum(losses) / len(losses), "lr": schedule.get_last_lr()[0],
                   "seconds": round(seconds, 3), "samples_per_s": round(len(losses) * config.batch_size / seconds, 2),
                   "val": validate(model, val_split, images), "_state": _snapshot(model)}
            history.append(row)
            progress.log_epoch(row)
    return history


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    size = min(batch_size, n)
    return [order[i:i + size] for i in range(0, n - size + 1, size)]  # full batches: equal negatives


def _step(model, split: Split, images: ImageSource, batch: list[int], params, optimizer, config) -> float:
    captions = [split.captions[i] for i in batch]
    image_rows = [split.caption_image[i] for i in batch]
    tokens = model.text.tower.tokenize(captions)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        text = model.text(tokens["input_ids"], tokens["attention_mask"])
        image = images.embed("train", split, image_rows)
        loss = contrastive_loss(text.float(), image.float(), model.scale())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} (lower --lr, or check the data)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return loss.item()


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
                 images: ImageSource) -> PackConfig:
    text_tower, image_tower = model.text.tower, model.image.tower
    image_tensors = {k[len("image."):]: v for k, v in model.pack_state().items() if k.startswith("image.")}
    towers = {"text": {"spec": text_tower.spec, "fingerprint": model.text.base_fingerprint,
                       "options": {"pooling": text_tower.pooling, "max_length": text_tower.max_length,
                                   "prefix": text_tower.prefix}},
              "image": {"spec": image_tower.spec, "fingerprint": model.image.base_fingerprint, "options": {}}}
    training = {k: v for k, v in config.to_dict().items() if k not in ("out", "overwrite", "data")}
    training.update(best_epoch=best["epoch"], feature_cache=images.cached)
    return PackConfig(
        language=config.lang, method=config.method,
        image_method=anchor.config.image_method if anchor else config.method,
        embed_dim=config.embed_dim, towers=towers,
        image_side_id=image_side_id(model.image.base_fingerprint, image_tensors),
        anchor={"name": str(config.anchor), "image_side_id": anchor.config.image_side_id} if anchor else None,
        data=summary, metrics={"val": best["val"]}, training=training, trainable=report.to_dict())

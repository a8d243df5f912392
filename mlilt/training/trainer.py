"""Contrastive training of one language pack: data, model, loop, keep-best, save.

The loop is a handful of small functions. Frozen means cached: when no image-tower weight
trains, image features come from the feature cache and the image tower never runs after
the first pass; when only the top text blocks train, the hidden states below them are kept
per caption (``mlilt.speed.text_cache``). Under ``torchrun`` every process embeds its slice of
each global batch and the loss sees the whole batch (``mlilt.training.distributed``); only rank 0
writes checkpoints and the pack.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlilt.training import distributed
from mlilt.speed.allocator import return_free_memory, tune_allocator
from mlilt.modeling.factory import image_side_of
from mlilt.speed.bf16_weights import cache_bf16_weights
from mlilt.modeling.factory import build_sides
from mlilt.training.checkpoint import (FitState, NumericalError, checkpoint_dir, find_checkpoint, load_checkpoint,
                              remove_checkpoint, save_checkpoint)
from mlilt.data.feature_cache import FeatureCache, tower_features
from mlilt.data.images import image_id, load_image
from mlilt.data.pairs import PairSet, read_pairs
from mlilt.training.distributed import Ranks
from mlilt.modeling.encode import TokenizedTexts, length_sorted_batches, run_in_length_groups
from mlilt.errors import DataError, UsageError
from mlilt.evaluation.retrieval import retrieval_metrics
from mlilt.speed.grad_checkpoint import checkpoint_blocks
from mlilt.speed.lean_backward import lean_convolutions, lean_norm_clamps, recompute_norm_activations
from mlilt.methods import MethodReport
from mlilt.modeling.model import ContrastiveModel, SideEncoder, contrastive_loss, image_side_id
from mlilt.packs import PACK_CONFIG, Pack, PackConfig, read_pack, save_pack
from mlilt.training.progress import TrainProgress
from mlilt.speed.text_cache import PrefixCache, cut_point
from mlilt.towers.registry import load_image_tower, load_text_tower
from mlilt.training.config import TrainConfig


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
    written: bool = True  # this process wrote the pack (under torchrun only rank 0 does)


def train(config: TrainConfig, console=None) -> TrainResult:
    """Train one pack; under ``torchrun`` every process calls this and rank 0 writes the pack.
    Tunes the memory allocator for training first (``mlilt.speed.allocator``)."""
    tune_allocator()
    ranks = distributed.setup()
    try:
        return _train(config, console if ranks.is_main else None, ranks)
    finally:
        distributed.teardown(ranks)


def _train(config: TrainConfig, console, ranks: Ranks) -> TrainResult:
    _check_out(config)
    train_split, val_split, summary = _load_data(config)
    _check_split(len(train_split.captions), config.batch_size, ranks)
    model, report, anchor = _build_model(config)
    model.to(ranks.device)
    images = ImageSource(model.image, config, ranks.device)
    texts = TextSource(model.text, config, ranks.device)
    progress = TrainProgress(console)
    _warn_slow_bf16(config, ranks.device, console)
    texts.prepare(train_split, val_split)
    images.prepare(train_split, val_split, progress, ranks)
    state = _fit(model, train_split, val_split, (texts, images), config, progress, summary.get("sha256", ""),
                 ranks)
    best = state.best
    _restore(model, state.best_state)
    pack = Path(config.out)
    if ranks.is_main:
        pack_config = _pack_config(config, model, report, anchor, summary, best, images, state.skipped)
        pack = save_pack(config.out, model, pack_config, overwrite=config.overwrite)
        (pack / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in state.history))
        remove_checkpoint(checkpoint_dir(config.out))  # the pack is complete: nothing left to resume
    ranks.barrier()  # the other ranks return once the pack exists
    return TrainResult(pack, best["val"], report, state.history, written=ranks.is_main)


def _warn_slow_bf16(config: TrainConfig, device: torch.device, console) -> None:
    """bf16 autocast on a CPU without bfloat16 instructions is emulated: measured 19x slower
    than fp32 on an AVX2 machine (benchmarks/perf/README.md). Say so rather than refuse."""
    if not config.bf16 or device.type != "cpu" or console is None:
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability and "AMX" not in capability:
        console.print(f"note: --bf16 on a CPU without bfloat16 instructions ({capability}) is emulated and "
                      f"much slower than fp32 here; it pays on GPUs and on CPUs with AVX512-BF16/AMX")


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


def _check_split(pairs: int, batch_size: int, ranks: Ranks) -> None:
    """The global batch is split evenly over the processes (full batches only, see _batches)."""
    size = min(batch_size, pairs)
    if size % ranks.world:
        raise UsageError(f"--batch-size {size} cannot be split evenly over {ranks.world} processes; "
                         f"use a multiple of {ranks.world}")


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
    for encoder in sides.values():
        if config.bf16:
            cache_bf16_weights(encoder.tower)  # one cast per frozen weight, not one per step
        if encoder.tower_trains():
            lean_convolutions(encoder.tower)  # exact and free: frozen convolutions keep no inputs
            lean_norm_clamps(encoder.tower)  # exact: BatchNorm + ReLU6 keeps its input only
            if config.recompute_norms:
                recompute_norm_activations(encoder.tower)
            if config.grad_checkpointing:
                checkpoint_blocks(encoder.tower)
    return ContrastiveModel(sides["text"], sides["image"]), report, anchor


class TextSource:
    """Caption embeddings; the frozen lower text blocks run once per caption when they can."""

    def __init__(self, encoder: SideEncoder, config: TrainConfig, device: torch.device = torch.device("cpu")):
        self.encoder = encoder
        self.device = device
        cut = cut_point(encoder.tower) if config.cache_text else None
        self.cache = PrefixCache(encoder.tower, cut, config.text_cache_mb * 2**20) if cut is not None else None
        self.tokens: dict[str, TokenizedTexts] = {}

    def prepare(self, train_split: Split, val_split: Split) -> None:
        """Every caption tokenized once. The tokenizer is then handed back for the rest of the
        run (XLM-R's: ~250 MB) when the tower can load it again, and its memory returned."""
        for name, split in (("train", train_split), ("val", val_split)):
            self.tokenized(name, split)
        slot = getattr(self.encoder.tower, "tokenizer_slot", None)
        if all(t.standalone for t in self.tokens.values()) and slot is not None and slot.hand_back():
            return_free_memory()

    def embed(self, name: str, split: Split, indices: list[int]) -> torch.Tensor:
        tokens = self.tokenized(name, split)
        if self.cache is not None:
            return self.encoder.project(self.cache.features(name, indices, tokens, self.device))

        def run(group: list[int]) -> torch.Tensor:
            input_ids, attention_mask = tokens.batch([indices[i] for i in group])
            return self.encoder(input_ids.to(self.device), attention_mask.to(self.device))
        lengths = tokens.lengths(indices)
        # A padding-free tower needs no length groups: it groups captions for attention itself.
        # One call per batch made the text step 3-12% faster (benchmarks/perf/README.md, session
        # 8); with attention in groups it no longer keeps more at the peak (session 10).
        if lengths is None or getattr(self.encoder.tower, "runs_padding_free", False):
            return run(list(range(len(indices))))
        return run_in_length_groups(lengths, run)  # same embeddings, less padding

    def tokenized(self, name: str, split: Split) -> TokenizedTexts:
        """The captions of ``split`` (called ``name``), tokenized on first use."""
        if name not in self.tokens:
            self.tokens[name] = TokenizedTexts(self.encoder.tower, split.captions)
        return self.tokens[name]

    def describe(self) -> str | None:
        """What the prefix cache holds; None when the method cannot use one (nothing to report)."""
        return self.cache.describe() if self.cache is not None else None


class ImageSource:
    """Image inputs for training: cached tower features when the tower is frozen, else pixels."""

    def __init__(self, encoder: SideEncoder, config: TrainConfig, device: torch.device = torch.device("cpu")):
        self.encoder = encoder
        self.device = device
        self.cached = not encoder.tower_trains()
        self.cache = FeatureCache(encoder.tower) if self.cached and config.cache_features else None
        self.features: dict[str, torch.Tensor] = {}

    def prepare(self, train_split: Split, val_split: Split, progress: "TrainProgress",
                ranks: Ranks = Ranks()) -> None:
        """Tower features of both splits. Rank 0 goes first and fills the shared cache; the
        others then read it rather than racing to compute the same images."""
        if not self.cached:
            return
        if not ranks.is_main:
            ranks.barrier()
        splits = (("train", train_split), ("val", val_split)) if ranks.is_main else (("train", train_split),)
        for name, split in splits:  # only rank 0 validates
            with progress.task(f"image features ({name})", len(split.images)) as advance:
                self.features[name] = tower_features(self.encoder.tower, split.images, cache=self.cache,
                                                     sources=split.sources, progress=advance)
        if ranks.is_main:
            ranks.barrier()

    def embed(self, name: str, split: Split, indices: list[int]) -> torch.Tensor:
        if self.cached:
            return self.encoder.project(self.features[name][indices].to(self.device))
        pixels = torch.stack([self.encoder.tower.preprocess(load_image(split.images[i], split.sources[i]))
                              for i in indices])
        return self.encoder(pixels.to(self.device))


def _fit(model, train_split, val_split, sources, config: TrainConfig, progress, data_hash: str = "",
         ranks: Ranks = Ranks()) -> FitState:
    """Train, checkpointing every ``checkpoint_every`` steps and at each epoch end; resume from one."""
    steps_per_epoch = len(train_split.captions) // config.batch_size or 1
    optimizer = _optimizer(model, config)
    schedule = _schedule(optimizer, steps_per_epoch * config.epochs, config)
    generator = torch.Generator().manual_seed(config.seed)  # same seed on every rank: same order
    where = checkpoint_dir(config.out)

    def checkpoint(state: FitState) -> None:
        if ranks.is_main and config.checkpoint_every:  # 0: no checkpoints (short runs, studies)
            save_checkpoint(where, state, model, optimizer, schedule, generator, config, data_hash)

    def check() -> dict:
        return _validate(model, val_split, sources, ranks)

    if _resuming(config, ranks):
        state = load_checkpoint(where, model, optimizer, schedule, generator, config, data_hash)
    else:  # a checkpoint of another run is replaced now
        state = FitState(history=[{"epoch": 0, "val": check()}])
        checkpoint(state)
    size = min(config.batch_size, len(train_split.captions))
    with progress.task("training", steps_per_epoch * config.epochs * size) as advance:
        advance(state.step * size)
        first = True
        while state.epoch <= config.epochs:
            _epoch(model, train_split, sources, (optimizer, schedule, generator), config, state,
                   (checkpoint, check), advance, ranks)
            progress.log_epoch(state.history[-1])
            cache_line = sources[0].describe() if first else None  # its memory, once the first epoch filled it
            if cache_line and progress.console is not None:
                progress.console.print(cache_line)
            first = False
    return state


def _resuming(config: TrainConfig, ranks: Ranks) -> bool:
    """Rank 0 finds (and repairs) the checkpoint first; every rank follows its decision."""
    found = bool(config.resume and find_checkpoint(config.out)) if ranks.is_main else False
    found = ranks.broadcast(found)
    if found and not ranks.is_main and not checkpoint_dir(config.out).is_dir():
        raise UsageError(f"rank {ranks.rank}: {checkpoint_dir(config.out)} is not visible here; --resume on "
                         f"several nodes needs --out on a filesystem every node shares")
    return found


def _epoch(model, split: Split, sources, training, config: TrainConfig, state: FitState, hooks, advance,
           ranks: Ranks = Ranks()) -> None:
    """Run (the rest of) the epoch in progress, then validate and checkpoint it."""
    optimizer, schedule, generator = training
    checkpoint, check = hooks
    params = model.trainable_parameters()
    if state.order is None:
        state.order = torch.randperm(len(split.captions), generator=generator).tolist()
    batches = _batches(state.order, config.batch_size)
    started = time.perf_counter() - state.seconds
    while state.batch < len(batches):
        loss, fault = _step(model, split, sources, batches[state.batch], params, optimizer, config, ranks)
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
        if state.batch < len(batches) and config.checkpoint_every and state.step % config.checkpoint_every == 0:
            checkpoint(state)
    seconds = max(1e-9, time.perf_counter() - started)
    row = {"epoch": state.epoch, "loss": sum(state.losses) / len(state.losses) if state.losses else float("nan"),
           "lr": schedule.get_last_lr()[0], "seconds": round(seconds, 3),
           "samples_per_s": round(len(batches) * config.batch_size / seconds, 2),
           "val": check()}
    state.history.append(row)
    if state.best is None or row["val"]["mean_recall"] > state.best["val"]["mean_recall"]:
        state.best, state.best_state = row, _snapshot(model)  # keep-best: the first of equals
    state.epoch, state.batch, state.order, state.losses, state.seconds = state.epoch + 1, 0, None, [], 0.0
    checkpoint(state)


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    size = min(batch_size, len(order))
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]  # full batches: equal negatives


def _step(model, split: Split, sources, batch: list[int], params, optimizer, config,
          ranks: Ranks = Ranks()) -> tuple[float | None, str | None]:
    """One optimizer step over the global ``batch``; (loss, None), or (None, what went
    non-finite) with no step taken. Every rank sees the same loss and the same gradient."""
    texts, images = sources
    if not images.cached:
        # A step that runs the image tower allocates GBs of activations, and the heap memory
        # the last one freed stays resident: handed back, this step's peak counts only what
        # it touches (benchmarks/perf/README.md, session 7).
        return_free_memory()
    local = ranks.local_slice(batch)
    with _precision(config.bf16, ranks.device):
        text = ranks.gather(texts.embed("train", split, local).float())
        image = ranks.gather(images.embed("train", split, [split.caption_image[i] for i in local]).float())
        loss = contrastive_loss(text, image, model.scale())
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None, f"the loss became {loss.item()}"
    loss.backward()
    ranks.combine_gradients([p for p in params if p is not model.logit_scale], [model.logit_scale])
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)  # on the combined gradient
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None, f"the gradient norm became {norm.item()}"
    optimizer.step()
    return loss.item(), None


def _precision(bf16: bool, device: torch.device) -> contextlib.ExitStack:
    """bfloat16 autocast with ``--bf16``. On a CPU attention then runs PyTorch's math kernel:
    with the flash kernel, whose bf16 backward is slow on CPU, the text tower's forward and
    backward took 0.92 s in bf16 against 0.95 s in fp32 on an AMX CPU; with the math kernel,
    0.46 s (benchmarks/perf/levers.py)."""
    stack = contextlib.ExitStack()
    if bf16:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


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


def _validate(model: ContrastiveModel, split: Split, sources, ranks: Ranks) -> dict:
    """Validation on rank 0 only; every rank gets its numbers (so all agree on keep-best)."""
    return ranks.broadcast(validate(model, split, *sources) if ranks.is_main else None)


@torch.no_grad()
def validate(model: ContrastiveModel, split: Split, texts: TextSource, images: ImageSource,
             batch_size: int = 64) -> dict:
    text = torch.empty(len(split.captions), model.text.proj.out_features)
    lengths = texts.tokenized("val", split).lengths()
    for batch in length_sorted_batches(split.captions, batch_size, lengths):  # similar lengths: little padding
        text[batch] = texts.embed("val", split, batch).float().cpu()
    image = torch.cat([images.embed("val", split, list(range(i, min(i + batch_size, len(split.images)))))
                       for i in range(0, len(split.images), batch_size)])
    return {k: round(v, 4) for k, v in retrieval_metrics(text, image.float().cpu(), split.caption_image).items()}


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

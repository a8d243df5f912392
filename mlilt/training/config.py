"""Everything a training run is configured by, checked before any work starts.

``TrainConfig`` is the one list of training options: the ``mlilt train`` options and a study's
``train:`` settings take their names and defaults from its fields (``defaults``,
``check_settings``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from mlilt.errors import UsageError
from mlilt.defaults import DEFAULT_EMBED_DIM, DEFAULT_IMAGE_TOWER, DEFAULT_METHOD, DEFAULT_TEXT_TOWER
from mlilt.methods.spec import parse_method
from mlilt.speed import parse_speed_paths


@dataclass
class TrainConfig:
    lang: str  # language code of the captions (and of the pack)
    data: str | None  # image-caption pairs: JSONL/CSV/TSV file, parquet/arrow, a Hugging Face dataset; None: none
    out: str  # the pack folder to write
    image_column: str | None = None  # the pairs' image field; None: image, image_path, file or filepath
    caption_column: str | None = None  # the pairs' caption field; None: caption, text, sentences or captions
    method: str = DEFAULT_METHOD  # e.g. ln+adapter, lora:8, unlock:2, full-text
    text_tower: str = DEFAULT_TEXT_TOWER
    image_tower: str = DEFAULT_IMAGE_TOWER
    anchor: str | None = None  # the frozen image space: a pack or open_clip MODEL:PRETRAINED (default: the teacher's)
    parallel: tuple[str, ...] = ()  # parallel-sentence files (source<TAB>target...), learned from a teacher
    parallel_columns: str | None = None  # "SOURCE,TARGET" column names of parquet/arrow/dataset parallel data
    teacher: str | None = None  # embeds the parallel sources: a pack, open_clip MODEL:PRETRAINED or sentence-transformers model
    distill_loss: str = "mse"  # mse, contrastive (in-batch text-text InfoNCE) or both
    distill_weight: float = 1.0  # the distillation loss's weight when image-caption pairs train too
    embed_dim: int = DEFAULT_EMBED_DIM
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3  # new projections and adapters from scratch want more than LilT's 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this (LilT: 1e-4 -> 1e-5)
    weight_decay: float = 0.02  # LilT
    warmup_steps: int | None = None  # default: 5% of all steps
    grad_clip: float = 1.0
    holdout: float = 0.1  # share (<1) or number (>=1) of images held out for validation
    seed: int = 0
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:N
    bf16: bool = False
    grad_checkpointing: bool = False  # recompute trained blocks' activations in the backward pass: less memory
    recompute_norms: bool = False  # fused norm+SiLU/GELU... layers keep only their input (less memory, more time)
    speed_paths: str = "default"  # CPU speed paths (mlilt.speed): default, none (plain PyTorch) or a comma list
    max_length: int = 64  # caption tokens
    pooling: str | None = None  # text tower pooling (mean/cls); None: the tower's default
    text_prefix: str | None = None  # prepended to captions; None: the tower's default
    skip_bad: bool = False
    overwrite: bool = False
    cache_features: bool = True
    exclude_leaks: str | None = None  # a benchmark whose test captions/images must not be trained on
    leak_root: str | None = None  # where that benchmark lives (a pairs file for "custom")
    leak_threshold: float = 80.0  # sentence chrF at or above which a caption counts as leaked
    checkpoint_every: int = 50  # steps between checkpoints in <out>.checkpoint/ (also at each epoch end); 0: none
    resume: bool = False  # continue from <out>.checkpoint/ (same settings and data); else it is replaced
    skip_nonfinite: bool = False  # skip (and count) batches whose loss or gradient norm is NaN/inf; else stop

    def __post_init__(self):
        parse_method(self.method)  # raises a UsageError naming the bad part
        self.parallel = (self.parallel,) if isinstance(self.parallel, str) else tuple(self.parallel or ())
        parse_speed_paths(self.speed_paths)
        checks = [(self.epochs >= 1, "--epochs must be at least 1"),
                  (self.batch_size >= 2, "--batch-size must be at least 2 (contrastive loss needs negatives)"),
                  (self.lr > 0, "--lr must be positive"),
                  (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be within [0, 1]"),
                  (self.weight_decay >= 0, "--weight-decay must be >= 0"),
                  (self.checkpoint_every >= 0, "--checkpoint-every must be 0 (no checkpoints) or more"),
                  (self.grad_clip > 0, "--grad-clip must be positive"),
                  (self.holdout > 0, "--holdout must be positive"),
                  (self.embed_dim >= 1, "--embed-dim must be positive"),
                  (self.max_length >= 4, "--max-length must be at least 4 tokens"),
                  (bool(self.lang.strip()), "--lang must not be empty"),
                  (self.pooling in (None, "mean", "cls"), "--pooling must be mean or cls (sentence-transformers "
                                                          "models pool as they were saved: leave it out)"),
                  (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                   "--device must be auto, cpu, cuda or cuda:N"),
                  (self.exclude_leaks is None or bool(self.leak_root), "--exclude-leaks needs --leak-root"),
                  (bool(self.data) or bool(self.parallel), "give --data (image-caption pairs), --parallel "
                                                           "(parallel sentences with a --teacher), or both"),
                  (not self.parallel or bool(self.teacher), "--parallel needs --teacher: the model that embeds "
                                                            "the source sentences"),
                  (not self.teacher or bool(self.parallel), "--teacher needs --parallel: the sentences to "
                                                            "learn from it"),
                  (self.distill_loss in ("mse", "contrastive", "both"),
                   "--distill-loss must be mse, contrastive or both"),
                  (self.distill_weight > 0, "--distill-weight must be positive"),
                  (self.parallel_columns is None or len(self.parallel_columns.split(",")) == 2,
                   "--parallel-columns must be SOURCE,TARGET")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_dict(self) -> dict:
        return {**asdict(self), "parallel": list(self.parallel)}

    @classmethod
    def defaults(cls) -> dict:
        """Every option that has a default, with it (``lang``, ``data`` and ``out`` have none)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


# What each field's annotation accepts (an int is a float too; bool is not an int here).
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "tuple[str, ...]": (list, tuple)}


def check_settings(settings: dict, where: str = "settings") -> None:
    """Raise a UsageError unless ``settings`` (option name -> value, as in a YAML file) are
    TrainConfig options of the right types and pass its checks."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown setting {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    for name, value in settings.items():
        kinds = fields[name].type.split(" | ")
        if value is None and "None" in kinds:
            continue
        accepted = tuple(t for kind in kinds for t in _TYPES.get(kind, ()))
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            raise UsageError(f"{where}: {name} must be {' or '.join(kinds)}, not {value!r}")
    try:
        TrainConfig(**{"lang": "xx", "data": "-", "out": "-", **settings})
    except UsageError as error:
        raise UsageError(f"{where}: {error}") from None

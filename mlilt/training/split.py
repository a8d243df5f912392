"""The training pairs read, leak-checked and split into training and validation images."""
from __future__ import annotations

from mlilt.data.pairs import read_pairs
from mlilt.data.split import Split
from mlilt.errors import DataError, UsageError
from mlilt.training.config import TrainConfig


def load_data(config: TrainConfig) -> tuple[Split, Split, dict]:
    """The training and validation splits (held out by image) and the data summary for the pack."""
    pairs = read_pairs(config.data, lang=config.lang, skip_bad=config.skip_bad, image_column=config.image_column,
                       caption_column=config.caption_column)
    if config.exclude_leaks:
        from mlilt.datasets.leakage import exclude_leaks, find_leaks
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


def check_split(pairs: int, batch_size: int, world: int) -> None:
    """The global batch is split evenly over the processes (full batches only, see ``batches``)."""
    size = min(batch_size, pairs)
    if size % world:
        raise UsageError(f"--batch-size {size} cannot be split evenly over {world} processes; "
                         f"use a multiple of {world}")


def batches(order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into full batches (equal negatives in every step); a short tail is left out."""
    size = min(batch_size, len(order))
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]

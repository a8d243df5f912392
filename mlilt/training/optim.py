"""AdamW over the trainable parameters and its learning-rate schedule (warmup, then cosine)."""
from __future__ import annotations

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

from mlilt.modeling.model import ContrastiveModel
from mlilt.training.config import TrainConfig


def build_optimizer(model: ContrastiveModel, config: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices only: decaying norms' scales, biases or the temperature pulls them to 0.
    decay = [p for p in model.trainable_parameters() if p.ndim >= 2]
    no_decay = [p for p in model.trainable_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def warmup_steps(total: int, config: TrainConfig) -> int:
    """``--warmup-steps``, else 5% of all steps (at least one)."""
    return config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)


def build_schedule(optimizer: torch.optim.Optimizer, total: int,
                   config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from lr/warmup to lr over the warmup steps, then a half cosine down to
    lr * ``min_lr_ratio``, which the last of the ``total`` steps trains at.

    transformers' schedule with a warmup that starts at lr/warmup, not at 0: no step is spent
    at a learning rate of 0 (with the default warmup of a short run, one step, that would be
    the whole warmup).
    """
    return get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        optimizer, num_warmup_steps=warmup_steps(total, config), num_training_steps=total,
        min_lr_rate=config.min_lr_ratio)

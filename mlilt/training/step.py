"""One optimizer step over a global batch, the same on every process."""
from __future__ import annotations

import torch

from mlilt.modeling.model import contrastive_loss
from mlilt.speed import parse_speed_paths
from mlilt.training.callbacks import Callback, StepInfo
from mlilt.training.config import TrainConfig
from mlilt.training.distributed import Ranks
from mlilt.training.precision import autocast


def train_step(info: StepInfo, optimizer: torch.optim.Optimizer, config: TrainConfig, ranks: Ranks = Ranks(),
               hooks: Callback = Callback()) -> tuple[float | None, str | None]:
    """One optimizer step over ``info.batch`` (image-caption pairs) and ``info.distill_local``
    (parallel pairs); (loss, None), or (None, what went non-finite)
    with no step taken. Every rank sees the same loss and the same gradient. ``hooks`` hear
    each phase begin (``Callback.on_step_phase``)."""
    model, split, texts, images, params = info.model, info.split, info.texts, info.images, info.params
    paths = parse_speed_paths(config.speed_paths)
    with autocast(config.bf16, ranks.device, "math-attention" in paths):
        loss = None
        if split.captions:
            hooks.on_step_phase(info, "text")
            text = ranks.gather(texts.embed("train", split, info.local).float())
            hooks.on_step_phase(info, "image")
            image = ranks.gather(images.embed("train", split, [split.caption_image[i] for i in info.local]).float())
            hooks.on_step_phase(info, "loss")
            loss = contrastive_loss(text, image, model.scale())
        if info.distill is not None:
            hooks.on_step_phase(info, "distill")
            distill = info.distill.loss(info.distill_local, ranks, model.scale())
            loss = distill if loss is None else loss + config.distill_weight * distill
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None, f"the loss became {loss.item()}"
    hooks.on_step_phase(info, "backward")
    loss.backward()
    hooks.on_step_phase(info, "update")
    ranks.average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)  # on the combined gradient
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None, f"the gradient norm became {norm.item()}"
    optimizer.step()
    return loss.item(), None

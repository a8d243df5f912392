"""Retrieval on the held-out split: what keep-best and the epoch log go by."""
from __future__ import annotations

import torch

from mlilt.evaluation.retrieval import retrieval_metrics
from mlilt.modeling.encode import length_sorted_batches
from mlilt.modeling.model import ContrastiveModel
from mlilt.training.distributed import Ranks
from mlilt.training.sources import ImageSource, TextSource
from mlilt.data.split import Split


@torch.no_grad()
def validate(model: ContrastiveModel, split: Split, texts: TextSource, images: ImageSource,
             batch_size: int = 64) -> dict:
    """Recall@K both ways and their mean over ``split`` (rounded to 4 places)."""
    text = torch.empty(len(split.captions), model.text.proj.out_features)
    lengths = texts.tokenized("val", split).lengths()
    for batch in length_sorted_batches(split.captions, batch_size, lengths):  # similar lengths: little padding
        text[batch] = texts.embed("val", split, batch).float().cpu()
    image = torch.cat([images.embed("val", split, list(range(i, min(i + batch_size, len(split.images)))))
                       for i in range(0, len(split.images), batch_size)])
    return {k: round(v, 4) for k, v in retrieval_metrics(text, image.float().cpu(), split.caption_image).items()}


def validate_on_main(model: ContrastiveModel, split: Split, texts: TextSource, images: ImageSource,
                     ranks: Ranks) -> dict:
    """Validation on rank 0 only; every rank gets its numbers (so all agree on keep-best)."""
    return ranks.broadcast(validate(model, split, texts, images) if ranks.is_main else None)

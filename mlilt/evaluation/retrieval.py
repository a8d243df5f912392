"""Retrieval recall as CLIP_benchmark defines it.

text→image ("image retrieval"): a caption hits at k when its image is among the k images
scored highest. image→text ("text retrieval"): an image hits at k when any of its captions is
among the k captions scored highest. Ties are broken by index (lower first), so results are
deterministic. Scores are computed in chunks so memory stays bounded for large galleries.
"""
from __future__ import annotations

import torch

KS = (1, 5, 10)
MAX_BLOCK = 1 << 24


def _ranks_of_best_positive(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """For each row, the 0-based rank of its best-ranked positive column.

    A column outranks the positive if it scores higher, or equally with a lower index.
    """
    columns = torch.arange(scores.shape[1], device=scores.device)
    best = torch.full((scores.shape[0],), scores.shape[1], dtype=torch.long)
    pos_scores = torch.where(positives, scores, torch.tensor(float("-inf")))
    # The best positive: highest score, lowest index among equals.
    top_score = pos_scores.max(dim=1).values
    is_top = positives & (scores == top_score[:, None])
    first_col = torch.where(is_top, columns, torch.tensor(scores.shape[1])).min(dim=1).values
    higher = (scores > top_score[:, None]).sum(1)
    tied_before = ((scores == top_score[:, None]) & (columns[None, :] < first_col[:, None])).sum(1)
    has_positive = positives.any(1)
    best[has_positive] = (higher + tied_before)[has_positive]
    return best


def retrieval_metrics(text_emb: torch.Tensor, image_emb: torch.Tensor, text_to_image: list[int] | torch.Tensor,
                      ks: tuple[int, ...] = KS, chunk: int = 4096) -> dict[str, float]:
    """Recall@k both ways (in %) and their mean, for captions whose image is ``text_to_image[i]``."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    n_texts, n_images = len(text_emb), len(image_emb)
    # Bound each score block (and its temporaries) to ~16M entries: large galleries stay in memory.
    chunk = max(1, min(chunk, MAX_BLOCK // max(n_texts, n_images, 1)))
    t2i_ranks = torch.empty(n_texts, dtype=torch.long)
    for start in range(0, n_texts, chunk):
        scores = text_emb[start:start + chunk].float() @ image_emb.float().t()
        positives = torch.zeros_like(scores, dtype=torch.bool)
        positives[torch.arange(len(scores)), text_to_image[start:start + chunk]] = True
        t2i_ranks[start:start + chunk] = _ranks_of_best_positive(scores, positives)
    i2t_ranks = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        scores = image_emb[start:start + chunk].float() @ text_emb.float().t()
        positives = text_to_image[None, :] == torch.arange(start, start + len(scores))[:, None]
        i2t_ranks[start:start + chunk] = _ranks_of_best_positive(scores, positives)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = 100.0 * (t2i_ranks < k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = 100.0 * (i2t_ranks < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics

"""Retrieval recall as CLIP_benchmark defines it.

text→image ("image retrieval"): a caption hits at k when its image is among the k images
scored highest. image→text ("text retrieval"): an image hits at k when any of its captions is
among the k captions scored highest. Ties are broken by index (lower first), so results are
deterministic. Scores are computed in chunks so memory stays bounded for large galleries.
"""
from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10)
MAX_BLOCK = 1 << 24


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row; numpy's count on CPU is several times faster than ``mask.sum(1)``."""
    if mask.device.type != "cpu":
        return mask.sum(1)
    return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=1).astype(np.int64))


def _rank_of(scores: torch.Tensor, top: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """For each row, the 0-based rank of the entry ``top`` at index ``column``.

    A column outranks it if it scores higher, or equally with a lower index. Only two boolean
    blocks besides the scores: exact ties are rare, so the index test runs on tied rows only.
    """
    equal = scores == top[:, None]
    rank = _count(scores > top[:, None])
    tied = (_count(equal) > 1).nonzero().squeeze(1)
    if len(tied):
        columns = torch.arange(scores.shape[1], device=scores.device)
        rank[tied] += _count(equal[tied] & (columns[None, :] < column[tied, None]))
    return rank


def _i2t_best_positives(scores: torch.Tensor, text_to_image: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
    """For images ``start..`` (rows), their best caption's score and index (highest, lowest index among equals).

    Images without a caption get the index ``n_texts``.
    """
    rows, n_texts = scores.shape
    captions = ((text_to_image >= start) & (text_to_image < start + rows)).nonzero().squeeze(1)
    image = text_to_image[captions] - start
    values = scores[image, captions]
    top = torch.full((rows,), float("-inf"), dtype=scores.dtype).scatter_reduce(0, image, values, "amax")
    best = values == top[image]
    first = torch.full((rows,), n_texts, dtype=torch.long).scatter_reduce(0, image[best], captions[best], "amin")
    return top, first


def retrieval_metrics(text_emb: torch.Tensor, image_emb: torch.Tensor, text_to_image: list[int] | torch.Tensor,
                      ks: tuple[int, ...] = KS, chunk: int = 4096) -> dict[str, float]:
    """Recall@k both ways (in %) and their mean, for captions whose image is ``text_to_image[i]``."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    n_texts, n_images = len(text_emb), len(image_emb)
    # Bound each score block (and its temporaries) to ~16M entries: large galleries stay in memory.
    chunk = max(1, min(chunk, MAX_BLOCK // max(n_texts, n_images, 1)))
    text_emb, image_emb = text_emb.float(), image_emb.float()  # once, not per block
    t2i_ranks = torch.empty(n_texts, dtype=torch.long)
    for start in range(0, n_texts, chunk):
        scores = text_emb[start:start + chunk] @ image_emb.t()
        image = text_to_image[start:start + chunk]  # each caption's one positive
        t2i_ranks[start:start + chunk] = _rank_of(scores, scores.gather(1, image[:, None]).squeeze(1), image)
    i2t_ranks = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        scores = image_emb[start:start + chunk] @ text_emb.t()
        top, first = _i2t_best_positives(scores, text_to_image, start)
        ranks = _rank_of(scores, top, first)
        ranks[first == n_texts] = n_texts  # an image without captions never hits
        i2t_ranks[start:start + chunk] = ranks
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = 100.0 * (t2i_ranks < k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = 100.0 * (i2t_ranks < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics

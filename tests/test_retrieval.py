"""Recall@k exactly as CLIP_benchmark defines it, against a brute-force reference."""
from __future__ import annotations

import pytest
import torch

from mlilt.evaluation.retrieval import retrieval_metrics


def _brute_force(text: torch.Tensor, image: torch.Tensor, text_to_image: list[int], k: int) -> tuple[float, float]:
    scores = (text @ image.t()).tolist()

    def ranking(row: list[float]) -> list[int]:  # best first, lower index first among equals
        return sorted(range(len(row)), key=lambda j: (-row[j], j))

    t2i = [ranking(scores[i]).index(text_to_image[i]) < k for i in range(len(text_to_image))]
    i2t = []
    for j in range(len(image)):
        column = [scores[i][j] for i in range(len(text_to_image))]
        order = ranking(column)
        i2t.append(any(order.index(i) < k for i in range(len(text_to_image)) if text_to_image[i] == j))
    return 100 * sum(t2i) / len(t2i), 100 * sum(i2t) / len(i2t)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [3, 4096])
def test_matches_brute_force_with_several_positives_per_image(seed, chunk):
    generator = torch.Generator().manual_seed(seed)
    images = 25
    text_to_image = [j for j in range(images) for _ in range(1 + (j * 7 + seed) % 3)]  # 1-3 captions each
    text = torch.randn(len(text_to_image), 8, generator=generator)
    image = torch.randn(images, 8, generator=generator)
    metrics = retrieval_metrics(text, image, text_to_image, chunk=chunk)
    for k in (1, 5, 10):
        t2i, i2t = _brute_force(text, image, text_to_image, k)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert metrics["mean_recall"] == pytest.approx(sum(v for key, v in metrics.items() if "@" in key) / 6)


def test_ties_are_broken_by_index():
    # Every score equal: the lower index ranks first, so only image 0 / caption 0 hit at k=1.
    text, image = torch.ones(3, 2), torch.ones(3, 2)
    metrics = retrieval_metrics(text, image, [0, 1, 2])
    assert metrics["image_retrieval_recall@1"] == pytest.approx(100 / 3)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(100 / 3)
    assert metrics["image_retrieval_recall@5"] == 100.0


def test_perfect_embeddings_give_full_recall():
    image = torch.eye(4)
    metrics = retrieval_metrics(image[[0, 0, 1, 2, 3]], image, [0, 0, 1, 2, 3])
    assert all(value == 100.0 for value in metrics.values())

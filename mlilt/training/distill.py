"""Learning a language from parallel text: the student's text side reproduces a teacher's embeddings.

For a pair (source sentence in the teacher's language, its translation), the student embeds both
and is pulled to the teacher's embedding of the source (sentence-transformers' parallel-sentences
recipe): ``mse`` is the squared distance between the unit vectors, summed over both student
embeddings; ``contrastive`` is the in-batch InfoNCE between student(target) and teacher(source);
``both`` adds the two. A run with image–caption pairs as well adds this loss, times
``distill_weight``, to the image–text InfoNCE of each step.

The teacher's embeddings are computed once (``teachers.teacher_embeddings``); student sentences are
tokenized once, with the captions, by the run's ``TextSource``.
"""
from __future__ import annotations

import random

import torch

from mlilt.data.parallel import ParallelSet, read_parallel
from mlilt.data.split import Split
from mlilt.errors import DataError, UsageError
from mlilt.evaluation.retrieval import retrieval_metrics
from mlilt.modeling.encode import length_sorted_batches
from mlilt.modeling.model import contrastive_loss
from mlilt.training.distributed import Ranks
from mlilt.training.sources import TextSource
from mlilt.training.teachers import Teacher, teacher_embeddings

DISTILL_LOSSES = ("mse", "contrastive", "both")


def load_parallel(config) -> ParallelSet:
    """The run's parallel pairs (``config.parallel``, read with its column names and --skip-bad)."""
    columns = tuple(config.parallel_columns.split(",")) if config.parallel_columns else None
    return read_parallel(list(config.parallel), skip_bad=config.skip_bad, columns=columns)


def sentences(texts: list[str]) -> Split:
    """Sentences as a split with no images: what ``TextSource`` tokenizes and embeds."""
    return Split(list(texts), [], [], [])


class DistillSource:
    """The parallel pairs of a run: held-out pairs for validation, the teacher's embeddings of
    every source sentence, and the student's loss on a batch of pairs."""

    def __init__(self, parallel: ParallelSet, teacher: Teacher, texts: TextSource, holdout: float,
                 seed: int, loss: str, use_cache: bool = True, progress=None):
        if loss not in DISTILL_LOSSES:
            raise UsageError(f"--distill-loss {loss!r}: give one of {', '.join(DISTILL_LOSSES)}")
        width = texts.encoder.proj.out_features
        if teacher.width != width:
            raise UsageError(f"--teacher {teacher.spec}: its embeddings have {teacher.width} dimensions, the "
                             f"student's {width}")
        self.loss_kind, self.texts, self.teacher = loss, texts, teacher
        self._order: tuple[int | None, list[int]] = (None, [])  # (epoch, its order of pairs)
        train, val = hold_out(len(parallel), holdout, seed)
        self.train = {"targets": sentences([parallel.targets[i] for i in train]),
                      "sources": sentences([parallel.sources[i] for i in train])}
        self.val = sentences([parallel.targets[i] for i in val])
        unique = sorted(set(parallel.sources))
        rows = teacher_embeddings(teacher, unique, use_cache=use_cache, progress=progress)
        row_of = {sentence: row for sentence, row in zip(unique, rows)}
        self.teacher_train = torch.stack([row_of[parallel.sources[i]] for i in train])
        self.teacher_val = torch.stack([row_of[parallel.sources[i]] for i in val])
        teacher.release()
        for name, split in (("distill-targets", self.train["targets"]), ("distill-sources", self.train["sources"]),
                            ("distill-val", self.val)):
            texts.tokenized(name, split)

    def __len__(self) -> int:
        return len(self.train["targets"].captions)

    def loss(self, local: list[int], ranks: Ranks, scale: torch.Tensor) -> torch.Tensor:
        """The distillation loss of the global batch whose share on this process is ``local``."""
        target = ranks.gather(self.texts.embed("distill-targets", self.train["targets"], local).float())
        teacher = ranks.gather(self.teacher_train[local].to(target.device))
        loss = target.new_zeros(())
        if self.loss_kind in ("mse", "both"):
            source = ranks.gather(self.texts.embed("distill-sources", self.train["sources"], local).float())
            loss = loss + squared_distance(target, teacher) + squared_distance(source, teacher)
        if self.loss_kind in ("contrastive", "both"):
            loss = loss + contrastive_loss(target, teacher, scale)
        return loss

    def batch_for(self, epoch: int, batch: int, size: int, seed: int) -> list[int]:
        """The parallel pairs of step ``batch`` in ``epoch`` when image–caption pairs set the
        epoch: a seeded order per epoch, cycled, the same on every rank and after a resume."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self), generator=generator).tolist())
        order = self._order[1]
        start = (batch * size) % len(order)
        return [order[(start + i) % len(order)] for i in range(min(size, len(order)))]

    @torch.no_grad()
    def validate(self, batch_size: int = 64) -> dict:
        """Held-out pairs: student(target) retrieving teacher(source) and back, and the squared distance."""
        student = torch.empty(len(self.val.captions), self.teacher_val.shape[1])
        lengths = self.texts.tokenized("distill-val", self.val).lengths()
        for batch in length_sorted_batches(self.val.captions, batch_size, lengths):
            student[batch] = self.texts.embed("distill-val", self.val, batch).float().cpu()
        recall = retrieval_metrics(student, self.teacher_val, list(range(len(student))))
        named = {key.replace("image_retrieval", "target_to_source").replace("text_retrieval", "source_to_target"): v
                 for key, v in recall.items()}
        named["distance"] = squared_distance(student, self.teacher_val).item()
        return {k: round(v, 4) for k, v in named.items()}


def squared_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared L2 distance (2 - 2 cos for unit vectors)."""
    return (student - teacher).square().sum(dim=1).mean()


def hold_out(count: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Pair indices for training and validation: ``holdout`` as a share (< 1) or a number."""
    held = int(holdout) if holdout >= 1 else round(count * holdout)
    held = max(2, held)
    if count - held < 2:
        raise DataError(f"{count} parallel pairs are too few to hold out {held} for validation; give more")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[held:]), sorted(order[:held])

"""Hooks into a training run, for measuring it without changing it.

A ``Callback`` overrides the hooks it needs; the ``Trainer`` calls every callback's hook in
the order given. Hooks observe: what they are handed is the run's own state, and a hook that
changes it changes the run.

Order within a run::

    on_model_built -> on_image_features -> on_fit_start
    -> (on_step_start -> on_step_phase("text" | "image" | "loss" | "backward" | "update")*
        -> on_step_end [-> on_checkpoint])* -> on_epoch_end [-> on_checkpoint] -> ...

A step's phases begin in this order: ``text`` (captions embedded), ``image`` (images
embedded), ``loss``, ``backward`` and ``update`` (gradients combined over the processes,
clipped, optimizer step). A step whose loss is not finite ends after ``loss``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from mlilt.methods import MethodReport
    from mlilt.modeling.model import ContrastiveModel
    from mlilt.training.checkpoint import FitState
    from mlilt.training.distill import DistillSource
    from mlilt.training.sources import ImageSource, TextSource
    from mlilt.data.split import Split


@dataclass
class StepInfo:
    """One optimizer step, as the hooks see it. ``started`` is ``time.perf_counter()`` taken
    after every ``on_step_start`` hook ran; ``seconds``, ``loss`` and ``fault`` are set before
    ``on_step_end``."""

    epoch: int  # the epoch in progress (1-based)
    step: int  # steps done before this one, over the run
    batch: list[int]  # the global batch: caption indices into ``split`` (parallel pairs when it has none)
    local: list[int]  # this process's share of ``batch``
    split: "Split"
    model: "ContrastiveModel"
    params: list["torch.Tensor"]  # the trainable parameters
    texts: "TextSource"
    images: "ImageSource"
    distill: "DistillSource | None" = None  # the parallel pairs, when the run learns from a teacher
    distill_local: list[int] | None = None  # this process's share of the step's parallel pairs
    started: float = 0.0
    seconds: float = 0.0  # wall seconds of the step
    loss: float | None = None  # None when the step was skipped
    fault: str | None = None  # what went non-finite, when something did


class Callback:
    """No-op hooks; subclasses override the ones they need."""

    def on_model_built(self, model: "ContrastiveModel", report: "MethodReport") -> None:
        """The model with its method applied and speed levers set, before it moves to the device."""

    def on_image_features(self, images: "ImageSource", seconds: float) -> None:
        """Image inputs are ready: tower features computed or read (``images.cached``), or
        nothing to do when the tower trains; ``seconds`` is the time that took."""

    def on_fit_start(self, state: "FitState") -> None:
        """The first validation ran (or a checkpoint was loaded); the first step is next."""

    def on_step_start(self, info: StepInfo) -> None:
        """Before a step touches anything."""

    def on_step_phase(self, info: StepInfo, phase: str) -> None:
        """A step enters ``phase`` (see the module docstring)."""

    def on_step_end(self, info: StepInfo) -> None:
        """After the step (optimizer step taken, or skipped with ``info.fault`` set)."""

    def on_epoch_end(self, row: dict) -> None:
        """An epoch finished and was validated; ``row`` is its history row."""

    def on_checkpoint(self, state: "FitState") -> None:
        """A checkpoint of ``state`` was written (rank 0 only)."""


HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))


class Callbacks(Callback):
    """Several callbacks as one: each hook (``HOOKS``) calls theirs in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)


def _in_order(hook: str):
    def call(self, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)
    call.__name__, call.__qualname__ = hook, f"Callbacks.{hook}"
    call.__doc__ = getattr(Callback, hook).__doc__
    return call


for _hook in HOOKS:
    setattr(Callbacks, _hook, _in_order(_hook))

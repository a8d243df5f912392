"""Training checkpoints: ``<out>.checkpoint/`` beside the pack, written atomically.

A checkpoint is everything a run needs to continue exactly where it stopped:

- ``checkpoint.safetensors``: trainable tensors (``param.*``), the best-so-far snapshot
  (``best.*``), AdamW's per-parameter state (``optim.<index>.<key>``) and the RNG states
  (``rng.order``: the generator that draws each epoch's order; ``rng.torch``: torch's global one);
- ``checkpoint.json``: the TrainConfig, the data hash, the position (epoch, batches done in it,
  optimizer steps, this epoch's permutation and losses), the history rows, the best row, the
  count of skipped non-finite batches, the optimizer's param groups and the scheduler's state.

No pickle: tensors via safetensors, the rest as JSON. The folder is replaced as a whole via
``mlilt.files.atomic.staged_dir``, so a kill mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mlilt.files import atomic
from mlilt.errors import MliltError, UsageError

FORMAT_VERSION = 1
STATE_FILE = "checkpoint.json"
TENSOR_FILE = "checkpoint.safetensors"
# Fields a resumed run may change: they do not alter what is computed.
MAY_DIFFER = frozenset({"out", "overwrite", "resume", "checkpoint_every", "skip_nonfinite", "cache_features", "data", "parallel", "teacher",
                        "grad_checkpointing", "recompute_norms",
                        "speed_paths", "device"})


class NumericalError(MliltError):
    """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""

    exit_code = 1


@dataclass
class FitState:
    """Where a run stands: the epoch in progress and what happened so far."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # batches of this epoch done
    step: int = 0  # batches done over the run (skipped ones included)
    order: list[int] | None = None  # this epoch's permutation, drawn when the epoch starts
    losses: list[float] = field(default_factory=list)  # this epoch's losses so far
    seconds: float = 0.0  # time spent in this epoch so far
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the best history row
    best_state: dict[str, torch.Tensor] | None = None
    skipped: int = 0  # non-finite batches skipped (--skip-nonfinite)


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def save_checkpoint(path: Path, state: FitState, model, optimizer, schedule, generator: torch.Generator,
                    config, data_hash: str) -> None:
    tensors = {f"param.{k}": v for k, v in _trainable(model).items()}
    tensors.update({f"best.{k}": v for k, v in (state.best_state or {}).items()})
    optim = optimizer.state_dict()
    scalars = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    tensors["rng.order"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "data_sha256": data_hash,
            "epoch": state.epoch, "batch": state.batch, "step": state.step, "order": state.order,
            "losses": state.losses, "seconds": state.seconds, "history": state.history, "best": state.best,
            "skipped": state.skipped, "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
            "scheduler": schedule.state_dict()}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic.staged_dir(path, replace=True) as stage:
        (stage / TENSOR_FILE).write_bytes(save(tensors))
        (stage / STATE_FILE).write_text(json.dumps(meta), encoding="utf-8")


def load_checkpoint(path: Path, model, optimizer, schedule, generator: torch.Generator, config,
                    data_hash: str) -> FitState:
    """Check ``path`` was written for this config and data, restore everything into place."""
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(path / TENSOR_FILE))
    except (OSError, ValueError, SafetensorError) as error:
        raise UsageError(f"{path} is not a readable checkpoint ({error}); delete it or run without --resume") from error
    _check_matches(path, meta, config, data_hash)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in _group(tensors, "param.").items():
            params[name].copy_(value)
    optim_state: dict[int, dict] = {}
    for key, value in _group(tensors, "optim.").items():
        index, name = key.split(".", 1)
        optim_state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        optim_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": meta["optimizer"]["param_groups"]})
    schedule.load_state_dict(meta["scheduler"])
    generator.set_state(tensors["rng.order"])
    torch.set_rng_state(tensors["rng.torch"])
    best_state = _group(tensors, "best.") or None
    return FitState(epoch=meta["epoch"], batch=meta["batch"], step=meta["step"], order=meta["order"],
                    losses=meta["losses"], seconds=meta["seconds"], history=meta["history"], best=meta["best"],
                    best_state=best_state, skipped=meta["skipped"])


def find_checkpoint(out: str | Path) -> Path | None:
    """``<out>.checkpoint/``, or the previous one when a kill fell between staged_dir's two renames."""
    path = checkpoint_dir(out)
    if not path.is_dir():
        moved = sorted(path.parent.glob(f".{path.name}.*.old/{path.name}"), key=lambda p: p.stat().st_mtime)
        if not moved:
            return None
        os.replace(moved[-1], path)
    return path


def remove_checkpoint(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _check_matches(path: Path, meta: dict, config, data_hash: str) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path}: checkpoint format {meta.get('format_version')!r} is not {FORMAT_VERSION}; "
                         f"run without --resume to start over")
    saved, current = meta["config"], config.to_dict()
    differ = sorted(k for k in set(saved) | set(current) if k not in MAY_DIFFER and saved.get(k) != current.get(k))
    if meta["data_sha256"] != data_hash:
        differ.insert(0, "data (content hash)")
    if differ:
        details = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" if k in current else k for k in differ)
        raise UsageError(f"{path} was written by a run with other settings: {details}; "
                         f"use the same settings, or run without --resume to start over")


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

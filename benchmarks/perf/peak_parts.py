"""What a training run's resident memory is made of, stage by stage.

    python benchmarks/perf/peak_parts.py [--method ln] [--anchor PACK] [--pairs 200] [--live]

One process, one torch thread, the offline towers, demo pairs, batch 32, one epoch of
``mlilt.training.train`` as ``mlilt train`` runs it. Prints the resident set (anonymous and
file-backed: weights memory-mapped from their file are file-backed) after the imports, after
each tower is loaded, once the model is built (fingerprints, trained copies) and at the start
of the first step; then, per step, the bytes autograd keeps for the backward pass of each side
(saved-tensor hooks; parameters and views of them excluded) and the peak.

``--live`` fixes glibc's mmap threshold at 128 KiB, so that freed blocks go back to the kernel
at once and the resident set follows live memory: the difference to a run without it is the
allocator's fragmentation. It makes steps slower; read its times as nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (demo_data, machine, one_epoch_config, peak_rss_mb, reset_peak_rss, scratch_dir,  # noqa: E402
                     status_mb, table)

from mlilt.training.callbacks import Callback  # noqa: E402


def resident() -> list[str]:
    return [f"{status_mb('VmRSS'):,.0f}", f"{status_mb('RssAnon'):,.0f}", f"{status_mb('RssFile'):,.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ln")
    parser.add_argument("--anchor", default="", help="a pack to train against (image side frozen)")
    parser.add_argument("--pairs", type=int, default=200, help="demo scenes generated (80%% train)")
    parser.add_argument("--live", action="store_true", help="resident set = live memory (slow; see above)")
    args = parser.parse_args()
    if args.live:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (glibc's malloc.h)
    stages = [["python and imports"] + resident()]
    import torch
    torch.set_num_threads(1)
    from mlilt.training import train
    from mlilt.towers.registry import load_image_tower, load_text_tower

    work = scratch_dir("mlilt-peak-")
    pairs = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    config = one_epoch_config(pairs, work, args.method, args.anchor)
    stages.append(["+ torch, mlilt"] + resident())
    load_text_tower(config.text_tower, pooling=config.pooling, max_length=config.max_length,
                    prefix=config.text_prefix)
    stages.append(["+ text tower (tokenizer; weights memory-mapped, unread)"] + resident())
    load_image_tower(config.image_tower)  # train() reuses both
    stages.append(["+ image tower"] + resident())
    watch = Watch(stages)
    reset_peak_rss()
    train(config, callbacks=[watch])
    steps = watch.steps
    print(f"machine: {machine()}; {args.method}{' anchored' if args.anchor else ''}; batch 32; "
          f"{'--live: glibc mmap threshold 128 KiB' if args.live else 'glibc defaults'}\n")
    print(table(["stage", "resident MB", "anonymous MB", "file-backed MB"], stages), "\n")
    print(table(["step", "text side keeps MB", "image side keeps MB", "resident at its start MB"], steps))
    print(f"\npeak resident: {peak_rss_mb():,.0f} MB")


class Watch(Callback):
    """Records the resident set once the model is built, and per step the bytes autograd keeps
    for each side's backward pass (a saved-tensor hook over the whole step)."""

    def __init__(self, stages: list[list[str]]):
        self.stages, self.steps = stages, []

    def on_model_built(self, model, report):
        self.stages.append(["+ model built (fingerprints, trained copies)"] + resident())

    def on_step_start(self, info):
        import torch

        frozen = {p.untyped_storage().data_ptr() for p in info.model.parameters()}
        self.kept = {"side": "text", "text": {}, "image": {}}

        def pack(tensor):
            if tensor.numel() > 1 and tensor.untyped_storage().data_ptr() not in frozen:
                self.kept[self.kept["side"]][tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        self.start = f"{status_mb('VmRSS'):,.0f}"
        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self.hooks.__enter__()

    def on_step_phase(self, info, phase):
        if phase == "image":  # the captions are embedded first, then the images
            self.kept["side"] = "image"

    def on_step_end(self, info):
        self.hooks.__exit__(None, None, None)
        self.steps.append([str(len(self.steps) + 1), f"{sum(self.kept['text'].values()) / 2**20:,.0f}",
                           f"{sum(self.kept['image'].values()) / 2**20:,.0f}", self.start])


if __name__ == "__main__":
    main()

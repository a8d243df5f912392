"""What a training run's resident memory is made of, stage by stage.

    python benchmarks/perf/peak_parts.py [--method ln] [--anchor PACK] [--pairs 200] [--live]

One process, one torch thread, the offline towers, demo pairs, batch 32, one epoch of
``mlilt.training.trainer.train`` as ``mlilt train`` runs it. Prints the resident set (anonymous and
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
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (demo_data, machine, one_epoch_config, peak_rss_mb, reset_peak_rss, scratch_dir,  # noqa: E402
                     status_mb, table)


def resident() -> list[str]:
    return [f"{status_mb('VmRSS'):,.0f}", f"{status_mb('RssAnon'):,.0f}", f"{status_mb('RssFile'):,.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ln")
    parser.add_argument("--anchor", default="", help="a pack to train against (image side frozen)")
    parser.add_argument("--pairs", type=int, default=200, help="demo scenes generated (80%% train)")
    parser.add_argument("--live", action="store_true", help="resident set = live memory (slow; see above)")
    args = parser.parse_args()
    from mlilt.speed.allocator import OPT_OUT, fix_mmap_threshold, tune_allocator
    if args.live:
        os.environ[OPT_OUT] = "huge-pages"  # train() then leaves the threshold set here alone
        fix_mmap_threshold(128 * 1024)
    tune_allocator()  # as the mlilt command does
    stages = [["python and imports"] + resident()]
    import torch
    torch.set_num_threads(1)
    import mlilt.training.trainer as training
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
    steps = watch(training, stages)
    reset_peak_rss()
    training.train(config)
    print(f"machine: {machine()}; {args.method}{' anchored' if args.anchor else ''}; batch 32; "
          f"{'--live: glibc mmap threshold 128 KiB' if args.live else 'allocator as mlilt sets it'}\n")
    print(table(["stage", "resident MB", "anonymous MB", "file-backed MB"], stages), "\n")
    print(table(["step", "text side keeps MB", "image side keeps MB", "resident at its start MB"], steps))
    print(f"\npeak resident: {peak_rss_mb():,.0f} MB")


def watch(training, stages: list[list[str]]) -> list[list[str]]:
    """Wrap train()'s model building and steps to record what each holds."""
    import torch

    steps: list[list[str]] = []
    build, step = training._build_model, training._step

    def built(*args, **kwargs):
        result = build(*args, **kwargs)
        stages.append(["+ model built (fingerprints, trained copies)"] + resident())
        return result

    def kept_step(model, split, sources, batch, params, *rest, **kwargs):
        frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {"side": "text", "text": {}, "image": {}}

        def pack(tensor):
            if tensor.numel() > 1 and tensor.untyped_storage().data_ptr() not in frozen:
                kept[kept["side"]][tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        texts, images = sources
        embed_text = texts.embed

        def text_then_image(*a, **k):
            out = embed_text(*a, **k)
            kept["side"] = "image"  # _step embeds the captions, then the images
            return out

        texts.embed = text_then_image
        start = f"{status_mb('VmRSS'):,.0f}"
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = step(model, split, sources, batch, params, *rest, **kwargs)
        finally:
            texts.embed = embed_text
        steps.append([str(len(steps) + 1), f"{sum(kept['text'].values()) / 2**20:,.0f}",
                      f"{sum(kept['image'].values()) / 2**20:,.0f}", start])
        return out

    training._build_model, training._step = built, kept_step
    return steps


if __name__ == "__main__":
    main()

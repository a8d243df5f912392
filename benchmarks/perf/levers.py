"""The single levers behind the training-step figures, each measured on its own.

    python benchmarks/perf/levers.py [--repeats 3] [--batch-size 32] [--parts image,kept,text]

On the offline towers, one process, one torch thread, CPU seconds (median of ``--repeats``):

* image: effnet-lite0 with ``ln`` over a batch of images, contiguous vs channels-last layout
  (forward with autograd, its backward, forward without autograd);
* kept: what autograd keeps for that backward pass, by kind, plain / with frozen convolutions
  keeping no inputs / with ``--recompute-norms`` or lean BatchNorm-ReLU6 as well, what each
  costs in time (the variants timed in turn, round after round) and how far its gradients are
  from the plain ones (relative difference);
* text: the text tower with ``ln+adapter`` over random batches of demo captions (as training
  draws them), forward and backward, in fp32 and under bf16 autocast (math attention kernel, as
  ``--bf16`` trains): padded in length groups (the model's own forward) against padding-free
  (``speed/packed.py``) in length groups (as training runs it) and in one call per batch, and
  (one profiled run each) the share of that time spent in matrix products and their GFLOP/s.
"""
from __future__ import annotations

import argparse
import collections
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_data, machine, scratch_dir, table  # noqa: E402


def cpu_seconds(run, repeats: int) -> float:
    """Median CPU seconds of ``run()`` after one warm-up call."""
    return cpu_seconds_in_turn([lambda _: run()], range(repeats))[0]


def cpu_seconds_in_turn(runs: list, rounds) -> list[float]:
    """Median CPU seconds of each of ``runs``, all called with each item of ``rounds`` in turn
    (after one warm-up round with the first), so that a slow minute or the heap's state falls
    on all of them alike."""
    rounds = list(rounds)
    for run in runs:
        run(rounds[0])
    times: list[list[float]] = [[] for _ in runs]
    for item in rounds:
        for run, column in zip(runs, times):
            started = time.process_time()
            run(item)
            column.append(time.process_time() - started)
    return [statistics.median(column) for column in times]


def image_side(layout):
    import torch
    from mlilt.modeling.factory import build_sides
    from mlilt.towers.registry import load_image_tower

    tower = load_image_tower("effnet-lite0")
    side = build_sides({"image": tower}, "ln", 256, seed=0)[0]["image"]
    if layout == "contiguous":
        side.tower.channels_last = False
        side.tower.model.to(memory_format=torch.contiguous_format)
    return side


def image_rows(args) -> list[list[str]]:
    import torch
    pixels = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    for layout in ("contiguous", "channels_last"):
        side = image_side(layout)
        forward = cpu_seconds(lambda: side(pixels), args.repeats)
        both = cpu_seconds(lambda: side(pixels).square().sum().backward(), args.repeats)
        with torch.no_grad():
            no_grad = cpu_seconds(lambda: side(pixels), args.repeats)
        rows.append([layout, f"{forward:.2f}", f"{both - forward:.2f}", f"{no_grad:.2f}"])
    return rows


def kept_by_kind(side, pixels) -> dict[str, float]:
    """MB of distinct tensors autograd keeps, by the backward node that keeps them."""
    import torch
    out = side(pixels)
    kept: dict[str, float] = collections.Counter()
    seen, stack, visited = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            value = getattr(node, attr) if attr.startswith("_saved_") else None
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.numel() > 1:
                if (value.data_ptr(), value.numel()) not in seen:
                    seen.add((value.data_ptr(), value.numel()))
                    kept[type(node).__name__.replace("Backward0", "")] += value.numel() * value.element_size() / 2**20
        stack += [child for child, _ in node.next_functions]
    return kept


def kept_rows(args) -> list[list[str]]:
    """MB of distinct tensors autograd keeps (saved-tensor hooks see every one, checkpointed or
    not); for the plain run also by the backward node that keeps them."""
    import torch
    from mlilt.speed.lean_backward import lean_convolutions, lean_norm_clamps, recompute_norm_activations

    pixels = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    base = image_side("channels_last")
    rows, reference, runs = [], None, []
    for name, levers in (("plain", ()), ("frozen convolutions keep no inputs", (lean_convolutions,)),
                         ("+ --recompute-norms", (lean_convolutions, recompute_norm_activations)),
                         ("+ BatchNorm-ReLU6 keeps its input only",
                          (lean_convolutions, functools.partial(lean_norm_clamps, conv_inputs=False))),
                         ("+ after a frozen expansion, its smaller input, redone in the backward pass (mlilt's default)",
                          (lean_convolutions, lean_norm_clamps))):
        side = copy.deepcopy(base)
        for lever in levers:
            lever(side.tower)
        hooked = {}

        def pack(tensor):
            if not isinstance(tensor, torch.nn.Parameter) and tensor.numel() > 1:
                hooked[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size() / 2**20
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            side(pixels)
        by_kind = kept_by_kind(side, pixels) if not levers else {}
        runs.append(functools.partial(lambda side, _: side(pixels).square().sum().backward(), side))
        grads = gradients(side, pixels)
        reference = reference or grads
        rows.append([name, f"{sum(hooked.values()):,.0f}"] +
                    [f"{by_kind[kind]:,.0f}" if kind in by_kind else "" for kind in KINDS] +
                    gradient_difference(grads, reference))
    for row, seconds in zip(rows, cpu_seconds_in_turn(runs, range(args.repeats))):  # timed in turn: one after the other was noise
        row.insert(len(row) - 2, f"{seconds:.2f}")
    return rows


def gradients(side, pixels) -> dict:
    """The trained parameters' gradients for one fixed loss over the batch."""
    import torch
    side.zero_grad(set_to_none=True)
    out = side(pixels)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return {name: p.grad.clone() for name, p in side.named_parameters() if p.grad is not None}


def gradient_difference(grads: dict, reference: dict) -> list[str]:
    """Median and largest relative difference (norm of the difference over the reference's
    norm) over the parameters."""
    differences = [float((grads[name] - ref).norm() / ref.norm()) for name, ref in reference.items()]
    return [f"{statistics.median(differences):.1e}", f"{max(differences):.1e}"]


KINDS = ("Convolution", "NativeBatchNorm", "Hardtanh")


def text_rows(args) -> list[list[str]]:
    import json
    import random
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mlilt.modeling.factory import build_sides
    from mlilt.modeling.encode import TokenizedTexts, run_in_length_groups
    from mlilt.towers.registry import load_text_tower

    work = scratch_dir("mlilt-levers-")
    pairs = demo_data(work / "demo", ["sw"], max(400, args.batch_size * 4)) / "sw" / "train.jsonl"
    captions = [json.loads(line)["caption"] for line in pairs.read_text().splitlines()]
    side = build_sides({"text": load_text_tower("me5-small")}, "ln+adapter", 256, seed=0)[0]["text"]
    tokens = TokenizedTexts(side.tower, captions)
    batches = [random.Random(i).sample(range(len(captions)), args.batch_size) for i in range(args.repeats)]

    def step(batch, layout):
        padding_free, grouped = layout
        side.tower.padding_free = padding_free

        def run(group):
            return side(*tokens.batch([batch[i] for i in group]))
        features = run_in_length_groups(tokens.lengths(batch), run) if grouped else run(list(range(len(batch))))
        features.float().square().sum().backward()

    real = statistics.mean(sum(tokens.lengths(batch)) for batch in batches)
    rows = []
    for name, bf16 in (("fp32", False), ("bf16 autocast, math attention", True)):
        def run(layout, batch=batches[0]):
            kernel = SDPBackend.MATH if bf16 else SDPBackend.FLASH_ATTENTION
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(kernel):
                step(batch, layout)
        layouts = {(False, True): "padded, length groups", (True, True): "padding-free, length groups",
                   (True, False): "padding-free, one call"}
        # The layouts alternate batch by batch; the warm-up runs the padding-free self-check.
        seconds = cpu_seconds_in_turn([functools.partial(run, layout) for layout in layouts], batches)
        for (layout, label), median_s in zip(layouts.items(), seconds):
            share, rate = matrix_products(functools.partial(run, layout))
            rows.append([f"{name}, {label}", f"{median_s:.3f}", f"{share:.0%}", f"{rate:.0f}"])
    print(f"text batches: {args.batch_size} captions, {real:.0f} real tokens on average", flush=True)
    return rows


MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def matrix_products(run) -> tuple[float, float]:
    """One profiled ``run()``: the share of its CPU time spent in matrix products, and their
    GFLOP/s (the profiler's own count of their floating-point operations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiled:
        run()
    events = profiled.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    products = [event for event in events if event.key in MATRIX_PRODUCTS]
    seconds = sum(event.self_cpu_time_total for event in products) / 1e6
    return seconds * 1e6 / max(total, 1), sum(event.flops for event in products) / 1e9 / max(seconds, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--parts", default="image,kept,text", help="which tables: image, kept, text")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    import torch
    torch.set_num_threads(1)
    print(f"machine: {machine()}; 1 torch thread; batch {args.batch_size}; CPU s, median of {args.repeats}\n")
    if "image" in parts:
        print(table(["image tower layout", "forward with autograd", "its backward", "forward without autograd"],
                    image_rows(args)), "\n", flush=True)
    if "kept" in parts:
        print(table(["what the image side keeps for its backward pass (MB)", "total"] +
                    [f"kept by {kind}" for kind in KINDS] +
                    ["forward + backward CPU s", "gradients vs plain: median difference", "largest"],
                    kept_rows(args)), "\n", flush=True)
    if "text" in parts:
        print(table(["text tower ln+adapter, one batch", "forward + backward CPU s", "in matrix products (profiled)",
                     "their GFLOP/s"], text_rows(args)))


if __name__ == "__main__":
    main()

"""Evaluation over all 36 XM3600 languages: mlilt vs the CLIP_benchmark way, same model.

    python benchmarks/perf/eval_languages.py [--images 600] [--pack langpacks/sw]

A synthetic tree in XM3600's real layout (``<root>/xm3600/captions.jsonl``
and ``<root>/xm3600/images/<16 hex>.jpg``; demo scenes as JPEGs, two demo-style captions per
image in every one of the 36 languages, drawn from the demo lexicons in turn) is evaluated
with one pack on every language, two ways, each in its own process with a cold feature cache:

* mlilt: ``mlilt.evaluation.evaluate.evaluate("xm3600", [pack], root, langs=["all"])`` (what
  ``mlilt eval --benchmark xm3600 --root R --pack P --langs all`` runs): the image tower runs
  once over the union of the galleries; captions are encoded in length-sorted batches padded
  to the longest caption of each batch.
* CLIP_benchmark-style: for each language separately, load the benchmark, run the image tower
  over every image of that language's gallery, encode the captions in their file order padded
  to a fixed length (``--pad-to``, default the tower's maximum), then compute recall.

Same pack, same towers, same batch sizes (images 32, captions 64), same recall function; only
the per-language image pass, the fixed padding and the caption order differ. The two sides'
recalls are compared, so a fast path that computed something else would show.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, machine, run_child, scratch_dir, table  # noqa: E402

IMAGE_BATCH = 32
TEXT_BATCH = 64


# --------------------------------------------------------------------------- the synthetic tree


def write_xm3600(root: Path, n_images: int, seed: int = 0) -> Path:
    """A synthetic XM3600 tree with ``n_images`` images and 2 captions per image per language."""
    from mlilt.demo.data import caption_scene, demo_languages, draw_scene, make_scenes
    from mlilt.datasets import XM3600_LANGUAGES

    folder = root / "xm3600"
    if (folder / "captions.jsonl").is_file():
        return root
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lexicons = demo_languages()
    rng = random.Random(seed)
    lines = []
    for scene in make_scenes(n_images, seed, 224):
        key = f"{rng.getrandbits(64):016x}"
        draw_scene(scene, 224).save(folder / "images" / f"{key}.jpg", quality=90)
        row = {"image/key": key, "image/locale": "en"}
        for index, lang in enumerate(XM3600_LANGUAGES):
            lex = lexicons[index % len(lexicons)]
            # Seeds per language: another frame and shape order, so languages sharing a lexicon
            # still differ (real languages share no captions).
            captions = [caption_scene(scene, lex, seed=seed + 2 * index + k) for k in (0, 1)]
            row[lang] = {"caption": captions, "caption/tokenized": captions,
                         "caption/tokenized/lowercase": [c.lower() for c in captions]}
        lines.append(json.dumps(row, ensure_ascii=False))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- the two sides


def run_mlilt(args) -> dict:
    """Child: mlilt's own evaluation of one pack on every language."""
    from mlilt.evaluation.evaluate import evaluate

    image_calls, text_calls = _load_towers(args.pack)
    started, cpu = time.perf_counter(), time.process_time()
    results = evaluate("xm3600", [args.pack], root=args.root, langs=["all"])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"side": "mlilt", "seconds": seconds, "cpu_s": cpu, "image_tower_calls": image_calls.count,
            "text_tower_calls": text_calls.count,
            "metrics": {r.language: r.metrics for r in results}}


def run_clip_benchmark_style(args) -> dict:
    """Child: each language on its own, as CLIP_benchmark evaluates a model."""
    import torch

    from mlilt.modeling.factory import image_side_of
    from mlilt.speed import text_side_of
    from mlilt.datasets import XM3600_LANGUAGES, load_benchmark
    from mlilt.evaluation.retrieval import retrieval_metrics
    from mlilt.packs import read_pack

    image_calls, text_calls = _load_towers(args.pack)
    pack = read_pack(args.pack)
    image, text = image_side_of(pack), text_side_of(pack)
    pad_to = max(args.pad_to, text.tower.max_length)
    started, cpu = time.perf_counter(), time.process_time()
    metrics = {}
    for lang in XM3600_LANGUAGES:
        item = load_benchmark("xm3600", args.root, [lang])[lang]
        with torch.no_grad():
            image_emb = torch.cat([image(_pixels(image.tower, item.images[i:i + IMAGE_BATCH]))
                                   for i in range(0, len(item.images), IMAGE_BATCH)])
            text_emb = torch.cat([_fixed_length(text, item.captions[i:i + TEXT_BATCH], pad_to)
                                  for i in range(0, len(item.captions), TEXT_BATCH)])
        metrics[lang] = {k: round(v, 4) for k, v in
                         retrieval_metrics(text_emb.float(), image_emb.float(), item.caption_image).items()}
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"side": "clip_benchmark", "seconds": seconds, "cpu_s": cpu, "image_tower_calls": image_calls.count,
            "text_tower_calls": text_calls.count, "pad_to": pad_to, "metrics": metrics}


def _load_towers(pack_path: str):
    """Load the pack's towers before the clock starts (both sides); their forward-call counters."""
    from mlilt.modeling.factory import image_side_of
    from mlilt.speed import text_side_of
    from mlilt.packs import read_pack

    pack = read_pack(pack_path)
    return ForwardCalls(image_side_of(pack).tower), ForwardCalls(text_side_of(pack).tower)


class ForwardCalls:
    """Forward passes of a loaded tower and of every copy made of it from now on (a forward hook
    on the loaded tower, which copies carry); holds the tower, so the registry keeps it loaded."""

    def __init__(self, tower):
        self.tower = tower.shared_from.tower if tower.shared_from is not None else tower
        self.count = 0

        def seen(*_):
            self.count += 1
        self.tower.register_forward_hook(seen)


def _pixels(tower, images):
    import torch

    from mlilt.data.images import load_image

    return torch.stack([tower.preprocess(load_image(img)) for img in images])


def _fixed_length(text, captions: list[str], pad_to: int):
    """Captions cut at the tower's maximum as mlilt cuts them, then padded to ``pad_to`` tokens
    whatever their length (CLIP_benchmark's tokenizers pad to the context length, 77)."""
    tower = text.tower
    tokens = tower.tokenize(captions, pad=False)
    tokens = tower.tokenizer.pad(tokens, padding="max_length", max_length=max(pad_to, tower.max_length),
                                 return_tensors="pt")
    return text(tokens["input_ids"], tokens["attention_mask"])


# --------------------------------------------------------------------------- driver


def compare(mlilt: dict, baseline: dict) -> float:
    """Largest difference between the two sides' recalls over every language and metric."""
    return max(abs(mlilt["metrics"][lang][k] - v) for lang, ms in baseline["metrics"].items() for k, v in ms.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24,
                        help="images in the synthetic tree (XM3600: 3600; both sides grow linearly with it)")
    parser.add_argument("--pack", default=str(REPO / "langpacks" / "sw"))
    parser.add_argument("--pad-to", type=int, default=77,
                        help="baseline caption length (CLIP_benchmark: 77); at least the tower's maximum")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--child", choices=["mlilt", "clip_benchmark"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit((run_mlilt if args.child == "mlilt" else run_clip_benchmark_style)(args))
        return
    work = scratch_dir("mlilt-perf-", args.work)
    started = time.perf_counter()
    root = write_xm3600(work / f"xm3600-{args.images}", args.images)
    print(f"synthetic XM3600 tree with {args.images} images: {time.perf_counter() - started:.0f} s", flush=True)
    results = {}
    for side in ("mlilt", "clip_benchmark"):
        child = ["--child", side, "--root", str(root), "--pack", args.pack, "--pad-to", str(args.pad_to)]
        env = {"MLILT_CACHE": tempfile.mkdtemp(dir=work, prefix="cold_cache_"), "OMP_NUM_THREADS": str(args.threads)}
        results[side] = run_child(__file__, child, env=env)
        print(f"{side}: {results[side]['seconds']:.1f} s ({results[side]['cpu_s']:.1f} s CPU), image tower calls {results[side]['image_tower_calls']}, "
              f"text tower calls {results[side]['text_tower_calls']}", flush=True)
    ours, theirs = results["mlilt"], results["clip_benchmark"]
    print(f"\nmachine: {machine()}, {args.threads} torch thread(s) per side")
    print(f"36 languages x {args.images} images (first caption per image), pack {args.pack}; "
          f"baseline pads captions to {theirs['pad_to']} tokens; largest recall difference between the sides: "
          f"{compare(ours, theirs):.4f} points\n")
    print(table(["side", "wall s (all 36 languages)", "CPU s", "image tower calls", "text tower calls",
                 "speed-up (wall)", "speed-up (CPU)"],
                [["CLIP_benchmark-style, per language", f"{theirs['seconds']:.1f}", f"{theirs['cpu_s']:.1f}",
                  theirs["image_tower_calls"], theirs["text_tower_calls"], "1.00×", "1.00×"],
                 ["mlilt evaluate (--langs all)", f"{ours['seconds']:.1f}", f"{ours['cpu_s']:.1f}",
                  ours["image_tower_calls"], ours["text_tower_calls"],
                  f"**{theirs['seconds'] / ours['seconds']:.2f}×**", f"**{theirs['cpu_s'] / ours['cpu_s']:.2f}×**"]]))


if __name__ == "__main__":
    main()

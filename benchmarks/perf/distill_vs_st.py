"""Distillation from parallel text, mlilt against sentence-transformers' own MSELoss training.

    python benchmarks/perf/distill_vs_st.py [--pairs 2000] [--heldout 400] [--epochs 2] [--batch-size 32]
        [--methods ln+adapter,ln+adapter+top:4] [--st-lr 2e-5] [--st-head-lr 1e-3] [--threads 1] [--repeat 1]

The task of ``mlilt train --lang sw --teacher langpacks/en --parallel en_sw.tsv``: a Swahili
student reproduces the English pack's text embeddings from English-Swahili demo captions
(``make_scenes`` / ``caption_scene``, unique pairs). Both students are the same text tower, the
offline ``me5-small`` (mean pooling, 64 tokens, me5's ``query: `` prefix), projected 384 -> 256 by
a new bias-free linear layer, the teacher's width. Both learn the parallel-sentences recipe:
student(source) and student(target) are both regressed to teacher(source), with the same
teacher embeddings (computed once with mlilt's ``teacher_embeddings`` before anything is timed:
mlilt reads them from its feature cache, sentence-transformers from a ``label`` column), the same
training pairs, batch size, epochs and seed.

* mlilt: ``mlilt.training.train`` with ``--distill-loss mse`` and each of ``--methods`` (default
  ``ln+adapter``: text LayerNorms, adapters and the projection train; the image side is the
  teacher's) and its defaults otherwise (AdamW lr 1e-3, cosine, 5% warm-up);
* sentence-transformers: ``SentenceTransformer([Transformer(me5-small folder), Pooling(mean),
  Dense(384, 256, bias=False, identity)])`` trained by ``SentenceTransformerTrainer`` with
  ``losses.MSELoss`` on a ``datasets.Dataset`` of (english, non_english, label) -- the whole
  tower fine-tunes, as its recipe does -- at ``--st-lr`` and the new projection at ``--st-head-lr``
  (its ``learning_rate_mapping``; at the tower's rate the projection barely moves in a few hundred
  steps), linear decay, 5% warm-up, on CPU.

Each run is its own process, one after the other, the sides in alternating order per repeat.
Speed: samples (pairs) per second of training, a step timed batch to batch (data, both forward
passes, backward, optimizer), the median step after ``--warmup`` steps of each epoch; and the
whole training phase (every step of every epoch; mlilt's per-epoch validation is left out, the
sentence-transformers run has none). Quality, the same for both, on ``--heldout`` pairs
trained on by neither: the final student's L2-normalised embeddings of the Swahili sentences
against the teacher's of their English sources -- squared distance (2 - 2 cos, mlilt's
``distance``) and target->source recall@1 and @5 among the held-out sources.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, machine, median, run_child, scratch_dir, steady, table, turn_order  # noqa: E402
from vs_open_clip import step_times  # noqa: E402

PREFIX = "query: "  # me5's query prefix: mlilt's default for the me5-small tower, given to ST by hand
ST_LABEL = "sentence-transformers MSELoss, full fine-tuning"


# --------------------------------------------------------------------------- data and teacher


def write_pairs(work: Path, count: int, heldout: int, seed: int) -> dict:
    """``count + heldout`` unique English<TAB>Swahili demo caption pairs in one TSV (what mlilt
    reads), the held-out ones chosen by mlilt's own split (``holdout=heldout``), so both sides
    train on the same pairs and are judged on the same others."""
    from mlilt.demo.data import caption_scene, make_scenes
    from mlilt.training.distill import hold_out

    pairs, sources, targets = [], set(), set()
    scenes = make_scenes(2 * (count + heldout), seed=seed, image_size=32)
    for scene in scenes:
        source, target = caption_scene(scene, "en", seed), caption_scene(scene, "sw", seed)
        if source not in sources and target not in targets:  # unique both ways: recall has one answer
            pairs.append((source, target))
            sources.add(source)
            targets.add(target)
        if len(pairs) == count + heldout:
            break
    tsv = work / "en_sw.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    train, val = hold_out(len(pairs), heldout, seed=0)  # mlilt's split with TrainConfig(seed=0)
    split = {"tsv": str(tsv), "pairs": pairs, "train": train, "val": val}
    (work / "split.json").write_text(json.dumps(split))
    return split


def teacher_rows(work: Path, teacher: str, split: dict) -> float:
    """The teacher's embedding of every pair's source, into mlilt's feature cache (where the
    mlilt runs find them) and ``teacher.pt`` (the sentence-transformers labels); seconds taken."""
    import torch

    from mlilt.training.teachers import load_teacher, teacher_embeddings

    started = time.perf_counter()
    sources = [source for source, _ in split["pairs"]]
    rows = teacher_embeddings(load_teacher(teacher), sources)
    torch.save(rows, work / "teacher.pt")
    return time.perf_counter() - started


def quality(student, teacher) -> dict:
    """Held-out squared distance and target->source recall of unit-normalised student rows."""
    import torch

    student = torch.nn.functional.normalize(student.float(), dim=1)
    ranks = (student @ teacher.T).argsort(dim=1, descending=True)
    hits = ranks == torch.arange(len(student))[:, None]
    return {"distance": (student - teacher).square().sum(dim=1).mean().item(),
            "r1": 100 * hits[:, :1].any(dim=1).float().mean().item(),
            "r5": 100 * hits[:, :5].any(dim=1).float().mean().item()}


# --------------------------------------------------------------------------- mlilt side


def run_mlilt(args) -> dict:
    """Child: mlilt.training.train on the parallel TSV; every step timed, the final student judged."""
    import torch

    from mlilt.modeling.encode import encode_texts
    from mlilt.training import Callback, TrainConfig, train

    split = json.loads((Path(args.work) / "split.json").read_text())
    teacher = torch.load(Path(args.work) / "teacher.pt")[split["val"]]
    held = [split["pairs"][i][1] for i in split["val"]]

    class Clock(Callback):
        """Each step's span, each epoch's training seconds; the last epoch's student judged
        before keep-best restores an earlier one."""

        def __init__(self):
            self.spans, self.epoch_s, self.batches, self.result = [], [], [], None

        def on_model_built(self, model, report):
            self.model = model

        def on_step_end(self, info):
            self.spans.append((info.started, info.started + info.seconds))
            self.batches.append(len(info.batch))

        def on_epoch_end(self, row):
            self.epoch_s.append(row["seconds"])
            if row["epoch"] == args.epochs:
                with torch.no_grad():
                    self.result = quality(encode_texts(self.model.text, held, 64), teacher)

    clock = Clock()
    out = Path(tempfile.mkdtemp(dir=args.work, prefix="mlilt_pack_")) / "pack"
    config = TrainConfig(lang="sw", data=None, parallel=(split["tsv"],), teacher=args.teacher, distill_loss="mse",
                         out=str(out), method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                         holdout=len(split["val"]), seed=0, checkpoint_every=0)
    started = time.perf_counter()
    train(config, callbacks=[clock])
    seconds = time.perf_counter() - started
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"side": "mlilt", "step_s": step_times(clock.spans), "samples": sum(clock.batches),
            "train_s": sum(clock.epoch_s), "seconds": seconds, "epochs": args.epochs, "quality": clock.result}


# --------------------------------------------------------------------------- sentence-transformers side


def st_student(dim: int):
    """The same student as a sentence-transformers user builds it from the me5-small folder."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    from mlilt.towers.offline import me5_small_dir

    transformer = models.Transformer(str(me5_small_dir()), max_seq_length=64)
    width = transformer.get_embedding_dimension()
    pooling = models.Pooling(width, pooling_mode="mean")
    dense = models.Dense(width, dim, bias=False, activation_function=torch.nn.Identity())
    return SentenceTransformer(modules=[transformer, pooling, dense], device="cpu")


def run_st(args) -> dict:
    """Child: SentenceTransformerTrainer with MSELoss; every step timed, the final student judged."""
    import torch
    import transformers
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    work = Path(args.work)
    split = json.loads((work / "split.json").read_text())
    rows = torch.load(work / "teacher.pt")
    transformers.set_seed(0)
    model = st_student(rows.shape[1])
    pairs = [split["pairs"][i] for i in split["train"]]
    data = Dataset.from_dict({"english": [PREFIX + s for s, _ in pairs], "non_english": [PREFIX + t for _, t in pairs],
                              "label": rows[split["train"]].tolist()})
    out = Path(tempfile.mkdtemp(dir=work, prefix="st_out_"))
    settings = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.st_lr, learning_rate_mapping={r"\.2\.linear\.weight$": args.st_head_lr},
        warmup_steps=0.05, max_grad_norm=1.0, seed=0, use_cpu=True,
        dataloader_num_workers=0, save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True)

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.begins, self.spans = [], []

        def on_train_begin(self, *a, **k):
            self.train_started = time.perf_counter()

        def on_step_begin(self, *a, **k):
            self.begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.spans.append((self.begins[-1], time.perf_counter()))

        def on_train_end(self, *a, **k):
            self.train_s = time.perf_counter() - self.train_started

    clock = Clock()
    trainer = SentenceTransformerTrainer(model=model, args=settings, train_dataset=data,
                                         loss=losses.MSELoss(model), callbacks=[clock])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    rates = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups})
    if rates != sorted({args.st_lr, args.st_head_lr}):
        raise RuntimeError(f"sentence-transformers trained at {rates}, not --st-lr and --st-head-lr")
    model.eval()
    held = [PREFIX + split["pairs"][i][1] for i in split["val"]]
    with torch.no_grad():
        student = model.encode(held, batch_size=64, convert_to_tensor=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"side": "st", "step_s": step_times(clock.spans), "samples": len(pairs) * args.epochs,
            "train_s": clock.train_s, "seconds": seconds, "epochs": args.epochs,
            "quality": quality(student.cpu(), rows[split["val"]])}


# --------------------------------------------------------------------------- driver


def measure(work: Path, args) -> dict[str, list[dict]]:
    """Every side ``--repeat`` times, the order of the sides reversed every other repeat."""
    common = ["--work", str(work), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
              "--teacher", args.teacher, "--st-lr", str(args.st_lr), "--st-head-lr", str(args.st_head_lr)]
    env = {"MLILT_CACHE": str(work / "mlilt_cache"), "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    sides = {f"mlilt {method}": ["--child", "mlilt", "--method", method] for method in args.methods.split(",")}
    sides[ST_LABEL] = ["--child", "st"]
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeat):
        for label in turn_order(list(sides), repeat):
            result = run_child(__file__, common + sides[label], env=env)
            result.pop("_output", None)
            runs.setdefault(label, []).append(result)
            print(f"{label}: {len(result['step_s'])} steps, training {result['train_s']:.0f} s, "
                  f"{result['seconds']:.0f} s in all, {json.dumps(result['quality'])}", flush=True)
    return runs


def summarise(runs: list[dict], args) -> dict:
    """Medians over a side's runs: the steady step, the whole training phase, the quality."""
    steps = []
    for run in runs:
        per_epoch = len(run["step_s"]) // run["epochs"]
        steps += [t for e in range(run["epochs"])
                  for t in steady(run["step_s"][e * per_epoch:(e + 1) * per_epoch], args.warmup)]
    return {"step_rate": args.batch_size / median(steps),
            "train_rate": median([run["samples"] / run["train_s"] for run in runs]),
            **{key: median([run["quality"][key] for run in runs]) for key in ("distance", "r1", "r5")}}


def report(runs: dict[str, list[dict]], args) -> str:
    theirs = summarise(runs[ST_LABEL], args)
    rows = []
    for label in runs:
        side = summarise(runs[label], args)
        ratios = ([f"**{side['step_rate'] / theirs['step_rate']:.2f}×**", f"{side['train_rate'] / theirs['train_rate']:.2f}×"]
                  if label != ST_LABEL else ["1.00×", "1.00×"])
        rows.append([label, f"{side['step_rate']:.2f}", f"{side['train_rate']:.2f}", *ratios,
                     f"{side['distance']:.4f}", f"{side['r1']:.1f}", f"{side['r5']:.1f}"])
    header = ["run", "samples/s, steady step", "samples/s, whole training", "ratio, steady", "ratio, whole training",
              "held-out distance to teacher", "target→source R@1", "R@5"]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="training pairs")
    parser.add_argument("--heldout", type=int, default=400, help="held-out pairs the students are judged on")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default="ln+adapter,ln+adapter+top:4", help="mlilt methods, comma-separated")
    parser.add_argument("--st-lr", type=float, default=2e-5, help="sentence-transformers learning rate, tower")
    parser.add_argument("--st-head-lr", type=float, default=1e-3,
                        help="sentence-transformers learning rate, the new Dense projection (mlilt's lr)")
    parser.add_argument("--teacher", default=str(REPO / "langpacks" / "en"))
    parser.add_argument("--warmup", type=int, default=3, help="steps of each epoch left out of the median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, alternating which side goes first")
    parser.add_argument("--seed", type=int, default=0, help="demo scenes")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--child", choices=["mlilt", "st"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit((run_mlilt if args.child == "mlilt" else run_st)(args))
        return
    import os

    work = scratch_dir("mlilt-distill-", args.work)
    os.environ["MLILT_CACHE"] = str(work / "mlilt_cache")  # the children's cache, filled here
    split = write_pairs(work, args.pairs, args.heldout, args.seed)
    one_off = teacher_rows(work, args.teacher, split)
    runs = measure(work, args)
    print(f"\nmachine: {machine()}")
    print(f"pairs: {len(split['train'])} training, {len(split['val'])} held out; batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.threads} torch thread(s), sentence-transformers lr {args.st_lr} (projection {args.st_head_lr}); "
          f"teacher embeddings {one_off:.0f} s once, untimed; medians over the steps after the first "
          f"{args.warmup} of each epoch, {args.repeat} run(s) per side\n")
    print(report(runs, args))


if __name__ == "__main__":
    main()

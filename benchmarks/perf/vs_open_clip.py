"""Training throughput, mlilt vs open_clip's own trainer, on the same towers, data and batch.

    python benchmarks/perf/vs_open_clip.py [--pairs 1000] [--batch-size 32] [--warmup 3]

Issue 6, target 1. Four runs, each in its own process, one after the other:

* mlilt ``ln+adapter`` anchored on ``langpacks/sw`` (image side frozen: image features are
  computed once, then read from the feature cache);
* ``open_clip_train.main`` with ``--lock-image --lock-text`` (its LiT/LayerNorm-tuning mode:
  LayerNorms of the text tower and both projections train, the image tower runs every step);
* mlilt ``full-text`` (the whole text tower trains; the image tower is frozen, so cached);
* ``open_clip_train.main`` with ``--lock-image`` only (LiT: the whole text tower trains).

The towers are the offline pair, expressed for open_clip as a model config: timm
``tf_efficientnet_lite0`` (avg pool, linear projection) with the effnet-lite0 weights and a
Hugging Face text tower on the converted me5-small folder (mean pooling, linear projection),
256-d like mlilt's default. The same demo pairs feed both, as JSONL for mlilt and as a CSV
for open_clip; captions carry me5's ``query: `` prefix on both sides. open_clip runs on CPU
with ``--device cpu --precision fp32 --workers 1``; its own log gives the samples/s of every
step (``--log-every-n-steps 1``), mlilt's is timed around its optimizer step. A step's time
is from one batch to the next: data loading, forward, backward, optimizer.
Steady state is the median over the steps after ``--warmup``.
"""
from __future__ import annotations

import argparse
import json
import resource
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, demo_data, emit, machine, median, run_child, steady, table  # noqa: E402

MODEL_NAME = "mlilt-offline-pair"
OPEN_CLIP_STEP = re.compile(r"Train Epoch: \d+ \[.*?Batch \(t\): [\d.]+, ([\d.]+)/s,")


# --------------------------------------------------------------------------- open_clip side


def open_clip_model_config(me5_dir: Path, embed_dim: int, context_length: int) -> dict:
    """The offline pair as an open_clip model config (timm image tower, HF text tower)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(me5_dir), "hf_tokenizer_name": str(me5_dir),
                     "hf_model_pretrained": True, "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                     "context_length": context_length},
    }


def write_open_clip_inputs(work: Path, pairs_file: Path, embed_dim: int, context_length: int) -> tuple[Path, Path]:
    """(config folder, CSV of the pairs) for open_clip; the CSV is tab-separated, absolute paths."""
    from mlilt.towers.offline import ME5_QUERY_PREFIX, me5_small_dir

    configs = work / "open_clip_configs"
    configs.mkdir(parents=True, exist_ok=True)
    config = open_clip_model_config(me5_small_dir(), embed_dim, context_length)
    (configs / f"{MODEL_NAME}.json").write_text(json.dumps(config, indent=2))
    rows = ["filepath\ttitle"]
    for line in pairs_file.read_text().splitlines():
        pair = json.loads(line)
        image = (pairs_file.parent / pair["image"]).resolve()
        rows.append(f"{image}\t{ME5_QUERY_PREFIX}{pair['caption']}")
    csv = work / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return configs, csv


def open_clip_checkpoint(configs: Path, out: Path) -> Path:
    """open_clip's model on the offline pair, with effnet-lite0's weights in the timm trunk."""
    import open_clip
    import torch

    from mlilt.towers.offline import effnet_lite0

    open_clip.add_model_config(configs)
    model = open_clip.create_model(MODEL_NAME)
    trunk = {k: v for k, v in effnet_lite0().state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = model.visual.trunk.load_state_dict(trunk, strict=False)
    if unexpected or any(not k.startswith("classifier") for k in missing):
        raise RuntimeError(f"effnet-lite0 weights do not fit open_clip's trunk: {missing} {unexpected}")
    torch.save(model.state_dict(), out)
    return out


def run_open_clip(args) -> dict:
    """Child: open_clip_train.main in this process; samples/s per step from its log."""
    import open_clip
    import open_clip_train.main as trainer

    work = Path(args.work)
    open_clip.add_model_config(work / "open_clip_configs")
    checkpoint = work / "open_clip_start.pt"
    if not checkpoint.is_file():
        open_clip_checkpoint(work / "open_clip_configs", checkpoint)
    logs = Path(tempfile.mkdtemp(dir=work, prefix="open_clip_logs_"))
    locks = ["--lock-image", "--lock-image-freeze-bn-stats"] + (["--lock-text"] if args.lock_text else [])
    argv = ["--train-data", str(work / "pairs.csv"), "--dataset-type", "csv", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", MODEL_NAME, "--pretrained", str(checkpoint),
            "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "1e-3", "--warmup", "1",
            "--workers", str(args.workers), "--device", "cpu", "--precision", "fp32", "--seed", "0",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
            "--log-every-n-steps", "1", "--image-mean", "0.5", "0.5", "0.5",
            "--image-std", "0.5", "0.5", "0.5", "--logs", str(logs), "--name", "run", *locks]
    cpu: list[float] = []
    epoch = trainer.train_one_epoch

    def timed_epoch(*a, **k):
        before = cpu_seconds()
        out = epoch(*a, **k)
        cpu.append(cpu_seconds() - before)  # the DataLoader workers have exited by now
        return out

    trainer.train_one_epoch = timed_epoch
    started = time.perf_counter()
    trainer.main(argv)
    seconds = time.perf_counter() - started
    log = (logs / "run" / "out.log").read_text()
    shutil.rmtree(logs, ignore_errors=True)  # its final checkpoint is large and not needed
    per_step = [args.batch_size / float(rate) for rate in OPEN_CLIP_STEP.findall(log)]
    return {"side": "open_clip", "argv": " ".join(argv), "step_s": per_step, "seconds": seconds,
            "one_off_s": 0.0, "cpu_per_step": sum(cpu) / max(1, len(per_step))}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------- mlilt side


def run_mlilt(args) -> dict:
    """Child: mlilt.train.train on the same pairs; each optimizer step timed end to end."""
    import mlilt.train as training
    from mlilt.train_config import TrainConfig

    spans: list[tuple[float, float]] = []
    cpu: list[float] = []
    one_off: list[float] = []
    step, prepare = training._step, training.ImageSource.prepare

    def timed_step(*a, **k):
        started, before = time.perf_counter(), cpu_seconds()
        out = step(*a, **k)
        spans.append((started, time.perf_counter()))
        cpu.append(cpu_seconds() - before)
        return out

    def timed_prepare(self, *a, **k):
        started = time.perf_counter()
        prepare(self, *a, **k)
        one_off.append(time.perf_counter() - started)

    training._step, training.ImageSource.prepare = timed_step, timed_prepare
    out = Path(tempfile.mkdtemp(dir=args.work, prefix="mlilt_pack_")) / "pack"
    config = TrainConfig(lang="sw", data=args.pairs_file, out=str(out), method=args.method,
                         anchor=args.anchor or None, epochs=1, batch_size=args.batch_size, holdout=args.holdout,
                         checkpoint_every=0)
    started = time.perf_counter()
    training.train(config)
    seconds = time.perf_counter() - started
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"side": "mlilt", "config": config.to_dict(), "step_s": step_times(spans), "seconds": seconds,
            "one_off_s": sum(one_off), "cpu_per_step": sum(cpu) / max(1, len(cpu))}


def step_times(spans: list[tuple[float, float]]) -> list[float]:
    """Batch to batch (what happens between steps counts); the last step to its own end."""
    times = [b[0] - a[0] for a, b in zip(spans, spans[1:])]
    return times + [spans[-1][1] - spans[-1][0]] if spans else times


# --------------------------------------------------------------------------- driver


RUNS = {
    "ln+adapter": [("mlilt ln+adapter, anchored (image features cached)",
                    ["--child", "mlilt", "--method", "ln+adapter", "--anchor", "{anchor}"]),
                   ("open_clip_train --lock-image --lock-text (text LayerNorms train)",
                    ["--child", "open_clip", "--lock-text"])],
    "full-text": [("mlilt full-text (image tower frozen, features cached)", ["--child", "mlilt", "--method", "full-text"]),
                  ("open_clip_train --lock-image (whole text tower trains)", ["--child", "open_clip"])],
}


def measure(script: str, work: Path, pairs_file: Path, args) -> list[dict]:
    """Each comparison's two runs, ``--repeat`` times in alternating order (A B, B A, ...) so
    that a slow patch of a shared machine does not land on one side only."""
    common = ["--work", str(work), "--pairs-file", str(pairs_file), "--batch-size", str(args.batch_size),
              "--workers", str(args.workers)]
    env = {"MLILT_CACHE": str(work / "mlilt_cache"), "OMP_NUM_THREADS": str(args.threads)}
    merged: dict[str, dict] = {}
    for name in args.runs.split(","):
        for repeat in range(args.repeat):
            order = RUNS[name] if repeat % 2 == 0 else RUNS[name][::-1]
            for label, extra in order:
                result = run_child(script, common + [a.format(anchor=args.anchor) for a in extra], env=env)
                kept = steady(result["step_s"], args.warmup)
                print(f"{label}: {len(result['step_s'])} steps, median {median(kept):.3f} s/step after "
                      f"{args.warmup}, one-off {result['one_off_s']:.1f} s", flush=True)
                into = merged.setdefault(label, {"label": label, "steady": [], "step_s": result["step_s"],
                                                 "one_off_s": result["one_off_s"], "cpu": []})
                into["steady"] += kept  # one-off and 1-epoch figures: the first (cold-cache) run
                into["cpu"].append(result["cpu_per_step"])
    for result in merged.values():
        result["steady_step_s"] = median(result["steady"])
    return list(merged.values())


def report(results: list[dict], args) -> str:
    rows = []
    for ours, theirs in zip(results[0::2], results[1::2]):
        for r in (ours, theirs):
            r["rate"] = args.batch_size / r["steady_step_s"]
            r["epoch_rate"] = args.batch_size * len(r["step_s"]) / (sum(r["step_s"]) + r["one_off_s"])
        ours_cpu, theirs_cpu = median(ours["cpu"]), median(theirs["cpu"])
        rows.append([ours["label"], f"{ours['rate']:.2f}", f"{ours['epoch_rate']:.2f}", f"{ours['one_off_s']:.0f}",
                     f"{ours_cpu:.1f}", theirs["label"], f"{theirs['rate']:.2f}", f"{theirs['epoch_rate']:.2f}",
                     f"{theirs_cpu:.1f}", f"**{ours['rate'] / theirs['rate']:.2f}×**",
                     f"{ours['epoch_rate'] / theirs['epoch_rate']:.2f}×", f"**{theirs_cpu / ours_cpu:.2f}×**"])
    header = ["mlilt run", "samples/s (steady)", "samples/s (1 epoch incl. one-off)", "one-off feature pass s",
              "CPU s/step", "open_clip run", "samples/s (steady)", "samples/s (1 epoch)", "CPU s/step",
              "ratio steady", "ratio 1 epoch", "ratio CPU/step"]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400, help="demo scenes generated (80%% train)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--workers", type=int, default=1, help="open_clip DataLoader workers")
    parser.add_argument("--anchor", default=str(REPO / "langpacks" / "sw"))
    parser.add_argument("--runs", default="ln+adapter,full-text", help="comparisons to run: ln+adapter, full-text")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, alternating which side goes first")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    # child-process options
    parser.add_argument("--child", choices=["mlilt", "open_clip"], help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--lock-text", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--holdout", type=float, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit((run_mlilt if args.child == "mlilt" else run_open_clip)(args))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="mlilt-perf-"))
    pairs_file = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    write_open_clip_inputs(work, pairs_file, embed_dim=256, context_length=64)
    results = measure(__file__, work, pairs_file, args)
    print(f"\nmachine: {machine()}")
    print(f"pairs: {len(pairs_file.read_text().splitlines())}, batch {args.batch_size}, {args.threads} torch thread(s), "
          f"median over steps after the first {args.warmup} of each run, {args.repeat} run(s) per side\n")
    print(report(results, args))


if __name__ == "__main__":
    main()

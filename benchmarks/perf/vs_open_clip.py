"""Training throughput, mlilt vs open_clip's own trainer, on the same towers, data and batch.

    python benchmarks/perf/vs_open_clip.py [--pairs 400] [--batch-size 32] [--epochs 3] [--warmup 3]
        [--runs ln+adapter,ln+adapter+top:4,full-text] [--precision fp32|bf16]

Each run in its own process, one after the other; a run that two
comparisons share runs once:

* mlilt ``ln+adapter`` anchored on ``langpacks/sw`` (image side frozen: image features are
  computed once, then read from the feature cache);
* mlilt ``ln+adapter+top:4`` anchored: the same, limited to the last 4 text blocks (the
  backward pass stops at block 8);
* ``open_clip_train.main`` with ``--lock-image --lock-text`` (its LiT/LayerNorm-tuning mode:
  LayerNorms of the text tower and both projections train, the image tower runs every step).
  Its nearest mode to ``top:4``, ``--lock-text-unlocked-layers 4``, cannot run here:
  open_clip 3.3.0's ``HFTextEncoder.lock`` raises ``KeyError: 'layer_attr'`` for a BERT-family
  text tower;
* mlilt ``full-text`` (the whole text tower trains; the image tower is frozen, so cached);
* ``open_clip_train.main`` with ``--lock-image`` only (LiT: the whole text tower trains).

The towers are the offline pair, expressed for open_clip as a model config: timm
``tf_efficientnet_lite0`` (avg pool, linear projection) with the effnet-lite0 weights and a
Hugging Face text tower on the converted me5-small folder (mean pooling, linear projection),
256-d like mlilt's default. The same demo pairs feed both, as JSONL for mlilt and as a CSV
for open_clip; captions carry me5's ``query: `` prefix on both sides. open_clip runs on CPU
with ``--device cpu --precision fp32 --workers 1``; with ``--precision bf16`` both sides run
under bfloat16 autocast (open_clip ``--precision amp_bf16``, mlilt ``--bf16``). Its own log
gives the samples/s of every step (``--log-every-n-steps 1``), mlilt's is timed around its optimizer step. A step's time
is from one batch to the next: data loading, forward, backward, optimizer.
Per epoch group (the first epoch, the later ones) the median step after ``--warmup`` steps of
each epoch; CPU time per step from the process's (and its DataLoader workers') CPU seconds.
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
from _common import REPO, demo_data, emit, machine, median, run_child, scratch_dir, steady, table, turn_order  # noqa: E402

MODEL_NAME = "mlilt-offline-pair"
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}  # --precision here -> open_clip's own
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
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", "1e-3", "--warmup", "1",
            "--workers", str(args.workers), "--device", "cpu", "--precision", OPEN_CLIP_PRECISION[args.precision],
            "--seed", "0",
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
            "one_off_s": 0.0, "epoch_cpu_s": cpu, "epochs": args.epochs}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------- mlilt side


def run_mlilt(args) -> dict:
    """Child: mlilt.training.train on the same pairs; each optimizer step timed end to end."""
    from mlilt.training import Callback, TrainConfig, train

    class StepClock(Callback):
        """Each step's span (perf_counter) and CPU seconds; the one-off image-feature pass."""

        def __init__(self):
            self.spans: list[tuple[float, float]] = []
            self.cpu: list[float] = []
            self.one_off = 0.0

        def on_image_features(self, images, seconds):
            self.one_off = seconds

        def on_step_start(self, info):
            self.before = cpu_seconds()

        def on_step_end(self, info):
            self.spans.append((info.started, info.started + info.seconds))
            self.cpu.append(cpu_seconds() - self.before)

    clock = StepClock()
    out = Path(tempfile.mkdtemp(dir=args.work, prefix="mlilt_pack_")) / "pack"
    config = TrainConfig(lang="sw", data=args.pairs_file, out=str(out), method=args.method,
                         anchor=args.anchor or None, epochs=args.epochs, batch_size=args.batch_size,
                         holdout=args.holdout, checkpoint_every=0, bf16=args.precision == "bf16")
    started = time.perf_counter()
    train(config, callbacks=[clock])
    seconds = time.perf_counter() - started
    shutil.rmtree(out.parent, ignore_errors=True)
    per_epoch = len(clock.cpu) // args.epochs
    epoch_cpu = [sum(clock.cpu[i * per_epoch:(i + 1) * per_epoch]) for i in range(args.epochs)]
    return {"side": "mlilt", "config": config.to_dict(), "step_s": step_times(clock.spans), "seconds": seconds,
            "one_off_s": clock.one_off, "epoch_cpu_s": epoch_cpu, "epochs": args.epochs}


def step_times(spans: list[tuple[float, float]]) -> list[float]:
    """Batch to batch (what happens between steps counts); the last step to its own end."""
    times = [b[0] - a[0] for a, b in zip(spans, spans[1:])]
    return times + [spans[-1][1] - spans[-1][0]] if spans else times


# --------------------------------------------------------------------------- driver


MLILT_LN_ADAPTER = "mlilt ln+adapter, anchored (image features cached)"
MLILT_TOP4 = "mlilt ln+adapter+top:4, anchored (image features cached; backward through the last 4 text blocks)"
OPEN_CLIP_LN = "open_clip_train --lock-image --lock-text (text LayerNorms train)"
RUN_ARGS = {
    MLILT_LN_ADAPTER: ["--child", "mlilt", "--method", "ln+adapter", "--anchor", "{anchor}"],
    MLILT_TOP4: ["--child", "mlilt", "--method", "ln+adapter+top:4", "--anchor", "{anchor}"],
    OPEN_CLIP_LN: ["--child", "open_clip", "--lock-text"],
    "mlilt full-text (image tower frozen, features cached)": ["--child", "mlilt", "--method", "full-text"],
    "open_clip_train --lock-image (whole text tower trains)": ["--child", "open_clip"],
}
COMPARISONS = {  # name -> [(mlilt run, open_clip run), ...]
    "ln+adapter": [(MLILT_LN_ADAPTER, OPEN_CLIP_LN)],
    "ln+adapter+top:4": [(MLILT_TOP4, OPEN_CLIP_LN)],
    "full-text": [("mlilt full-text (image tower frozen, features cached)",
                   "open_clip_train --lock-image (whole text tower trains)")],
}


def measure(script: str, work: Path, pairs_file: Path, args) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Every run the chosen comparisons need, ``--repeat`` times, alternating the order of
    each comparison's sides (A B, B A, ...) so that a slow patch of a shared machine does not
    land on one side only. Returns results by run label and the (mlilt, open_clip) pairs."""
    common = ["--work", str(work), "--pairs-file", str(pairs_file), "--batch-size", str(args.batch_size),
              "--workers", str(args.workers), "--epochs", str(args.epochs), "--precision", args.precision]
    env = {"MLILT_CACHE": str(work / "mlilt_cache"), "OMP_NUM_THREADS": str(args.threads)}
    pairs = [pair for name in args.runs.split(",") for pair in COMPARISONS[name]]
    merged: dict[str, dict] = {}
    for repeat in range(args.repeat):
        for pair in pairs:
            for label in turn_order(pair, repeat):
                if len(merged.get(label, {}).get("runs", [])) > repeat:
                    continue  # shared with a comparison that already ran it this round
                child = common + [a.format(anchor=args.anchor) for a in RUN_ARGS[label]]
                result = run_child(script, child, env=env)
                print(f"{label}: {len(result['step_s'])} steps, one-off {result['one_off_s']:.1f} s, "
                      f"{result['seconds']:.0f} s in all", flush=True)
                merged.setdefault(label, {"label": label, "runs": []})["runs"].append(result)
    return {label: summarise(entry["runs"], args) for label, entry in merged.items()}, pairs


def summarise(runs: list[dict], args) -> dict:
    """Medians over runs of a side: epoch 1 and epochs 2+ step times (after ``--warmup`` steps
    of each epoch), CPU per step in each group, and the whole first run's rate incl. one-off."""
    first, later, cpu_first, cpu_later = [], [], [], []
    for run in runs:
        per_epoch = len(run["step_s"]) // run["epochs"]
        epochs = [run["step_s"][i * per_epoch:(i + 1) * per_epoch] for i in range(run["epochs"])]
        first += steady(epochs[0], args.warmup)
        later += [t for epoch in epochs[1:] for t in steady(epoch, args.warmup)]
        cpu_first.append(run["epoch_cpu_s"][0] / per_epoch)
        if run["epochs"] > 1:
            cpu_later.append(sum(run["epoch_cpu_s"][1:]) / (per_epoch * (run["epochs"] - 1)))
    cold = runs[0]  # one-off and whole-run figures: the first (cold-cache) run
    return {"first_s": median(first), "later_s": median(later) if later else None,
            "cpu_first": median(cpu_first), "cpu_later": median(cpu_later) if cpu_later else None,
            "one_off_s": cold["one_off_s"],
            "run_rate": args.batch_size * len(cold["step_s"]) / (sum(cold["step_s"]) + cold["one_off_s"])}


def report(results: dict[str, dict], pairs: list[tuple[str, str]], args) -> str:
    rows = []
    for ours_label, theirs_label in pairs:
        ours, theirs = results[ours_label], results[theirs_label]
        rows.append([ours_label, theirs_label] + _side_cells(ours, args) + _side_cells(theirs, args) + [
            _ratio(theirs["first_s"], ours["first_s"]), _ratio(theirs["later_s"], ours["later_s"]),
            f"**{_ratio(theirs['cpu_later'], ours['cpu_later'])}**", _ratio(ours["run_rate"], theirs["run_rate"])])
    header = ["mlilt run", "open_clip run",
              "mlilt samples/s epoch 1", "mlilt samples/s epochs 2+", "mlilt CPU s/step epochs 2+",
              "mlilt samples/s whole run incl. one-off", "mlilt one-off s",
              "open_clip samples/s epoch 1", "open_clip samples/s epochs 2+", "open_clip CPU s/step epochs 2+",
              "open_clip samples/s whole run", "open_clip one-off s",
              "ratio epoch 1", "ratio epochs 2+", "ratio CPU/step epochs 2+", "ratio whole run"]
    return table(header, rows)


def _side_cells(side: dict, args) -> list[str]:
    later = f"{args.batch_size / side['later_s']:.2f}" if side["later_s"] else "—"
    cpu = f"{side['cpu_later']:.2f}" if side["cpu_later"] else "—"
    return [f"{args.batch_size / side['first_s']:.2f}", later, cpu, f"{side['run_rate']:.2f}",
            f"{side['one_off_s']:.0f}"]


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}×" if numerator and denominator else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400, help="demo scenes generated (80%% train)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--workers", type=int, default=1, help="open_clip DataLoader workers")
    parser.add_argument("--anchor", default=str(REPO / "langpacks" / "sw"))
    parser.add_argument("--runs", default="ln+adapter,ln+adapter+top:4,full-text",
                        help=f"comparisons to run: {', '.join(COMPARISONS)}")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per run (steady-state figures use the 2nd on)")
    parser.add_argument("--precision", choices=sorted(OPEN_CLIP_PRECISION), default="fp32",
                        help="both sides: fp32, or bfloat16 autocast (fast only on GPUs and CPUs with AMX/AVX512-BF16)")
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
    work = scratch_dir("mlilt-perf-", args.work)
    pairs_file = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    write_open_clip_inputs(work, pairs_file, embed_dim=256, context_length=64)
    results, pairs = measure(__file__, work, pairs_file, args)
    print(f"\nmachine: {machine()}")
    print(f"pairs: {len(pairs_file.read_text().splitlines())}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.precision}, {args.threads} torch thread(s), "
          f"median over the steps after the first {args.warmup} of each epoch, "
          f"{args.repeat} run(s) per side\n")
    print(report(results, pairs, args))


if __name__ == "__main__":
    main()

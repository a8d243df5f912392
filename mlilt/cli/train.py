"""``mlilt train``: train one language pack.

Every option is a ``TrainConfig`` field (``mlilt.training.config``): the names, and the defaults
shown here, come from its fields; ``--no-cache-features`` turns off ``cache_features``.
"""
from __future__ import annotations

import contextlib
import shlex
import signal
from typing import Annotated, Optional

import typer

from mlilt.cli.common import console, flag, user_errors
from mlilt.datasets import BENCHMARKS
from mlilt.methods.catalog import describe_methods
from mlilt.speed import SPEED_PATHS
from mlilt.training.config import TrainConfig

METHOD_HELP = ("Parameter-efficient method, parts joined with '+', each NAME[:N][@text|@image]. "
               "Projections and temperature always train. With --anchor only the text side trains. Methods "
               "(and the sides they touch):\n\n" + describe_methods().replace("\n", "\n\n")).replace("[", "\\[")
D = TrainConfig.defaults()  # every option's default, by field name
NEGATED = {"no_cache_features": "cache_features"}  # flag -> the field it turns off


@user_errors
def train_command(
    lang: Annotated[str, typer.Option(help="Language code of the captions and of the pack, e.g. sw.")],
    out: Annotated[str, typer.Option(help="Pack folder to write (atomically).")],
    data: Annotated[Optional[str], typer.Option(help="Image-caption pairs: JSONL/CSV/TSV (image path relative to "
                                                     "the file + caption), parquet/arrow, a Hugging Face dataset "
                                                     "name, or WebDataset shards ('shards/{000..099}.tar', "
                                                     "https:// too).")] = None,
    image_column: Annotated[Optional[str], typer.Option(help="The pairs' image field (default: image, image_path, "
                                                             "file or filepath).")] = D["image_column"],
    caption_column: Annotated[Optional[str], typer.Option(help="The pairs' caption field (default: caption, "
                                                               "text, sentences or captions).")] = D["caption_column"],
    parallel: Annotated[Optional[list[str]], typer.Option(help="Parallel sentences learned from --teacher "
                                                               "(repeatable): TSV/TSV.gz source<TAB>target[<TAB>"
                                                               "more], JSONL with source/target, parquet/arrow or "
                                                               "a dataset.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="What embeds the --parallel sources: a pack (its text "
                                                        "side; the new pack lives in its image space), an open_clip "
                                                        "MODEL:PRETRAINED (its encode_text; the pack lives in its "
                                                        "image space) or a sentence-transformers name/folder (needs "
                                                        "--anchor or --data).")] = D["teacher"],
    parallel_columns: Annotated[Optional[str], typer.Option(help="SOURCE,TARGET column names of parquet/arrow/"
                                                                 "dataset parallel data.")] = D["parallel_columns"],
    distill_loss: Annotated[str, typer.Option(help="mse (student(target) and student(source) to teacher(source)), "
                                                   "contrastive (in-batch InfoNCE to the teacher) or "
                                                   "both.")] = D["distill_loss"],
    distill_weight: Annotated[float, typer.Option(help="Weight of the distillation loss when --data trains "
                                                       "too.")] = D["distill_weight"],
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = D["method"],
    anchor: Annotated[Optional[str], typer.Option(help="The frozen image space the pack lives in: a pack (its "
                                                       "image side) or an open_clip MODEL:PRETRAINED (its "
                                                       "encode_image, exactly). Packs on one anchor share one image "
                                                       "index (default with --teacher: the teacher's "
                                                       "space).")] = D["anchor"],
    text_tower: Annotated[str, typer.Option(help="Text tower: me5-small (offline) or a HF "
                                                "name/folder.")] = D["text_tower"],
    image_tower: Annotated[str, typer.Option(help="Image tower: effnet-lite0 (offline), MODEL:PRETRAINED "
                                                  "(open_clip), timm:NAME, or a HF vision model.")] = D["image_tower"],
    epochs: Annotated[int, typer.Option(help="Passes over the training pairs.")] = D["epochs"],
    batch_size: Annotated[int, typer.Option(help="Pairs per step (in-batch negatives).")] = D["batch_size"],
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup then cosine).")] = D["lr"],
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices.")] = D["weight_decay"],
    min_lr_ratio: Annotated[float, typer.Option(help="The cosine decays to --lr times this.")] = D["min_lr_ratio"],
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", "--warmup", help="Steps of linear warmup (default: 5% of all "
                                                             "steps).")] = D["warmup_steps"],
    grad_clip: Annotated[float, typer.Option(help="Largest gradient norm; larger ones are scaled down to "
                                                  "it.")] = D["grad_clip"],
    holdout: Annotated[float, typer.Option(help="Images held out for validation: a share (<1) or a "
                                                "count.")] = D["holdout"],
    embed_dim: Annotated[int, typer.Option(help="Size of the shared embedding space.")] = D["embed_dim"],
    max_length: Annotated[int, typer.Option(help="Caption tokens kept.")] = D["max_length"],
    pooling: Annotated[Optional[str], typer.Option(help="Text pooling: mean or cls (default: the "
                                                        "tower's).")] = D["pooling"],
    text_prefix: Annotated[Optional[str], typer.Option(help="Prepended to every caption (me5-small: "
                                                            "'query: ').")] = D["text_prefix"],
    seed: Annotated[int, typer.Option(help="Seed for initialisation, split and order.")] = D["seed"],
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one), cpu, cuda or cuda:N; under "
                                             "torchrun each process takes its local rank's GPU.")] = D["device"],
    bf16: Annotated[bool, flag("--bf16", help="bfloat16 autocast: for GPUs and CPUs with AMX; "
                                                      "emulated and slow on other CPUs.")] = D["bf16"],
    grad_checkpointing: Annotated[bool, flag("--grad-checkpointing",
                                                     help="Recompute the activations of each block of a trained "
                                                          "tower in the backward pass instead of keeping them: "
                                                          "less memory, about one more forward pass of "
                                                          "compute (for large towers).")] = D["grad_checkpointing"],
    recompute_norms: Annotated[bool, flag("--recompute-norms",
                                                  help="Fused norm + activation layers of a trained CNN (SiLU, "
                                                       "GELU, ...) keep only their input and recompute the rest in "
                                                       "the backward pass: a lighter trade than "
                                                       "--grad-checkpointing. Norms followed by ReLU/ReLU6 (as in "
                                                       "effnet-lite0) always do so, at no measurable "
                                                       "cost.")] = D["recompute_norms"],
    speed_paths: Annotated[str, typer.Option(help="CPU speed paths: default (all), none (the plain PyTorch "
                                                  "path), or a comma list of " + ", ".join(SPEED_PATHS) +
                                                  ". Each computes what the plain path "
                                                  "computes.")] = D["speed_paths"],
    skip_bad: Annotated[bool, flag("--skip-bad", help="Skip unreadable rows/images and count "
                                                              "them.")] = D["skip_bad"],
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing pack at --out.")] = D["overwrite"],
    exclude_leaks: Annotated[Optional[str], typer.Option(help="Drop pairs that leak this benchmark's test set "
                                                              f"(see `mlilt data check`): {', '.join(BENCHMARKS)}, "
                                                              "demo, custom.")] = D["exclude_leaks"],
    leak_root: Annotated[Optional[str], typer.Option(help="Where the --exclude-leaks benchmark "
                                                          "lives.")] = D["leak_root"],
    leak_threshold: Annotated[float, typer.Option(help="chrF at or above which a caption is a "
                                                       "leak.")] = D["leak_threshold"],
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints in OUT.checkpoint/ (also "
                                                       "written at each epoch end, deleted once the pack is "
                                                       "written).")] = D["checkpoint_every"],
    resume: Annotated[bool, flag("--resume", help="Continue from OUT.checkpoint/ (same settings and data "
                                                          "required). Without it an existing checkpoint is "
                                                          "replaced when training starts.")] = D["resume"],
    skip_nonfinite: Annotated[bool, flag("--skip-nonfinite", help="Skip batches whose loss or gradient "
                                                                          "norm is NaN/inf (counted in the pack) "
                                                                          "instead of "
                                                                          "stopping.")] = D["skip_nonfinite"],
    no_cache_features: Annotated[bool, flag("--no-cache-features",
                                                    help="Compute a frozen image tower's features afresh instead "
                                                         "of reading and writing the on-disk feature "
                                                         "cache.")] = not D["cache_features"],
):
    """Train a language pack on frozen towers from three sources of signal, alone or together.

    [bold]--data[/]: image-caption pairs in the language.

    [bold]--parallel[/] with [bold]--teacher[/]: parallel or machine-translated sentences (`mlilt data translate`), distilled from an aligned teacher; no image needed.

    [bold]--anchor[/]: an aligned image space to live in: a pack, or an open_clip MODEL:PRETRAINED whose encode_image the pack keeps exactly.

    Give --data, --parallel, or both. Several GPUs or nodes: torchrun --nproc_per_node N -m mlilt train ... (--batch-size stays the global batch; only rank 0 writes).
    """
    options = dict(locals())  # first: the arguments are all the locals there are yet
    config = config_from_options(options)
    from mlilt.training.trainer import train

    with interrupts_as_keyboard_interrupt():
        try:
            result = train(config, console=console)
        except KeyboardInterrupt:
            console.print(resume_hint(config, options), soft_wrap=True, highlight=False)
            raise typer.Exit(130) from None
    if not result.written:  # another process (rank 0 under torchrun) reports
        return
    print_report(result.report)
    val = result.metrics
    if "image_retrieval_recall@1" in val:
        detail = f"t2i R@1 {val['image_retrieval_recall@1']:.1f}, i2t R@1 {val['text_retrieval_recall@1']:.1f}"
    else:
        detail = f"held-out parallel pairs, target->source R@1 {val['target_to_source_recall@1']:.1f}"
    console.print(best_epoch_line(result.history, config.epochs), soft_wrap=True, highlight=False)
    console.print(f"[green]pack written:[/] {result.pack}  (val mean recall {val['mean_recall']:.1f}, {detail})",
                  soft_wrap=True)


def best_epoch_line(history: list[dict], epochs: int) -> str:
    """Which epoch the pack keeps, and why."""
    trained = [row for row in history if row["epoch"] >= 1]
    best = max(trained, key=lambda row: row["val"]["mean_recall"])  # max keeps the first of equals, as keep-best
    if best["epoch"] == epochs:
        return f"kept epoch {epochs} of {epochs}: the last epoch has the best validation mean recall"
    return (f"kept epoch {best['epoch']} of {epochs}: its validation mean recall ({best['val']['mean_recall']:.1f}) "
            f"is the best; later epochs did not beat it (fewer --epochs would have given the same pack)")


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt():
    """SIGTERM (a scheduler's stop, kill) ends training as Ctrl-C does, so the hint to resume is
    printed; the previous handler is restored after."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_hint(config: TrainConfig, options: dict) -> str:
    """What an interrupted run left, and the exact command that continues it."""
    from mlilt.training.checkpoint import find_checkpoint

    where = find_checkpoint(config.out) if config.checkpoint_every else None
    if where is None:
        return "interrupted: no pack was written and there is no checkpoint to resume from; rerun to start over"
    return (f"interrupted: no pack was written; the last checkpoint is in {where}. Continue with:\n"
            f"  {command_line(options, resume=True)}")


def command_line(options: dict, resume: bool = False) -> str:
    """``mlilt train`` with the options that differ from their defaults (and --resume)."""
    words = ["mlilt", "train"]
    for name, value in options.items():
        field = NEGATED.get(name, name)
        default = (not D[field]) if name in NEGATED else D.get(field)
        if name == "resume" or value is None or value == default or value == []:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                words += [flag, str(item)]
    return shlex.join(words + (["--resume"] if resume else []))


def config_from_options(options: dict) -> TrainConfig:
    """The TrainConfig of ``train_command``'s arguments (by name; the ``--no-*`` flags inverted)."""
    return TrainConfig(**{NEGATED.get(name, name): not value if name in NEGATED else value
                          for name, value in options.items()})


def print_report(report) -> None:
    from rich.table import Table

    table = Table(title=f"trainable parameters ({report.method})")
    for column in ("side", "trainable", "of tower", "%"):
        table.add_column(column, justify="right" if column != "side" else "left")
    for side in report.total:
        table.add_row(side, f"{report.trainable[side]:,}", f"{report.total[side]:,}", f"{report.percent(side):.3f}")
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")

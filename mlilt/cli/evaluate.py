"""``mlilt eval``: retrieval benchmarks for packs."""
from __future__ import annotations

import warnings
from typing import Annotated, Optional

import typer
from rich.table import Table

from mlilt.cli.common import console, user_errors
from mlilt.datasets import BENCHMARKS
from mlilt.errors import UsageError

COLUMNS = {  # task -> (header, metric)
    "zeroshot_retrieval": (("t2i R@1", "image_retrieval_recall@1"), ("t2i R@5", "image_retrieval_recall@5"),
                           ("i2t R@1", "text_retrieval_recall@1"), ("i2t R@5", "text_retrieval_recall@5"),
                           ("mean", "mean_recall")),
    "zeroshot_classification": (("acc@1", "acc1"), ("acc@5", "acc5"), ("mean per-class recall", "mean_per_class_recall")),
}


@user_errors
def eval_command(
    benchmark: Annotated[str, typer.Option(help=f"{', '.join(BENCHMARKS)}, demo (a `mlilt data demo` folder), "
                                                "custom (--data), or zeroshot (classification folder).")],
    pack: Annotated[Optional[list[str]], typer.Option(help="Pack folder or name, or a folder of packs; "
                                                           "repeatable.")] = None,
    reference: Annotated[Optional[list[str]], typer.Option(help="An aligned open_clip model to compare with, "
                                                                "MODEL:PRETRAINED; repeatable.")] = None,
    root: Annotated[Optional[str], typer.Option(help="Folder holding the benchmark in its official layout.")] = None,
    langs: Annotated[Optional[str], typer.Option(help="Comma-separated codes, or 'all'. Default: each pack on "
                                                      "its own language.")] = None,
    captions: Annotated[str, typer.Option(help="first (CLIP_benchmark) or all (every caption a positive).")] = "first",
    data: Annotated[Optional[str], typer.Option(help="Pairs file for --benchmark custom.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Folder for per-language JSON results and summary.csv.")] = None,
    format: Annotated[str, typer.Option("--format", help="Result files for --out: mlilt (recalls in %, counts) or "
                                                        "clip_benchmark (CLIP_benchmark's own files: names, "
                                                        "dataset names such as crossmodal3600, fractions).")] = "mlilt",
    batch_size: Annotated[int, typer.Option(help="Images or captions per forward pass.", min=1)] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (a GPU when there is one).")] = "auto",
):
    """Text-to-image and image-to-text recall@1/5/10, per language, image tower run once."""
    from pathlib import Path

    from mlilt.evaluation.evaluate import evaluate
    from mlilt.evaluation.runner import RESULT_FORMATS, write_results
    from mlilt.training.progress import TrainProgress

    if format not in RESULT_FORMATS:  # before the evaluation, not after it
        raise UsageError(f"--format {format!r}: give one of {', '.join(RESULT_FORMATS)}")
    codes = [code.strip() for code in langs.split(",") if code.strip()] if langs else None
    with warnings.catch_warnings():  # what was left out is printed below, once, with the table
        warnings.simplefilter("ignore", UserWarning)
        results = evaluate(benchmark, pack or [], root=root, langs=codes, captions=captions, data=data,
                           references=reference or [], batch_size=batch_size, device=device,
                           progress=TrainProgress(console).task)
    columns = COLUMNS[results[0].task]
    table = Table(title=f"{benchmark}, %")
    table.add_column("language")
    table.add_column("model")
    for header, _ in columns:
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(r.language, r.model, *[f"{r.metrics[metric]:.1f}" for _, metric in columns])
    console.print(table)
    for r in results:
        left_out = {k: v for k, v in r.counts.items() if v and k != "captions_dropped_not_first"}
        if left_out:
            console.print(f"note: {r.benchmark}/{r.language}: left out "
                          + ", ".join(f"{k}={v}" for k, v in sorted(left_out.items())))
    if out:
        write_results(results, Path(out), format)
        console.print(f"results written to {out}")

"""``mlilt check``: look for benchmark test data leaked into a training set."""
from __future__ import annotations

import warnings
from typing import Annotated, Optional

import typer
from rich.table import Table

from mlilt.cli.common import console, user_errors
from mlilt.datasets import BENCHMARKS

EXIT_LEAKS = 1


@user_errors
def check_command(
    data: Annotated[str, typer.Option(help="Training pairs (.jsonl, .csv, .tsv, parquet, dataset).")],
    against: Annotated[str, typer.Option(help=f"Benchmark: {', '.join(BENCHMARKS)}, demo (a `mlilt data demo` "
                                              "folder as --root) or custom (a pairs file as --root).")],
    lang: Annotated[str, typer.Option(help="Language of the benchmark captions to check against.")],
    root: Annotated[Optional[str], typer.Option(help="Folder holding the benchmark (or the pairs file "
                                                     "for custom).")] = None,
    threshold: Annotated[float, typer.Option(help="Flag captions with sentence chrF (0-100) at or above this.",
                                             min=0.0, max=100.0)] = 80.0,
):
    """Find training captions that near-duplicate benchmark captions (chrF) and training images
    byte-identical to benchmark images.

    Exit code 0 when no leak is found, 1 when leaks were found (2/3 for bad arguments or data).
    """
    from mlilt.datasets.leakage import find_leaks
    from mlilt.data.pairs import read_pairs

    train = read_pairs(data)
    with warnings.catch_warnings():  # an incomplete benchmark download is summarised below
        warnings.simplefilter("ignore", UserWarning)
        report = find_leaks(train, against, root, lang, threshold=threshold)

    if report.caption_leaks:
        table = Table("training caption", "benchmark caption", "chrF", "where", title="caption leaks")
        for leak in report.caption_leaks:
            table.add_row(leak.train_caption, leak.benchmark_caption, f"{leak.score:.1f}", leak.train_source)
        console.print(table)
    if report.image_leaks:
        table = Table("where", "benchmark image", title="image leaks")
        for leak in report.image_leaks:
            table.add_row(leak.train_source, leak.benchmark_key)
        console.print(table)
    counts = report.counts
    console.print(f"caption leaks: {counts['caption_leaks']}, image leaks: {counts['image_leaks']}, "
                  f"pairs to drop: {counts['leaky_pairs']} of {report.train_pairs}", highlight=False)
    if report.clean:
        console.print(f"[green]clean:[/] {report.summary()}", highlight=False)
        return
    console.print(f"[bold red]leaks found:[/] {report.summary()}", highlight=False)
    raise typer.Exit(EXIT_LEAKS)

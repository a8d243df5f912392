"""``mlilt demo``: the README's first command."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mlilt.cli.common import console, flag, user_errors
from mlilt.demo.run import DEMO_EPOCHS, DEMO_SCENES

METRICS = ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
           "text_retrieval_recall@5", "mean_recall")


@user_errors
def demo_command(
    out: Annotated[str, typer.Option(help="Folder for the demo data and the trained pack.")] = "demo-out",
    lang: Annotated[str, typer.Option(help="Language to train.")] = "sw",
    n: Annotated[int, typer.Option(help="Demo scenes to generate.")] = DEMO_SCENES,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = DEMO_EPOCHS,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace a pack from an earlier demo.")] = False,
):
    """Generate demo data, train a pack offline with the default method, compare with the untrained model."""
    from mlilt.demo.run import run_demo  # noqa: E402 (heavy imports only when the command runs)

    result = run_demo(out, lang=lang, n=n, epochs=epochs, overwrite=overwrite, console=console)
    table = Table(title=f"held-out demo retrieval, {lang} ({result.test_pairs} captions), recall %")
    table.add_column("model")
    for metric in METRICS:
        table.add_column(metric.replace("image_retrieval_recall", "t2i R").replace("text_retrieval_recall", "i2t R"),
                         justify="right")
    table.add_row("untrained (same towers)", *[f"{result.before[m]:.1f}" for m in METRICS])
    table.add_row("trained pack", *[f"{result.after[m]:.1f}" for m in METRICS])
    console.print(table)
    console.print(f"pack: {result.pack}   total time {result.seconds:.0f} s")

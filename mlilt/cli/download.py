"""``mlilt data download``: fetch a retrieval benchmark and check what arrived."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from mlilt.cli.common import console, user_errors


class Benchmark(str, enum.Enum):
    xm3600 = "xm3600"
    xtd10 = "xtd10"


@user_errors
def download_command(
    benchmark: Annotated[Benchmark, typer.Argument(help="Benchmark to fetch.", case_sensitive=False)],
    root: Annotated[Path, typer.Option(help="Folder that gets <benchmark>/ (and .downloads/ for the archives), "
                                            "e.g. ~/data; pass the same --root to mlilt eval.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing xm3600 folder.")] = False,
):
    """Download a benchmark into ROOT, unpack it and verify it (re-run to resume).

    xm3600 is fetched whole. xtd10: only its caption files can be fetched; its 1,000 images are
    COCO train2014 files you copy into ROOT/xtd10/images/ (the command lists what is missing).
    """
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from mlilt.datasets import download_xm3600, download_xtd10

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        if benchmark is Benchmark.xm3600:
            report = download_xm3600(root, progress, overwrite=overwrite)
        else:
            report = download_xtd10(root, progress)
    console.print(report.summary(), highlight=False)
    if not report.ok:
        raise typer.Exit(1)

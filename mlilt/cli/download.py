"""``mlilt data download``: fetch a retrieval benchmark and check what arrived."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from mlilt.cli.common import console, flag, user_errors
from mlilt.datasets import DOWNLOADS

Benchmark = enum.Enum("Benchmark", {name: name for name in DOWNLOADS}, type=str)


@user_errors
def download_command(
    benchmark: Annotated[Benchmark, typer.Argument(help="Benchmark to fetch.", case_sensitive=False)],
    root: Annotated[Path, typer.Option(help="Folder that gets <benchmark>/ (and .downloads/ for the archives), "
                                            "e.g. ~/data; pass the same --root to mlilt eval.")],
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing xm3600 folder.")] = False,
):
    """Download a benchmark into ROOT, unpack it and verify it (re-run to resume).

    xm3600 is fetched whole. xtd10: only its caption files can be fetched; its 1,000 images are
    COCO train2014 files you copy into ROOT/xtd10/images/ (the command lists what is missing).
    """
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        report = DOWNLOADS[benchmark.value](root, progress, overwrite=overwrite)
    console.print(report.summary(), highlight=False)
    if not report.ok:
        raise typer.Exit(1)

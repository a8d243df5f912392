"""``mlilt bench``: run a study (or one of its cells) and write its report."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlilt.cli.common import console, flag, user_errors


@user_errors
def bench_command(
    config: Annotated[Path, typer.Option(help="Study config (YAML): towers, languages, methods, budgets, seeds, "
                                              "training settings, benchmark. See benchmarks/configs/.")],
    out: Annotated[Optional[Path], typer.Option(help="Study folder: cells/, logs/, results.csv/json, report.md, "
                                                     "plots/. Default: benchmarks/results/NAME.")] = None,
    jobs: Annotated[int, typer.Option(help="Cells run side by side, each in its own process (cores split "
                                           "evenly; one GPU each, round robin).")] = 1,
    cell: Annotated[Optional[str], typer.Option(help="Run only this cell, in this process (what each cell's "
                                                     "recorded command does).")] = None,
    force: Annotated[bool, flag("--force", help="Rerun cells that are already done.")] = False,
    list_cells: Annotated[bool, flag("--list", help="List the cells and which are done; run "
                                                            "nothing.")] = False,
    report_only: Annotated[bool, flag("--report-only", help="Rewrite the report from the finished "
                                                                    "cells; train nothing.")] = False,
):
    """Train and evaluate every cell of a study; skip finished cells; write tables, plots and a report."""
    from mlilt.studies import default_out, load_study
    from mlilt.errors import MliltError, UsageError

    study = load_study(config)
    out = out or default_out(study)
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if list_cells:
        return _list(study, out)
    if cell:
        return _one_cell(study, out, cell, force)
    if not report_only:
        from mlilt.studies.runner import run_study

        run = run_study(study, out, jobs=jobs, force=force, log=console.print)
    report = _report(study, out)
    console.print(f"report: {report}")
    if not report_only and run.failed:
        raise MliltError(f"{len(run.failed)} cell(s) failed: " + ", ".join(f"{c} (log: {log})"
                                                                       for c, log in run.failed.items()))


def _one_cell(study, out: Path, cell_id: str, force: bool) -> None:
    from mlilt.studies.cell import result_path, run_cell
    from mlilt.studies.runner import is_done, prepare_data

    chosen = study.cell(cell_id)
    if is_done(study, out, chosen) and not force:
        console.print(f"{cell_id} is already done ({result_path(out, chosen)}); pass --force to rerun it")
        return
    prepare_data(study, out)
    result = run_cell(study, out, chosen, console=console)
    console.print_json(data={lang: ev["metrics"] for lang, ev in result["eval"].items()})


def _list(study, out: Path) -> None:
    from mlilt.studies.runner import is_done

    for item in study.cells():
        console.print(f"{'done   ' if is_done(study, out, item) else 'pending'}  {item.id}", highlight=False)


def _report(study, out: Path) -> Path:
    from mlilt.studies.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    return write_report(study, out)

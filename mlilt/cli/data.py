"""``mlilt data ...``: make and inspect data."""
from __future__ import annotations

import enum
from typing import Annotated, Optional

import typer

from mlilt.cli.common import console, flag, user_errors
from mlilt.cli.check import check_command
from mlilt.cli.download import download_command
from mlilt.data.translate import FORMATS
from mlilt.data.translation_models import DTYPES

OutputFormat = enum.Enum("OutputFormat", {name: name for name in FORMATS}, type=str)
Dtype = enum.Enum("Dtype", {name: name for name in DTYPES}, type=str)

app = typer.Typer(help="Make, fetch and inspect image-caption data.", no_args_is_help=True)
app.command("download")(download_command)
app.command("check")(check_command)


@app.command("demo")
@user_errors
def demo_data(
    out: Annotated[str, typer.Option(help="Folder to write (images/, <lang>/train.jsonl, <lang>/test.jsonl).")],
    langs: Annotated[str, typer.Option(help="Comma-separated language codes.")] = "en,sw",
    n: Annotated[int, typer.Option(help="Number of scenes (images); each gets one caption per language.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Share of scenes in the test split.")] = 0.2,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing folder.")] = False,
):
    """Generate procedural demo data: shapes with compositional captions in several languages."""
    from mlilt.demo.data import generate_demo

    summary = generate_demo(out, [code.strip() for code in langs.split(",") if code.strip()], n=n, seed=seed,
                            test_fraction=test_fraction, overwrite=overwrite)
    console.print(f"wrote {summary.n} scenes in {', '.join(summary.langs)} to {summary.out}")
    for lang in summary.langs:
        files = summary.files(lang)
        console.print(f"  {lang}: {files['train']}  {files['test']}")


@app.command("languages")
def demo_languages():
    """List the languages the demo generator writes."""
    from mlilt.demo.data import demo_languages as languages

    console.print(" ".join(languages()))


@app.command("translate")
@user_errors
def translate_command(
    data: Annotated[str, typer.Option(help="Pairs to translate (.jsonl, .csv, .tsv, parquet, a dataset), or "
                                           "sentences (.txt, or a .tsv without an image column: its first column).")],
    to: Annotated[str, typer.Option(help="Target language: a short ISO code (sw) or the model's own (swh_Latn).")],
    model: Annotated[str, typer.Option(help="Seq2seq model, a Hub name or a folder: NLLB-200, M2M100, "
                                            "mBART-50 or Marian (OPUS-MT).")],
    out: Annotated[str, typer.Option(help="Output: .jsonl (pairs, or parallel JSON Lines) or .tsv (parallel).")],
    src: Annotated[Optional[str], typer.Option(help="Source language (default: the pairs' lang field, or "
                                                    "the Marian model's source).")] = None,
    format: Annotated[Optional[OutputFormat], typer.Option("--format", help="pairs (same images, translated captions) or "
                                                                   "parallel (source<TAB>target); default "
                                                                   "from --out and --data.")] = None,
    min_chrf: Annotated[Optional[float], typer.Option(help="Keep rows whose back-translation scores at least "
                                                           "this sentence chrF (0-100) against the source.",
                                                      min=0.0, max=100.0)] = None,
    back_model: Annotated[Optional[str], typer.Option(help="Model for the back-translation (default: --model; "
                                                           "required for Marian).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sentences per generate call.", min=1)] = 32,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1: greedy).", min=1)] = 4,
    max_length: Annotated[int, typer.Option(help="Most tokens per translation.", min=1)] = 256,
    device: Annotated[str, typer.Option(help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="auto: bfloat16 on GPUs that have it, else float32.")] = Dtype.auto,
    skip_bad: Annotated[bool, flag("--skip-bad", help="Skip malformed input rows instead of "
                                                              "stopping.")] = False,
    overwrite: Annotated[bool, flag("--overwrite", help="Start over, discarding a partial output; an "
                                                                "existing output is replaced when the new one "
                                                                "is complete.")] = False,
):
    """Machine-translate captions into another language: new pairs for the same images, or
    parallel sentences for `mlilt train --parallel`. Rerun the same command to resume."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mlilt.data.translate import translate_data

    # The bar starts with the first batch: argument and data errors print without one.
    bar = Progress(TextColumn("translating"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TimeRemainingColumn(), console=console, transient=False)

    def progress(done: int, total: int) -> None:
        if not bar.tasks:
            bar.start()
            bar.add_task("translate", total=total)
        bar.update(bar.tasks[0].id, completed=done)

    try:
        result = translate_data(data, out, to=to, model=model, src=src, fmt=format and format.value, back_model=back_model,
                                min_chrf=min_chrf, batch_size=batch_size, num_beams=num_beams,
                                max_length=max_length, device=device, dtype=dtype.value, overwrite=overwrite,
                                skip_bad=skip_bad, progress=progress)
    except KeyboardInterrupt:
        bar.stop()
        console.print(f"interrupted: finished batches are kept in {out}.partial; rerun the same command to resume")
        raise typer.Exit(130) from None
    finally:
        bar.stop()
    console.print(result.summary(), highlight=False)

"""``mlilt data ...``: make and inspect data."""
from __future__ import annotations

from typing import Annotated

import typer

from mlilt.cli.common import console, user_errors
from mlilt.cli.check import check_command
from mlilt.cli.download import download_command

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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing folder.")] = False,
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

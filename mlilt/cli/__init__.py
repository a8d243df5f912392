"""The ``mlilt`` command: thin Typer apps over the Python API, one module per group."""
from __future__ import annotations

from typing import Annotated

import typer

from mlilt.cli import data, packs, towers
from mlilt.cli.bench import bench_command
from mlilt.cli.demo import demo_command
from mlilt.cli.evaluate import eval_command
from mlilt.cli.train import train_command

app = typer.Typer(name="mlilt", no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Language packs for CLIP-like image-text models: frozen multilingual towers, "
                       "a few MB of trained parameters per language.")


def _print_version(asked: bool) -> None:
    if asked:
        from mlilt import __version__

        typer.echo(f"mlilt {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.",
                                                   metavar="", is_eager=True,
                                                   callback=_print_version)] = False) -> None:
    # Options of the mlilt command itself; the app's help text is the Typer's.
    return None
app.command("train")(train_command)
app.command("demo")(demo_command)
app.command("eval")(eval_command)
app.command("bench")(bench_command)
app.add_typer(data.app, name="data")
app.add_typer(packs.app, name="packs")
app.add_typer(towers.app, name="towers")


def main() -> None:
    """The ``mlilt`` command (and ``python -m mlilt``, ``torchrun -m mlilt``)."""
    app()

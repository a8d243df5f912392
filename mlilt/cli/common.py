"""What every command shares: the console, and turning user errors into a message and an
exit code instead of a traceback."""
from __future__ import annotations

import functools

import typer
from rich.console import Console

from mlilt.errors import MliltError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # never break a path in two

EXIT_FAILURE = 1  # something failed that is not the user's input (and uncaught errors)


def flag(*names: str, help: str):
    """An on/off option, shown in --help as a bare flag (click would show a '<bool>' value)."""
    return typer.Option(*names, help=help, metavar="")


def user_errors(command):
    """Print an ``MliltError``'s message (no traceback) and exit with its code."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MliltError as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False)
            raise typer.Exit(error.exit_code) from None
        except FileExistsError as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: nothing was written")
            raise typer.Exit(130) from None
    return wrapper

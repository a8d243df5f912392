"""``mlilt towers list``."""
from __future__ import annotations

import typer
from rich.table import Table

from mlilt.cli.common import console

app = typer.Typer(help="Towers mlilt can use.", no_args_is_help=True)


@app.command("list")
def list_command():
    """Embedded (offline) towers and the kinds of hub names accepted."""
    from mlilt.towers.registry import list_towers

    table = Table("tower", "side", "offline", "what")
    for info in list_towers():
        table.add_row(info.spec, info.side, "yes" if info.offline else "needs a network", info.source)
    console.print(table)

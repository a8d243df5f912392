"""``mlilt packs ...``: list, inspect and verify language packs."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mlilt.cli.common import console, user_errors

app = typer.Typer(help="List, inspect and verify language packs.", no_args_is_help=True)


@app.command("list")
@user_errors
def list_command():
    """Packs known by name (indexes in $MLILT_PACKS, ./langpacks, ~/.cache/mlilt/packs)."""
    from mlilt.packs import list_packs, pack_search_dirs

    table = Table("name", "language", "method", "path")
    for name, path, entry in list_packs():
        table.add_row(name, entry.get("language", "?"), entry.get("method", "?"), str(path))
    console.print(table)
    console.print(f"searched: {', '.join(str(d) for d in pack_search_dirs())}")


@app.command("info")
@user_errors
def info_command(pack: Annotated[str, typer.Argument(help="Pack folder or indexed name.")]):
    """Show a pack's language, method, towers, data and metrics."""
    from mlilt.packs import PACK_TENSORS, read_pack

    loaded = read_pack(pack)
    config = loaded.config
    size = (loaded.path / PACK_TENSORS).stat().st_size
    table = Table(show_header=False)
    rows = [("path", str(loaded.path)), ("language", config.language), ("method", config.method),
            ("image side", f"{config.image_method} ({config.image_side_id[:12]})"),
            ("anchor", config.anchor["name"] if config.anchor else "none (this pack can anchor others)"),
            ("text tower", f"{config.towers['text']['spec']} ({config.towers['text']['fingerprint'][:12]})"),
            ("image tower", f"{config.towers['image']['spec']} ({config.towers['image']['fingerprint'][:12]})"),
            ("tensors", f"{len(loaded.tensors)} ({size / 1e6:.2f} MB)"),
            ("data", f"{config.data.get('rows', '?')} pairs, sha256 {str(config.data.get('sha256', ''))[:12]}"),
            ("val metrics", ", ".join(f"{k} {v:.1f}" for k, v in config.metrics.get("val", {}).items())),
            ("mlilt", f"{config.mlilt_version}, format {config.format_version}, {config.created}")]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command("verify")
@user_errors
def verify_command(pack: Annotated[str, typer.Argument(help="Pack folder or indexed name.")]):
    """Check a pack's files, tensors and tower fingerprints by loading it onto its towers."""
    import mlilt

    model = mlilt.load(pack)
    console.print(f"[green]ok:[/] {pack} loads onto its towers ({', '.join(model.languages)})")

"""``mlilt packs ...``: list, inspect, verify, export, push and pull language packs."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mlilt.cli.common import console, user_errors

app = typer.Typer(help="List, inspect, verify, export, push and pull language packs.", no_args_is_help=True)


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


class ExportFormat(str, Enum):
    sentence_transformers = "sentence-transformers"
    peft = "peft"


@app.command("export")
@user_errors
def export_command(
    pack: Annotated[str, typer.Argument(help="Pack folder or indexed name.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="sentence-transformers: the text side as a "
                                                 "SentenceTransformer folder; peft: a PEFT adapter.")],
    out: Annotated[Path, typer.Option(help="Folder to write (must not exist, or be empty).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in --out.")] = False,
):
    """Write a pack's text side in another library's format (docs/export.md)."""
    from mlilt.export import export_pack

    written = export_pack(pack, format.value, out, overwrite=overwrite)
    console.print(f"[green]exported:[/] {pack} as {format.value} to {written}", highlight=False, soft_wrap=True)
    if format is ExportFormat.sentence_transformers:
        console.print(f'load it with SentenceTransformer("{written}", trust_remote_code=True) (needs mlilt)',
                      highlight=False, soft_wrap=True)


@app.command("push")
@user_errors
def push_command(
    pack: Annotated[str, typer.Argument(help="Pack folder or indexed name.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repo USER/REPO (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to (created if missing).")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Tag the new commit (load it as hf://USER/REPO@TAG).")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="The commit's message.")] = None,
    license: Annotated[Optional[str], typer.Option(help="The card's licence id (default apache-2.0): "
                                                        "your data's and towers' terms.")] = None,
    card: Annotated[Optional[Path], typer.Option(help="Upload this README.md instead of the generated card.",
                                                 exists=True, dir_okay=False)] = None,
    token: Annotated[Optional[str], typer.Option(help="Hub token (default: HF_TOKEN or `hf auth login`).")] = None,
):
    """Upload a pack and a generated model card (README.md) to a Hugging Face Hub model repo."""
    from mlilt.hub import push

    pushed = push(pack, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
                  license=license, card=card, tag=tag)
    if license is None and card is None:
        console.print("card licence: apache-2.0 (the default; pass --license for your data's and towers' terms)")
    console.print(f"[green]pushed:[/] {pushed.url}")
    console.print(f'load it with mlilt.load("hf://{pushed.repo_id}{"@" + tag if tag else ""}")')


@app.command("pull")
@user_errors
def pull_command(
    repo_id: Annotated[str, typer.Argument(help="USER/REPO, hf://USER/REPO or hf://USER/REPO@REVISION.")],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit (default: main).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also copy the pack into this folder (default: "
                                                     "the Hugging Face cache only).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a pack already in --out.")] = False,
    force_download: Annotated[bool, typer.Option("--force-download", help="Download again even if cached "
                                                                          "(repairs a damaged cache).")] = False,
    token: Annotated[Optional[str], typer.Option(help="Hub token for private repos (default: HF_TOKEN or "
                                                      "`hf auth login`).")] = None,
):
    """Download a pack from the Hub into its cache (HF_HUB_CACHE), check it, optionally copy it."""
    from mlilt.hub import pull

    pulled = pull(repo_id, revision=revision, out=out, overwrite=overwrite, force_download=force_download,
                  token=token)
    config = pulled.pack.config
    console.print(f"[green]ok:[/] {pulled.ref} (commit {pulled.commit[:12]}): {config.language} pack, "
                  f"{config.method}, checked")
    console.print(f"at: {pulled.path}", highlight=False, soft_wrap=True)
    console.print(f'load it with mlilt.load("{pulled.path if out else pulled.ref}")', highlight=False, soft_wrap=True)

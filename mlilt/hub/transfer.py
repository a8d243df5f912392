"""Moving packs to and from the Hub: ``push`` (a checked pack folder and its card, one commit),
``snapshot`` (a revision into the Hub's cache, offline mode honoured), ``pull`` (that, checked,
optionally copied into a folder atomically) and ``resolve_hub_pack`` (the ``hf://`` hook of
``packs.resolve_pack``).

What can go wrong on the way is refused, never used: an interrupted download (a snapshot
missing files), a snapshot whose bytes fail the pack's own checks (``tensors_sha256``,
``image_side_id``), a repo that holds no pack. A card that describes another pack than the
revision's ``langpack.json`` is a warning: the pack is still right, the card's numbers are not
its numbers.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlilt.errors import MliltError, PackError, UsageError
from mlilt.files import atomic
from mlilt.packs import PACK_CONFIG, PACK_TENSORS, Pack, check_pack_destination, read_pack

HF_SCHEME = "hf://"
METRICS_FILE = "metrics.jsonl"  # the per-epoch history the trainer writes beside the pack
CARD_FILE = "README.md"
PACK_FILES = (PACK_CONFIG, PACK_TENSORS, METRICS_FILE)
DOWNLOAD_PATTERNS = [*PACK_FILES, CARD_FILE]  # nothing else of a repo is downloaded


@dataclass(frozen=True)
class HubRef:
    """A model repo and, optionally, a revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HF_SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")

    def pull_command(self) -> str:
        return f"mlilt packs pull {self.repo_id}" + (f" --revision {self.revision}" if self.revision else "")


def parse_hub_ref(spec: str, revision: str | None = None) -> HubRef:
    """``hf://user/repo``, ``hf://user/repo@REV`` or ``user/repo``; ``revision`` (``--revision``)
    may be given instead of ``@REV``, not as well with another value."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = spec[len(HF_SCHEME):] if spec.startswith(HF_SCHEME) else spec
    repo_id, at, named = text.partition("@")
    if at and not named:
        raise UsageError(f"{spec!r}: nothing after '@'; write {HF_SCHEME}USER/REPO@REVISION (a branch, tag or commit)")
    if named and revision and named != revision:
        raise UsageError(f"{spec!r} names revision {named!r} but --revision is {revision!r}; give one")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{spec!r}: not a Hub model repo id USER/REPO ({error})") from error
    return HubRef(repo_id, named or revision or None)


# ---- download ---------------------------------------------------------------------------

def snapshot(ref: HubRef, force_download: bool = False, token: str | None = None,
             local_files_only: bool | None = None) -> Path:
    """The revision's pack files in the Hub's cache (downloaded unless cached and offline).

    ``local_files_only`` defaults to huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``).
    Nothing is checked here; ``pull`` and ``resolve_hub_pack`` check what this returns.
    """
    from huggingface_hub import constants, snapshot_download

    from mlilt import __version__

    offline = bool(constants.HF_HUB_OFFLINE) if local_files_only is None else local_files_only
    if offline and force_download:
        raise UsageError(f"{ref}: --force-download needs the network, but {_offline_reason(local_files_only)}")
    try:
        folder = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=DOWNLOAD_PATTERNS,
                                   local_files_only=offline, force_download=force_download, token=token,
                                   library_name="mlilt", library_version=__version__)
    except Exception as error:
        translated = _download_error(error, ref, offline, local_files_only)
        if translated is None:
            raise
        raise translated from error
    return Path(folder)


def _download_error(error: Exception, ref: HubRef, offline: bool, local_files_only: bool | None) -> PackError | None:
    """The PackError a failed ``snapshot_download`` means for a pack (None: not the Hub's error)."""
    from huggingface_hub import constants, errors

    incomplete = getattr(errors, "IncompleteSnapshotError", None)  # huggingface_hub >= 1: found offline
    if incomplete is not None and isinstance(error, incomplete):
        return PackError(f"{ref}: the cached download is incomplete (interrupted?) and cannot be finished "
                         f"without the Hub ({error}). With network access, run `{ref.pull_command()}`")
    if isinstance(error, errors.LocalEntryNotFoundError):
        if offline:
            return PackError(f"{ref} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                             f"{_offline_reason(local_files_only)}, so it was not downloaded. With network "
                             f"access run `{ref.pull_command()}` once (or unset HF_HUB_OFFLINE), or point "
                             f"HF_HUB_CACHE at a cache that holds it")
        return PackError(f"{ref}: the Hub could not be reached and the revision is not cached: {error}")
    if isinstance(error, errors.RevisionNotFoundError):
        return PackError(f"{ref}: the repo has no revision {ref.revision or 'main'!r} (a branch, tag or commit)")
    if isinstance(error, errors.RepositoryNotFoundError):  # also gated repos and private ones without a token
        return PackError(f"{ref}: no such model repo on the Hub, or it is private or gated: log in "
                         f"(`hf auth login`, or set HF_TOKEN) with an account that may read it")
    if isinstance(error, errors.HfHubHTTPError):
        return PackError(f"{ref}: the Hub refused the download ({error})")
    return None


def _offline_reason(local_files_only: bool | None) -> str:
    return "local_files_only=True" if local_files_only else "offline mode is on (HF_HUB_OFFLINE=1)"


def check_snapshot(folder: Path, ref: HubRef, quiet: bool = False) -> Pack:
    """``read_pack`` of a downloaded snapshot, its failures named as the download's; ``quiet``:
    without read_pack's own warnings (given again when the caller reads the folder)."""
    commit = folder.name
    where = f"{ref} (commit {commit[:12]}, {folder})"
    present = [name for name in (PACK_CONFIG, PACK_TENSORS) if (folder / name).is_file()]
    if not present:
        raise PackError(f"{where} holds no mlilt pack: no {PACK_CONFIG} or {PACK_TENSORS} at this revision")
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            pack = read_pack(folder)
    except PackError as error:
        raise PackError(f"{where}: {error}. The download is incomplete, damaged or was changed in the cache; "
                        f"nothing from it was used. Download it again: `{ref.pull_command()} "
                        f"--force-download`") from error
    _check_card(folder, pack, ref)
    return pack


def _check_card(folder: Path, pack: Pack, ref: HubRef) -> None:
    """Warn when the revision's model card was generated for another pack (a stale card)."""
    from huggingface_hub.repocard import metadata_load

    card = folder / CARD_FILE
    if not card.is_file():
        return
    try:
        recorded = (metadata_load(card) or {}).get("mlilt") or {}
    except Exception:  # a hand-written card with broken YAML: the pack itself is still checked
        return
    described = recorded.get("tensors_sha256") if isinstance(recorded, dict) else None
    actual = pack.config.tensors_sha256
    if described is not None and actual and str(described) != actual:
        warnings.warn(f"{ref}: its model card ({CARD_FILE}) describes another pack (tensors {str(described)[:12]}; "
                      f"this revision's pack has {actual[:12]}): the card's numbers are not this pack's. "
                      f"`mlilt packs info` shows the pack's own record", stacklevel=3)


def resolve_hub_pack(spec: str) -> Path:
    """The checked local snapshot folder of ``hf://user/repo[@revision]`` (``resolve_pack``'s hook)."""
    ref = parse_hub_ref(spec)
    folder = snapshot(ref)
    check_snapshot(folder, ref, quiet=True)
    return folder


@dataclass
class Pulled:
    ref: HubRef
    commit: str
    snapshot: Path  # the folder in the Hub's cache
    path: Path  # where the pack is now: ``out`` if given, else ``snapshot``
    pack: Pack


def pull(spec: str, revision: str | None = None, out: str | Path | None = None, overwrite: bool = False,
         force_download: bool = False, token: str | None = None) -> Pulled:
    """Download (or find cached) a pack revision, check it, and copy it to ``out`` if given.

    ``out`` is written atomically and only after the snapshot passed every check; an existing
    pack there is replaced only with ``overwrite`` (refused before any download).
    """
    ref = parse_hub_ref(spec, revision)
    if out is not None:
        check_pack_destination(out, overwrite)
    folder = snapshot(ref, force_download=force_download, token=token)
    pack = check_snapshot(folder, ref)
    if out is None:
        return Pulled(ref, folder.name, folder, folder, pack)
    out = Path(out)
    with atomic.staged_dir(out, replace=True) as stage:
        for name in DOWNLOAD_PATTERNS:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, stage / name)  # follows the cache's links to its blobs
        with warnings.catch_warnings():  # already said about the snapshot
            warnings.simplefilter("ignore")
            read_pack(stage)  # the copy is what was checked, byte for byte
    return Pulled(ref, folder.name, folder, out, Pack(out, pack.config, pack.tensors))


# ---- upload -----------------------------------------------------------------------------

@contextlib.contextmanager
def prepared_upload(pack: Pack, repo_id: str, license: str | None = None,
                    card: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder holding exactly what ``push`` uploads: the pack's files and README.md
    (``card``'s text, else one generated from the pack). The pack folder itself is not touched."""
    from mlilt.hub.card import model_card

    text = Path(card).read_text(encoding="utf-8") if card is not None else model_card(pack, repo_id, license)
    with tempfile.TemporaryDirectory(prefix="mlilt-push-") as tmp:
        stage = Path(tmp)
        for name in PACK_FILES:
            if (pack.path / name).is_file():
                shutil.copyfile(pack.path / name, stage / name)
        (stage / CARD_FILE).write_text(text, encoding="utf-8")
        with warnings.catch_warnings():  # already said when the pack was read
            warnings.simplefilter("ignore")
            staged = read_pack(stage)  # what goes up is the pack that was checked
        if staged.config.tensors_sha256 != pack.config.tensors_sha256:
            raise PackError(f"{pack.path} changed while it was being staged for upload; push again")
        yield stage


@dataclass
class Pushed:
    repo_id: str
    revision: str | None
    commit: str
    url: str


def push(pack_path: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, license: str | None = None,
         card: str | Path | None = None, tag: str | None = None) -> Pushed:
    """Upload a pack folder and its model card to a model repo (created if missing), one commit.

    The pack is read and checked, and the repo id parsed, before any network call. ``revision``
    is a branch (created from the default branch if missing); ``tag`` tags the new commit.
    The token is huggingface_hub's (``HF_TOKEN``, ``hf auth login``) unless ``token`` is given.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HfHubHTTPError

    from mlilt import __version__

    pack = read_pack(pack_path)
    ref = parse_hub_ref(repo_id, revision)
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"push to {ref.repo_id} needs the network, but offline mode is on (HF_HUB_OFFLINE=1)")
    message = commit_message or f"mlilt {__version__}: {pack.config.language} pack ({pack.config.method})"
    # Pack files the new commit lacks (an old metrics.jsonl) are deleted: the repo is one pack.
    stale = [name for name in PACK_FILES if not (pack.path / name).is_file()]
    with prepared_upload(pack, ref.repo_id, license, card) as stage:
        try:
            api = HfApi(token=token, library_name="mlilt", library_version=__version__)
            api.create_repo(ref.repo_id, private=True if private else None, exist_ok=True)
            if ref.revision:
                api.create_branch(ref.repo_id, branch=ref.revision, exist_ok=True)
            info = api.upload_folder(repo_id=ref.repo_id, folder_path=stage, revision=ref.revision,
                                     commit_message=message, delete_patterns=stale or None)
            if tag:
                api.create_tag(ref.repo_id, tag=tag, revision=info.oid)
        except HfHubHTTPError as error:
            raise MliltError(f"push to {ref.repo_id}: the Hub refused ({error}). Pushing needs a token with write "
                             f"access: `hf auth login`, HF_TOKEN, or --token") from error
    return Pushed(ref.repo_id, ref.revision, info.oid, info.commit_url)

"""Write files and folders so that a reader never sees half of them.

Everything mlilt hands to a user (packs, caches, results) goes through here: the content is
written beside its destination under a temporary name and renamed into place, which POSIX
makes atomic on one filesystem.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, ".tmp")
    # O_EXCL under a fresh name, mode 0666: the process umask applies as it would to open(path, "w").
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``dest`` only if the block succeeds.

    With ``replace=False`` an existing ``dest`` is an error (raised before anything is
    written). With ``replace=True`` the old folder is swapped out only after the new one is
    complete, so a failure leaves the old one untouched.
    """
    dest = Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(dest, ".partial")
    stage.mkdir()  # plain mkdir: the umask gives the permissions a user expects of a new folder
    try:
        yield stage
        if dest.exists():
            old = _sibling(dest, ".old")
            os.replace(dest, old)
            os.replace(stage, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _sibling(path: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``path`` (same filesystem, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"

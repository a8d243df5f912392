"""On-disk cache of frozen image-tower features.

Frozen means cached: when nothing on the image side's tower trains, its output for an image
never changes, so it is computed once and reused across epochs, runs, languages and
benchmarks. A key is (tower fingerprint — weights + config incl. preprocessing — , image
content hash): a change of tower, preprocessing or pixels can never serve a stale entry.
Each entry is one small .npy written atomically; a corrupt or partial entry is detected on
read and recomputed, and concurrent writers only ever replace a file with an equal one.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from mlilt.files import atomic
from mlilt.data.images import ImageLike, image_id, load_image
from mlilt.files.paths import cache_dir
from mlilt.towers.image import ImageTower


class FeatureCache:
    """Entries of one frozen function (an image tower, a distillation teacher: anything with a
    ``fingerprint()`` and a ``width``), one .npy per key."""

    def __init__(self, tower: ImageTower, root: Path | None = None):
        self.tower = tower
        self.folder = (root or cache_dir() / "features") / tower.fingerprint()[:24]
        self.hits = 0
        self.misses = 0
        self._warned = False

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            features = np.load(self._file(key), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # absent, partial or corrupt: recompute
        if features.shape != (self.tower.width,) or features.dtype != np.float32 or not np.isfinite(features).all():
            return None
        return features

    def put(self, key: str, features: np.ndarray) -> None:
        """Store an entry; a cache that cannot be written (read-only, full, something in the
        way) costs recomputation next time, never the features of this run."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        try:
            atomic.write_bytes(self._file(key), buffer.getvalue())
        except OSError as error:
            if not self._warned:
                self._warned = True
                warnings.warn(f"feature cache {self.folder}: cannot write entries ({error}); "
                              f"features are computed but not cached", stacklevel=3)


def tower_features(tower: ImageTower, images: list[ImageLike], batch_size: int = 32,
                   cache: FeatureCache | None = None, sources: list[str] | None = None,
                   progress=None) -> torch.Tensor:
    """Pooled features [N, width] of a frozen image tower, through the cache when given."""
    def compute(chunk: list[int]) -> np.ndarray:
        pixels = torch.stack([tower.preprocess(load_image(images[i], sources[i] if sources else None))
                              for i in chunk])
        with torch.no_grad():  # the tower may sit on a GPU (training moves it there)
            return tower(pixels.to(next(tower.parameters()).device)).float().cpu().numpy()

    keys = [image_id(img) for img in images] if cache is not None else None
    return cached_rows(len(images), tower.width, compute, keys, cache, batch_size, progress)


def cached_rows(count: int, width: int, compute, keys: list[str] | None = None, cache: FeatureCache | None = None,
                batch_size: int = 32, progress=None) -> torch.Tensor:
    """Rows [count, width] of a frozen function: ``compute(indices)`` gives the rows of those
    indices (an array), run in batches for those that ``cache`` (entries by ``keys``) lacks."""
    found: dict[int, np.ndarray] = {}
    if cache is not None:
        for index, key in enumerate(keys):
            cached = cache.get(key)
            if cached is not None:
                found[index] = cached
        cache.hits += len(found)
        if progress is not None and found:
            progress(len(found))  # done already: a bar over all rows reaches its end
    todo = [i for i in range(count) if i not in found]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for i, row in zip(chunk, compute(chunk)):
            found[i] = row
            if cache is not None:
                cache.put(keys[i], row)
        if progress is not None:
            progress(len(chunk))
    if cache is not None:
        cache.misses += len(todo)
    if not count:
        return torch.empty(0, width)
    return torch.from_numpy(np.stack([found[i] for i in range(count)]))

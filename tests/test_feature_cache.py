"""The frozen-feature cache: damaged entries are recomputed, changed pixels get new keys,
other towers and other preprocessing never share entries, and concurrent writers (real
processes) leave every entry valid.

Tower calls are counted by a forward hook (``tiny_towers.ForwardCalls``); images are real PNG files.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlilt.data.feature_cache import FeatureCache, tower_features
from mlilt.data.images import image_id
from mlilt.towers.timm_vision import TimmImageTower
from mlilt.towers.preprocess import ImagePreprocess
from tiny_towers import PREPROCESS, ForwardCalls, tiny_timm_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, seed: int, size: int = 40) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def tower():
    return tiny_timm_cnn()


@pytest.fixture
def images(tmp_path):
    return [_png(tmp_path / "images" / f"{i}.png", i) for i in range(5)]


def _features(tower, images, cache, batch_size=4):
    calls = ForwardCalls(tower)
    features = tower_features(tower, images, batch_size=batch_size, cache=cache)
    calls.handle.remove()
    return features, calls.count


def test_second_pass_is_served_from_the_cache(tower, images, tmp_path):
    cache = FeatureCache(tower, tmp_path / "cache")
    first, calls = _features(tower, images, cache)
    assert calls == 2 and first.shape == (5, tower.width) and torch.isfinite(first).all()
    again, calls = _features(tower, images, FeatureCache(tower, tmp_path / "cache"))
    assert calls == 0 and torch.equal(again, first)
    uncached, _ = _features(tower, images, None)
    assert torch.allclose(uncached, first, atol=1e-6)


def _entry(cache, image) -> Path:
    return cache._file(image_id(image))


def _damage_truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _damage_header_only(path):
    path.write_bytes(path.read_bytes()[:20])


def _damage_empty(path):
    path.write_bytes(b"")


def _damage_garbage(path):
    path.write_bytes(os.urandom(300))


def _damage_wrong_shape(path):
    np.save(path, np.zeros(7, dtype=np.float32))


def _damage_2d(path):
    width = np.load(path).shape[0]
    np.save(path, np.zeros((1, width), dtype=np.float32))


def _damage_wrong_dtype(path):
    np.save(path, np.load(path).astype(np.float64))


def _damage_nan(path):
    values = np.load(path)
    values[3] = np.nan
    np.save(path, values)


def _damage_inf(path):
    values = np.load(path)
    values[0] = np.inf
    np.save(path, values)


def _damage_pickle(path):
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)


def _damage_directory(path):
    path.unlink()
    path.mkdir()


DAMAGE = [_damage_truncate, _damage_header_only, _damage_empty, _damage_garbage, _damage_wrong_shape, _damage_2d,
          _damage_wrong_dtype, _damage_nan, _damage_inf, _damage_pickle, _damage_directory]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.removeprefix("_damage_"))
def test_damaged_entry_is_recomputed(tower, images, tmp_path, damage):
    cache = FeatureCache(tower, tmp_path / "cache")
    clean, _ = _features(tower, images, cache, batch_size=1)
    damage(_entry(cache, images[2]))
    fresh = FeatureCache(tower, tmp_path / "cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, calls = _features(tower, images, fresh, batch_size=1)
    assert calls == 1, "exactly the damaged entry is recomputed"
    assert (fresh.hits, fresh.misses) == (4, 1)
    assert torch.equal(again, clean)
    unwritable = [w for w in caught if "cannot write entries" in str(w.message)]
    if damage is _damage_directory:  # a folder in the way cannot be replaced: the features still come back
        assert len(unwritable) == 1
        return
    assert unwritable == []
    repaired = np.load(_entry(cache, images[2]), allow_pickle=False)
    assert repaired.dtype == np.float32 and np.array_equal(repaired, clean[2].numpy())
    _, calls = _features(tower, images, FeatureCache(tower, tmp_path / "cache"), batch_size=1)
    assert calls == 0


def test_rewritten_image_gets_a_new_key(tower, images, tmp_path):
    cache = FeatureCache(tower, tmp_path / "cache")
    before, _ = _features(tower, images, cache, batch_size=1)
    old_key = image_id(images[1])
    _png(images[1], seed=99)  # same name, same size on disk, other pixels
    assert image_id(images[1]) != old_key
    after, calls = _features(tower, images, cache, batch_size=1)
    assert calls == 1
    assert not torch.allclose(after[1], before[1])
    assert torch.equal(after[[0, 2, 3, 4]], before[[0, 2, 3, 4]])
    alone, _ = _features(tower, [images[1]], None)
    assert torch.allclose(after[1], alone[0], atol=1e-6)


def test_rewrite_within_the_same_timestamp_gets_a_new_key(tower, images, tmp_path):
    """An edit that keeps the size and the mtime (a fast rewrite, or a restored timestamp)
    must still change the key: the content is what counts."""
    cache = FeatureCache(tower, tmp_path / "cache")
    before, _ = _features(tower, images, cache, batch_size=1)
    stat = images[1].stat()
    data = bytearray(images[1].read_bytes())
    replacement = _png(tmp_path / "other.png", seed=123).read_bytes()
    assert len(replacement) == len(data)  # random noise PNGs of one size compress to one size
    images[1].write_bytes(replacement)
    os.utime(images[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after, calls = _features(tower, images, cache, batch_size=1)
    assert calls == 1
    assert not torch.allclose(after[1], before[1])


def test_other_weights_use_another_folder(tower, images, tmp_path):
    other = tiny_timm_cnn()
    with torch.no_grad():
        next(other.parameters()).add_(1e-2)
    other._fingerprint = None
    assert other.fingerprint() != tower.fingerprint()
    first, second = FeatureCache(tower, tmp_path / "cache"), FeatureCache(other, tmp_path / "cache")
    assert first.folder != second.folder
    _features(tower, images, first)
    theirs, calls = _features(other, images, second)
    assert calls == 2 and (second.hits, second.misses) == (0, 5)
    ours, _ = _features(tower, images, None)
    assert not torch.allclose(theirs, ours)


@pytest.mark.parametrize("preprocess", [
    ImagePreprocess(36, 32, PREPROCESS.mean, PREPROCESS.std, PREPROCESS.interpolation),
    ImagePreprocess(32, 32, (0.4, 0.5, 0.5), PREPROCESS.std, PREPROCESS.interpolation),
    ImagePreprocess(32, 32, PREPROCESS.mean, PREPROCESS.std, "bicubic"),
], ids=["resize", "mean", "interpolation"])
def test_other_preprocessing_uses_another_folder(tower, images, tmp_path, preprocess):
    same_weights = TimmImageTower(tower.spec, tower.model, preprocess).freeze()
    assert same_weights.fingerprint() != tower.fingerprint()
    first, second = FeatureCache(tower, tmp_path / "cache"), FeatureCache(same_weights, tmp_path / "cache")
    assert first.folder != second.folder
    _features(tower, images, first)
    _, calls = _features(same_weights, images, second)
    assert calls == 2 and second.hits == 0


def test_same_tower_rebuilt_shares_the_folder(tower, tmp_path):
    assert FeatureCache(tiny_timm_cnn(), tmp_path).folder == FeatureCache(tower, tmp_path).folder


# --------------------------------------------------------------------------- concurrent processes


def _worker(paths, root, barrier, queue):
    torch.set_num_threads(1)
    tower = tiny_timm_cnn()
    cache = FeatureCache(tower, Path(root))
    barrier.wait(timeout=120)
    for _ in range(2):  # a second pass reads what the others wrote
        tower_features(tower, paths, batch_size=1, cache=cache)
    queue.put((cache.hits, cache.misses))


def test_concurrent_processes_leave_valid_equal_entries(tower, tmp_path):
    paths = [_png(tmp_path / "images" / f"{i}.png", 1000 + i, size=36) for i in range(24)]
    reference = tower_features(tower, paths, batch_size=1)  # single process, no cache
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_worker, args=(paths, str(root), barrier, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [w.exitcode for w in workers] == [0, 0]
    counts = [queue.get(timeout=5) for _ in workers]
    assert all(hits + misses == 48 and hits >= 24 for hits, misses in counts)  # the second pass always hits

    cache = FeatureCache(tower, root)
    for path, expected in zip(paths, reference):
        entry = np.load(cache._file(image_id(path)), allow_pickle=False)
        assert entry.dtype == np.float32 and entry.shape == (tower.width,)
        assert np.array_equal(entry, expected.numpy())
    leftovers = [p.name for p in cache.folder.rglob("*") if p.is_file() and not p.name.endswith(".npy")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    cached, calls = _features(tower, paths, cache, batch_size=1)
    assert calls == 0 and torch.equal(cached, reference)

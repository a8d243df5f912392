"""Shared test set-up: no network, a private cache, tiny towers built once per session."""
from __future__ import annotations

import os

# Tests never reach a hub: set before transformers/huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path_factory, monkeypatch):
    """Feature caches and packs of one test never leak into another or into ~/.cache.

    The converted offline tower is reused across tests (it is deterministic and expensive):
    it lives in a session folder linked into each private cache.
    """
    cache = tmp_path_factory.mktemp("mlilt-cache")
    towers = _session_towers_dir(tmp_path_factory)
    (cache / "towers").symlink_to(towers, target_is_directory=True)
    monkeypatch.setenv("MLILT_CACHE", str(cache))
    monkeypatch.setenv("MLILT_PACKS", str(cache / "no-packs-here"))


_TOWERS_DIR = []


def _session_towers_dir(tmp_path_factory):
    if not _TOWERS_DIR:
        shared = os.environ.get("MLILT_TEST_TOWERS")  # CI may point this at a persistent folder
        path = tmp_path_factory.getbasetemp() / "shared-towers" if not shared else __import__("pathlib").Path(shared)
        path.mkdir(parents=True, exist_ok=True)
        _TOWERS_DIR.append(path)
    return _TOWERS_DIR[0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny towers gain nothing from intra-op threads; on small machines the hand-off costs
    100x the work itself. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_vit_towers():
    """Tiny BERT + tiny timm ViT registered under their specs for one module, then unregistered."""
    from tiny_towers import tiny_text_tower, tiny_timm_vit

    yield from _registered(tiny_text_tower(), tiny_timm_vit())


@pytest.fixture(scope="module")
def tiny_cnn_towers():
    """Tiny BERT + tiny timm CNN (BatchNorm + activation blocks) registered for one module."""
    from tiny_towers import tiny_text_tower, tiny_timm_cnn

    yield from _registered(tiny_text_tower(), tiny_timm_cnn())


def _registered(text, image):
    from mlilt.towers.registry import registered

    with registered(text, image):
        yield {"text": text, "image": image}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep load_dataset's converted copies out of the user's cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()
    return datasets

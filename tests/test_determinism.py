"""Same seed, same data, same machine: the same pack, byte for byte (CPU).

Two trainings with tiny towers into two folders must give identical ``langpack.safetensors``
bytes and equal ``langpack.json`` apart from ``created``. The tensor writer itself must not
depend on hash order: the safetensors library emits its metadata map in an order that
varies from call to call (and between processes).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load

from mlilt.demo.data import generate_demo
from mlilt.packs import PACK_CONFIG, PACK_TENSORS, serialize_tensors
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_SPEC, IMAGE_SPEC = "tiny-bert-0", "tiny-timm-vit"


@pytest.fixture(scope="module")
def towers(tiny_vit_towers):
    return tiny_vit_towers


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("det") / "demo", ["sw"], n=40, image_size=32)


def _train(demo, out, cache, method="ln+adapter", seed=0):
    config = TrainConfig(lang="sw", data=str(demo.files("sw")["train"]), out=str(out), text_tower=TEXT_SPEC,
                         image_tower=IMAGE_SPEC, embed_dim=16, epochs=2, batch_size=8, method=method, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLILT_CACHE", str(cache))
        return train(config).pack


@pytest.mark.parametrize("method", ["ln+adapter", "lora"])
def test_same_seed_gives_the_same_pack_bytes(towers, demo, tmp_path, method):
    # separate caches: the second run must not get its determinism from the first one's cache
    first = _train(demo, tmp_path / "a", tmp_path / "cache-a", method)
    second = _train(demo, tmp_path / "b", tmp_path / "cache-b", method)
    assert (first / PACK_TENSORS).read_bytes() == (second / PACK_TENSORS).read_bytes()
    configs = [json.loads((p / PACK_CONFIG).read_text(encoding="utf-8")) for p in (first, second)]
    for config in configs:
        config.pop("created")
    assert configs[0] == configs[1]
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())


def test_another_seed_gives_other_tensors(towers, demo, tmp_path):
    first = _train(demo, tmp_path / "a", tmp_path / "cache", seed=0)
    other = _train(demo, tmp_path / "b", tmp_path / "cache", seed=1)
    assert (first / PACK_TENSORS).read_bytes() != (other / PACK_TENSORS).read_bytes()


def test_training_leaves_the_callers_rng_as_it_was_and_does_not_depend_on_it(towers, demo, tmp_path):
    """The seed alone decides the pack: a caller's draws before train() change nothing in it,
    and the caller's RNG continues after train() where it stood before."""
    torch.manual_seed(123)
    torch.rand(5)
    before = torch.get_rng_state()
    first = _train(demo, tmp_path / "a", tmp_path / "cache")
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(7)  # another state going in
    second = _train(demo, tmp_path / "b", tmp_path / "cache")
    assert (first / PACK_TENSORS).read_bytes() == (second / PACK_TENSORS).read_bytes()


def test_tensor_bytes_do_not_depend_on_hash_order():
    """safetensors writes its metadata map in hash order, which changes from one call to the
    next (and between processes); the pack writer's bytes must not."""
    tensors = {name: torch.arange(6, dtype=torch.float32).reshape(2, 3) + i
               for i, name in enumerate(["z.w", "a.w", "m.b", "logit_scale"])}
    tensors["half"] = torch.ones(3, dtype=torch.float16)
    meta = {"format": "pt", "language": "sw", "zeta": "1", "alpha": "2", "mid": "3"}
    outputs = {serialize_tensors(tensors, meta) for _ in range(30)}
    assert len(outputs) == 1
    (data,) = outputs
    loaded = load(data)
    assert sorted(loaded) == ["a.w", "half", "logit_scale", "m.b", "z.w"]
    assert all(torch.equal(loaded[name], tensors[name]) and loaded[name].dtype == tensors[name].dtype
               for name in tensors)
    reordered = {name: tensors[name] for name in reversed(sorted(tensors))}  # insertion order does not matter
    assert serialize_tensors(reordered, dict(reversed(list(meta.items())))) == data
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == meta

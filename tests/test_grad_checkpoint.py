"""Gradient checkpointing keeps fewer activations and changes nothing else: same gradients,
same trained pack, same parameter names."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mlilt.modeling.factory import build_sides
from mlilt.demo.data import generate_demo
from mlilt.speed.grad_checkpoint import checkpoint_blocks
from mlilt.packs import PACK_TENSORS
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from tiny_towers import tiny_text_tower, tiny_timm_cnn, tiny_timm_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``run`` executes."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return sum(saved), out


@pytest.mark.parametrize("build, inputs", [
    (tiny_timm_vit, lambda: (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)),
    (tiny_timm_cnn, lambda: (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)),
])
def test_checkpointed_blocks_keep_less_and_give_the_same_gradients(build, inputs):
    base = build()
    towers = {}
    for wrapped in (False, True):
        sides, _ = build_sides({"image": base}, "ln", 8, seed=0)
        tower = sides["image"].tower
        names = [n for n, _ in tower.named_parameters()]
        if wrapped:
            assert checkpoint_blocks(tower) >= 2
            assert [n for n, _ in tower.named_parameters()] == names  # packs keep their tensor names
        saved, out = _saved_bytes(lambda: tower(*inputs()))
        out.square().sum().backward()
        towers[wrapped] = (saved, {n: p.grad for n, p in tower.named_parameters() if p.requires_grad})
    (plain_saved, plain_grads), (ckpt_saved, ckpt_grads) = towers[False], towers[True]
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-5), name


def test_training_with_checkpointing_writes_the_same_pack(tiny_vit_towers, tmp_path):
    generate_demo(tmp_path / "data", ["sw"], n=30, image_size=32)
    packs = {}
    for flag in (False, True):
        data = tmp_path / "data" / "sw" / "train.jsonl"
        config = TrainConfig(lang="sw", data=str(data), out=str(tmp_path / str(flag)),
                             text_tower="tiny-bert-0", image_tower="tiny-timm-vit", embed_dim=16, epochs=2,
                             batch_size=8, method="ln+adapter", grad_checkpointing=flag, checkpoint_every=0)
        result = train(config)
        packs[flag] = load_file(str(result.pack / PACK_TENSORS))
    assert packs[False].keys() == packs[True].keys()
    for name, tensor in packs[False].items():
        assert torch.allclose(tensor, packs[True][name], atol=1e-5), name


def test_text_tower_blocks_are_found():
    assert checkpoint_blocks(tiny_text_tower()) == 2

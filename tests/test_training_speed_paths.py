"""The fast paths of training compute what the plain paths compute.

A training batch runs its captions in groups of similar length (less padding), frozen
convolutions keep no inputs for the backward pass, fused BatchNorm + ReLU6 modules keep only
their input, other fused norm + activation modules recompute their forward, and CNN towers
run channels-last; under ``--bf16`` attention runs the math kernel. These tests check that embeddings and
gradients stay the same and that less is kept, not timings (those are in benchmarks/perf).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn

from mlilt.modeling import encode
from mlilt.modeling.factory import build_sides
from mlilt.demo.data import generate_demo
from mlilt.modeling.encode import length_groups, run_in_length_groups
from mlilt.speed.lean_backward import lean_convolutions, lean_norm_clamps, recompute_norm_activations
from mlilt.modeling.model import SideEncoder
from mlilt.packs import PACK_TENSORS
from mlilt.training import Callback, TrainConfig, train
from mlilt.training.sources import TextSource
from mlilt.data.split import Split
from tiny_towers import IMAGE_TOWERS, tiny_text_tower, tiny_timm_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["red", "a large red circle left and a small blue square right", "star", "a a a",
            "green triangle top", "kubwa ndogo nyekundu bluu duara mraba na", "blue",
            "a small yellow star bottom and a large green circle top and a red square left", "a a a a a a",
            "triangle top left"]


def _padded_cost(lengths, groups):
    return sum(len(group) * max(lengths[i] for i in group) for group in groups)


@pytest.mark.parametrize("seed", range(5))
def test_length_groups_cover_every_position_once_and_cost_no_more_than_one_batch(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(3, 60) for _ in range(rng.randint(1, 80))]
    for call_tokens in (0, 16, 96, 10**6):
        groups = length_groups(lengths, call_tokens)
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        spans = [(min(lengths[i] for i in g), max(lengths[i] for i in g)) for g in groups]
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "groups are runs of the sorted lengths"
        cost = _padded_cost(lengths, groups) + call_tokens * len(groups)
        assert cost <= len(lengths) * max(lengths) + call_tokens
    assert len(length_groups(lengths, 10**6)) == 1  # a call dearer than any padding: one batch
    assert len(length_groups(lengths, 0)) == len(set(lengths))  # free calls: no padding at all


def test_length_groups_split_where_padding_costs_more_than_a_call():
    assert length_groups([10, 40, 10, 40], call_tokens=20) == [[0, 2], [1, 3]]  # saves 60 padded positions
    assert length_groups([10, 40, 10, 40], call_tokens=100) == [[0, 2, 1, 3]]  # one group, sorted


def test_run_in_length_groups_returns_rows_in_input_order():
    lengths = [5, 1, 9, 1, 5, 9, 2]
    rows = run_in_length_groups(lengths, lambda group: torch.tensor([[float(lengths[i]), i] for i in group]))
    assert rows[:, 1].tolist() == list(range(len(lengths)))
    assert rows[:, 0].tolist() == [float(n) for n in lengths]


def _text_side(method: str) -> SideEncoder:
    sides, _ = build_sides({"text": tiny_text_tower()}, method, 16, seed=0)
    return sides["text"]


def test_a_training_batch_in_length_groups_gives_the_one_batch_embeddings_and_gradients(tmp_path, monkeypatch):
    encoder = _text_side("ln+adapter")
    encoder.tower.padding_free = False  # a tower that cannot run padding-free runs in length groups
    lengths = [len(row) for row in encoder.tower.tokenize(CAPTIONS, pad=False)["input_ids"]]
    monkeypatch.setattr(encode, "GROUP_CALL_TOKENS", 4)  # the tiny tower's batch is too small to split otherwise
    assert len(length_groups(lengths)) > 1
    split = Split(CAPTIONS, list(range(len(CAPTIONS))), [], [])
    results = {}
    for grouped in (True, False):
        encoder.zero_grad()
        if grouped:
            out = TextSource(encoder).embed("train", split, list(range(len(CAPTIONS))))
        else:  # the plain path: one batch padded to its longest caption
            tokens = encoder.tower.tokenize(CAPTIONS)
            out = encoder(tokens["input_ids"], tokens["attention_mask"])
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results[grouped] = out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}
    (grouped_out, grouped_grads), (plain_out, plain_grads) = results[True], results[False]
    assert torch.allclose(grouped_out, plain_out, atol=1e-5)
    assert grouped_grads.keys() == plain_grads.keys() and grouped_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grouped_grads[name], grad, atol=1e-5), name


def _saved_bytes(run):
    """Bytes of distinct tensors autograd keeps for the backward pass (parameters and views of
    them, such as a linear layer's transposed weight, excluded)."""
    seen = {}

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter) and not isinstance(tensor._base, nn.Parameter) and tensor.numel():
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return sum(seen.values()), out


def _same_pad_cnn() -> nn.Module:
    """timm's TF-style blocks: a 'same'-padded strided convolution (pads in its own forward),
    fused BatchNorm + ReLU6, a depthwise convolution, a residual."""
    torch.manual_seed(5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Conv2dSame(3, 8, 3, stride=2, bias=False)
            self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU6)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.bn2 = BatchNormAct2d(8, act_layer=nn.ReLU6)
            self.pw = nn.Conv2d(8, 8, 1, bias=False)

        def forward(self, x):
            x = self.bn1(self.stem(x))
            return (self.pw(self.bn2(self.dw(x))) + x).mean((2, 3))

    model = Block().eval()
    for bn in (model.bn1, model.bn2):  # non-trivial running statistics, as in a trained CNN
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.requires_grad_(False)
    for bn in (model.bn1, model.bn2):
        bn.weight.requires_grad_(True)
        bn.bias.requires_grad_(True)
    return model


def _tiny_cnn_ln() -> nn.Module:
    sides, _ = build_sides({"image": tiny_timm_cnn()}, "ln", 8, seed=0)
    return sides["image"]


def _relu_cnn() -> nn.Module:
    """_same_pad_cnn with plain ReLU after its norms."""
    model = _same_pad_cnn()
    model.bn1.act, model.bn2.act = nn.ReLU(inplace=True), nn.ReLU()
    return model


# (what each lever should take in the model, the share of kept bytes left at most, whether the
# gradients are bit for bit autograd's: the norm clamps' backward computes the same formulas
# in another order, so theirs agree to float rounding)
LEVERS = {"convolutions": ({lean_convolutions: 2}, 0.8, True),
          "norm clamps": ({lean_convolutions: 2, lean_norm_clamps: 2, recompute_norm_activations: 0}, 0.6, False),
          "recomputed norms": ({lean_convolutions: 2, recompute_norm_activations: 2}, 0.6, True)}


@pytest.mark.parametrize("build, levers", [(_same_pad_cnn, "convolutions"), (_same_pad_cnn, "norm clamps"),
                                           (_same_pad_cnn, "recomputed norms"), (_relu_cnn, "norm clamps"),
                                           (_tiny_cnn_ln, "convolutions"), (_tiny_cnn_ln, "recomputed norms")])
@pytest.mark.parametrize("bf16", [False, True])
def test_lean_backward_keeps_less_and_gives_the_same_gradients(build, levers, bf16):
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = build()
    lean = copy.deepcopy(plain)
    takes, kept, exact = LEVERS[levers]
    for lever, count in takes.items():
        assert lever(lean) >= count if count else lever(lean) == 0, lever.__name__
    assert [n for n, _ in lean.named_parameters()] == [n for n, _ in plain.named_parameters()]
    runs = {}
    for name, model in (("plain", plain), ("lean", lean)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            saved, out = _saved_bytes(lambda: model(pixels))
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        runs[name] = saved, out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (plain_saved, plain_out, plain_grads), (lean_saved, lean_out, lean_grads) = runs["plain"], runs["lean"]
    assert lean_saved < kept * plain_saved, (lean_saved, plain_saved)
    assert torch.equal(lean_out, plain_out)
    assert lean_grads.keys() == plain_grads.keys() and lean_grads
    for name, grad in plain_grads.items():
        if exact:
            assert torch.equal(lean_grads[name], grad), name
        else:
            assert ((lean_grads[name] - grad).norm() / grad.norm()).item() < (1e-2 if bf16 else 1e-5), name
    with torch.no_grad():  # evaluation takes the plain forward
        assert torch.equal(lean(pixels), plain(pixels))


def test_norm_clamps_leave_training_mode_norms_and_other_activations_alone():
    model = _same_pad_cnn()
    model.bn2.act = nn.SiLU()  # its gradient needs more than a mask
    assert lean_norm_clamps(model) == 1
    model.train()  # batch statistics: the plain forward, which updates the running statistics
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert not torch.equal(model.bn1.running_mean, before)


@pytest.mark.parametrize("options", [{"recompute_norms": True}, {"grad_checkpointing": True},
                                     {"recompute_norms": True, "grad_checkpointing": True}])
def test_memory_options_on_a_cnn_write_the_same_pack(tiny_cnn_towers, tmp_path, options):
    """Lean convolutions are always on; recomputed norms and checkpointed blocks nest inside."""
    generate_demo(tmp_path / "data", ["sw"], n=30, image_size=32)
    packs = {}
    for name, settings in (("plain", {}), ("options", options)):
        config = TrainConfig(lang="sw", data=str(tmp_path / "data" / "sw" / "train.jsonl"),
                             out=str(tmp_path / name), text_tower="tiny-bert-0", image_tower="tiny-timm-cnn",
                             embed_dim=16, epochs=2, batch_size=8, method="ln", checkpoint_every=0, **settings)
        packs[name] = load_file(str(train(config).pack / PACK_TENSORS))
    assert packs["plain"].keys() == packs["options"].keys()
    assert any(name.startswith("image.tower.") for name in packs["plain"])  # the CNN's norms did train
    for name, tensor in packs["plain"].items():
        assert torch.equal(tensor, packs["options"][name]), name  # recomputation is exact


class _Layouts(Callback):
    """What the built model runs with: padding-free text, channels-last image, lean convolutions."""

    def on_model_built(self, model, report) -> None:
        convs = [m for m in model.image.tower.modules() if isinstance(m, nn.Conv2d)]
        self.seen = (model.text.tower.runs_padding_free, model.image.tower.channels_last,
                     any("forward" in vars(conv) for conv in convs))  # a lean convolution's own forward


def test_every_speed_path_off_writes_the_same_pack_as_every_one_on(tiny_cnn_towers, tmp_path):
    """``--speed-paths none`` is the plain PyTorch path; the default paths compute the same."""
    generate_demo(tmp_path / "data", ["sw"], n=30, image_size=32)
    packs, seen = {}, {}
    for paths in ("default", "none"):
        layouts = _Layouts()
        config = TrainConfig(lang="sw", data=str(tmp_path / "data" / "sw" / "train.jsonl"),
                             out=str(tmp_path / paths), text_tower="tiny-bert-0", image_tower="tiny-timm-cnn",
                             embed_dim=16, epochs=2, batch_size=8, method="ln", checkpoint_every=0,
                             speed_paths=paths)
        packs[paths] = load_file(str(train(config, callbacks=[layouts]).pack / PACK_TENSORS))
        seen[paths] = layouts.seen
    assert seen == {"default": (True, True, True), "none": (False, False, False)}
    assert packs["default"].keys() == packs["none"].keys()
    for name, tensor in packs["default"].items():
        torch.testing.assert_close(tensor, packs["none"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_speed_paths_are_named_or_refused():
    from mlilt.errors import UsageError
    from mlilt.speed import SPEED_PATHS, parse_speed_paths

    assert parse_speed_paths("default") == set(SPEED_PATHS) and parse_speed_paths("none") == set()
    assert parse_speed_paths("padding-free, lean-backward") == {"padding-free", "lean-backward"}
    with pytest.raises(UsageError, match="unknown fast-attention"):
        TrainConfig(lang="sw", data="d", out="o", speed_paths="padding-free,fast-attention")


def test_lean_backward_leaves_trained_convolutions_alone():
    model = _same_pad_cnn()
    model.pw.weight.requires_grad_(True)  # this convolution's weight gradient needs its input
    convs = lean_convolutions(model)
    assert convs == 2
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.pw.weight.grad is not None and model.pw.weight.grad.abs().sum() > 0


def test_a_cnn_tower_runs_channels_last_with_the_same_output():
    tower = tiny_timm_cnn()
    assert tower.channels_last
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    contiguous = copy.deepcopy(tower.model).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        assert torch.allclose(tower(pixels), contiguous(pixels), atol=1e-5)


@pytest.mark.parametrize("family", sorted(set(IMAGE_TOWERS) - {"timm-cnn"}))
def test_transformer_towers_keep_their_layout(family):
    assert not IMAGE_TOWERS[family]().channels_last  # one patch-embedding convolution: nothing to gain


def test_math_attention_under_bf16_gives_the_default_kernels_result():
    """The ``math-attention`` path changes the attention kernel under ``--bf16``, not its result
    beyond bfloat16 rounding: output and input gradients as with PyTorch's own kernel choice."""
    from torch.nn.functional import scaled_dot_product_attention

    from mlilt.training.precision import autocast

    qkv = torch.randn(3, 2, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    results = {}
    for math_attention in (True, False):
        inputs = qkv.clone().requires_grad_(True)
        with autocast(True, torch.device("cpu"), math_attention):
            out = scaled_dot_product_attention(*inputs)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results[math_attention] = out.float(), inputs.grad
    for got, wanted in zip(results[True], results[False]):
        torch.testing.assert_close(got, wanted, rtol=0.05, atol=0.05)

"""BatchNorm + clamp after a frozen expanding convolution keeps the convolution's smaller
input instead of its own input, redoes the convolution in the backward pass a few images at
a time, and gives the same gradients.

The scale's and shift's gradients are summed per chunk of images, so they are the same up to
float rounding, not bit for bit (``mlilt/lean_backward.py``).
"""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mlilt.speed import lean_backward
from mlilt.speed.lean_backward import conv2d_keeping_weight_only, lean_convolutions, lean_norm_clamps

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, SIZE, WIDE = 4, 16, 24


def _expansion_block(bias: bool, act: type[nn.Module], same_pad: bool = False) -> nn.Module:
    """An inverted residual as in EfficientNet: a stem, a 1x1 expansion 4 -> 24 into
    BatchNorm + clamp, a strided depthwise convolution, a projection back. With ``same_pad``
    the depthwise convolution pads as TensorFlow does (timm's ``Conv2dSame``, 0 before and 1
    after): the gradient reaching the norm is then a view into the padded one."""
    torch.manual_seed(7)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn0 = BatchNormAct2d(4, act_layer=act)
            self.expand = nn.Conv2d(4, WIDE, 1, bias=bias)
            self.bn1 = BatchNormAct2d(WIDE, act_layer=act)
            self.dw = (Conv2dSame(WIDE, WIDE, 3, stride=2, groups=WIDE, bias=False) if same_pad
                       else nn.Conv2d(WIDE, WIDE, 3, stride=2, padding=1, groups=WIDE, bias=False))
            self.bn2 = BatchNormAct2d(WIDE, act_layer=act)
            self.project = nn.Conv2d(WIDE, 4, 1, bias=False)
            self.bn3 = BatchNormAct2d(4, apply_act=False)

        def forward(self, x):
            x = self.bn0(self.stem(x))
            return self.bn3(self.project(self.bn2(self.dw(self.bn1(self.expand(x)))))).mean((2, 3))

    model = Block().eval().to(memory_format=torch.channels_last)
    norms = [model.bn0, model.bn1, model.bn2, model.bn3]
    for bn in norms:  # statistics far from 0 and 1, as in a trained CNN: the sums may cancel
        bn.running_mean.uniform_(-3.0, 3.0)
        bn.running_var.uniform_(0.2, 4.0)
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.uniform_(-1.0, 1.0)
    model.requires_grad_(False)
    for bn in norms:
        bn.weight.requires_grad_(True)
        bn.bias.requires_grad_(True)
    return model


def _run(model: nn.Module, pixels: torch.Tensor, bf16: bool = False):
    """Output, the shapes and dtypes of what autograd keeps, and the parameter gradients."""
    kept = []

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter):
            kept.append((tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(pixels)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), kept, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _pixels() -> torch.Tensor:
    pixels = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return pixels.contiguous(memory_format=torch.channels_last)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# The whole batch in one backward pass, or an image at a time (the expanded activation of one
# image, 24 x 16 x 16, is over the chunk then).
ONE_PASS, IMAGE_AT_A_TIME = 1 << 30, 100


@pytest.mark.parametrize("chunk", [ONE_PASS, IMAGE_AT_A_TIME], ids=["one-pass", "image-at-a-time"])
@pytest.mark.parametrize("act, bias, same_pad", [(nn.ReLU6, False, False), (nn.ReLU6, True, False),
                                                 (nn.ReLU, False, False), (nn.ReLU, True, False),
                                                 (nn.ReLU6, True, True)])
def test_expansion_keeps_its_smaller_input_and_gives_the_same_gradients(bias, act, same_pad, chunk, monkeypatch):
    monkeypatch.setattr(lean_backward, "CHUNK", chunk)
    plain = _expansion_block(bias, act, same_pad)
    lean = copy.deepcopy(plain)
    lean_convolutions(lean)
    assert lean_norm_clamps(lean) == 3
    plain_out, plain_kept, plain_grads = _run(plain, _pixels())
    lean_out, lean_kept, lean_grads = _run(lean, _pixels())
    expanded = (BATCH, WIDE, SIZE, SIZE)
    assert (expanded, torch.float32) in {(shape, dtype) for shape, dtype, _ in plain_kept}
    assert (expanded, torch.float32) not in {(shape, dtype) for shape, dtype, _ in lean_kept}
    assert ((BATCH, 4, SIZE, SIZE), torch.float32) in {(shape, dtype) for shape, dtype, _ in lean_kept}
    assert sum(size for *_, size in lean_kept) < 0.6 * sum(size for *_, size in plain_kept)
    assert torch.equal(lean_out, plain_out)  # the forward pass is unchanged
    _assert_as_close_as_plain(lean_grads, plain_grads, plain)


class _Made(TorchDispatchMode):
    """Counts the tensors of ``shape`` that operations make, ``empty`` ones included (memory to
    be written a few images at a time, or a never-written stand-in for a shape)."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape, self.made = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += sum(isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape
                         for t in (out if isinstance(out, (tuple, list)) else (out,)))
        return out


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
def test_the_norm_takes_the_expansions_backward_pass(lean, monkeypatch):
    """The norm after a frozen expansion takes the expansion's backward pass too, an image at a
    time, so its own gradient is never made whole. Lean, the expanded activation's gradient is
    made only by the depthwise convolution, beside its stand-in for its input's shape; plain
    autograd makes three: the convolution's, the clamp's and the norm's."""
    monkeypatch.setattr(lean_backward, "CHUNK", IMAGE_AT_A_TIME)
    model = _expansion_block(True, nn.ReLU6)
    if lean:
        lean_convolutions(model)
        lean_norm_clamps(model)
    out = model(_pixels())
    with _Made((BATCH, WIDE, SIZE, SIZE)) as counted:
        out.sum().backward()
    assert counted.made == (2 if lean else 3)


def _assert_as_close_as_plain(lean_grads: dict, plain_grads: dict, plain: nn.Module, floor: float = 1e-6) -> None:
    """Each lean gradient is within 10x plain float32 autograd's own error against float64
    (or within ``floor`` of it, where plain autograd's sum happened to round well)."""
    reference = copy.deepcopy(plain).double()
    _, _, exact = _run(reference, _pixels().double())
    assert lean_grads.keys() == plain_grads.keys() == exact.keys()
    for name, grad in plain_grads.items():
        plain_error, lean_error = _relative(grad.double(), exact[name]), _relative(lean_grads[name].double(), exact[name])
        assert lean_error < max(10 * plain_error, floor), (name, lean_error, plain_error)


def test_under_autocast_the_norm_keeps_its_own_input():
    """bf16 autocast casts between the convolution and the norm: the plain lean path runs."""
    plain = _expansion_block(False, nn.ReLU6)
    lean = copy.deepcopy(plain)
    lean_convolutions(lean)
    lean_norm_clamps(lean)
    plain_out, _, plain_grads = _run(plain, _pixels(), bf16=True)
    lean_out, _, lean_grads = _run(lean, _pixels(), bf16=True)
    assert torch.equal(lean_out, plain_out)
    for name, grad in plain_grads.items():
        assert torch.equal(lean_grads[name], grad), name


def test_changing_the_kept_input_in_place_is_an_error_not_a_wrong_gradient():
    lean = _expansion_block(False, nn.ReLU6)
    lean_convolutions(lean)
    lean_norm_clamps(lean)
    z = lean.bn0(lean.stem(_pixels()))
    out = lean.bn1(lean.expand(z))
    z.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_lean_convolution_does_not_keep_its_input_alive():
    """A norm without clamp keeps the convolution's output: the input must still be freed."""
    weight = torch.randn(WIDE, 4, 1, 1)
    z = torch.randn(BATCH, 4, SIZE, SIZE, requires_grad=True) * 1.0
    out = conv2d_keeping_weight_only(z, weight)
    input_ref = weakref.ref(z)
    del z
    gc.collect()
    assert input_ref() is None and out.requires_grad


@pytest.mark.parametrize("chunk", [ONE_PASS, IMAGE_AT_A_TIME], ids=["one-pass", "image-at-a-time"])
@pytest.mark.parametrize("same_pad", [False, True])
def test_without_conv_inputs_the_norm_keeps_its_own_input(chunk, same_pad, monkeypatch):
    monkeypatch.setattr(lean_backward, "CHUNK", chunk)
    plain = _expansion_block(True, nn.ReLU6, same_pad)
    lean = copy.deepcopy(plain)
    lean_convolutions(lean)
    lean_norm_clamps(lean, conv_inputs=False)
    _, _, plain_grads = _run(plain, _pixels())
    _, lean_kept, lean_grads = _run(lean, _pixels())
    assert ((BATCH, WIDE, SIZE, SIZE), torch.float32) in {(shape, dtype) for shape, dtype, _ in lean_kept}
    _assert_as_close_as_plain(lean_grads, plain_grads, plain)


class _SharedOutput(nn.Module):
    """A frozen convolution's output taken by two lean norms and by a plain operation. Behind an
    expansion each norm sends its gradient straight to the convolution's input, and the plain
    operation's goes through the convolution's own backward pass: autograd adds the three."""

    def __init__(self, expanding: bool):
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = BatchNormAct2d(4, act_layer=nn.ReLU6)
        self.conv = nn.Conv2d(4, WIDE if expanding else 4, 1 if expanding else 3, padding=0 if expanding else 1)
        self.bn_a = BatchNormAct2d(self.conv.out_channels, act_layer=nn.ReLU6)
        self.bn_b = BatchNormAct2d(self.conv.out_channels, act_layer=nn.ReLU)

    def forward(self, x):
        z = self.bn0(self.stem(x))
        x = self.conv(z)
        return (self.bn_a(x) + self.bn_b(x) * 0.5 + x.tanh()).mean((2, 3))


@pytest.mark.parametrize("expanding", [True, False], ids=["expansion", "same-width"])
def test_a_convolution_output_with_other_users_gets_every_gradient(expanding):
    plain = _SharedOutput(expanding).eval().to(memory_format=torch.channels_last)
    norms = [plain.bn0, plain.bn_a, plain.bn_b]
    for bn in norms:
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    plain.requires_grad_(False)
    for bn in norms:
        bn.weight.requires_grad_(True)
        bn.bias.requires_grad_(True)
    lean = copy.deepcopy(plain)
    lean_convolutions(lean)
    assert lean_norm_clamps(lean) == 3
    _, _, plain_grads = _run(plain, _pixels())
    _, _, lean_grads = _run(lean, _pixels())
    # A float32 sum of 1,024 terms per channel; one value on the clamp's bound may flip.
    _assert_as_close_as_plain(lean_grads, plain_grads, plain, floor=1e-5)
    assert _relative(lean_grads["bn0.weight"], plain_grads["bn0.weight"]) < 1e-5  # all three arrived

"""A frozen TensorFlow-style 'same' convolution (timm's ``Conv2dSame``) in a training tower
pads inside the convolution instead of copying its input into a padded tensor, and gives the
module's own output and input gradient (``mlilt/lean_backward.py``)."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mlilt.speed.lean_backward import lean_convolutions

pytestmark = pytest.mark.usefixtures("one_thread")


BATCH = 3  # no kernel below has as many output channels: a padded weight is not counted


class _PadCount(TorchDispatchMode):
    """Counts the padding copies of a batch of activations or their gradients that run (``F.pad``
    of zeros lowers to ``constant_pad_nd``, forward and backward)."""

    def __init__(self):
        super().__init__()
        self.pads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.pads += func.overloadpacket is torch.ops.aten.constant_pad_nd and args[0].shape[0] == BATCH
        return func(*args, **(kwargs or {}))


def _run(conv: nn.Module, x: torch.Tensor, grad_seed: int = 1):
    x = x.detach().requires_grad_(True)
    with _PadCount() as counted:
        out = conv(x)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
        (x_grad,) = torch.autograd.grad(out, x, grad)
    return out.detach(), x_grad, counted.pads


# Depthwise (in, out, kernel, stride, height, width): odd and even sizes, an even kernel, a
# channel multiplier, strides 1-3; most pad one more after than before in some dimension.
CASES = [(8, 8, 3, 2, 16, 16), (8, 8, 5, 2, 15, 16), (6, 12, 3, 2, 17, 12),
         (4, 4, 4, 2, 13, 13), (4, 8, 3, 1, 9, 10), (4, 4, 3, 3, 20, 11)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_same_padding_in_the_kernel_gives_the_modules_own_result_without_a_padded_copy(case, channels_last):
    cin, cout, kernel, stride, height, width = case
    torch.manual_seed(3)
    plain = Conv2dSame(cin, cout, kernel, stride=stride, groups=cin, bias=True).requires_grad_(False)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    plain = plain.to(memory_format=layout)
    lean = copy.deepcopy(plain)
    assert lean_convolutions(lean) == 1
    x = torch.randn(BATCH, cin, height, width, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    plain_out, plain_grad, plain_pads = _run(plain, x)
    lean_out, lean_grad, lean_pads = _run(lean, x)
    assert plain_pads >= 1 and lean_pads == 0
    assert torch.equal(lean_out, plain_out) and torch.equal(lean_grad, plain_grad)  # bit for bit in float32


def test_under_bf16_autocast_the_result_matches_to_rounding():
    torch.manual_seed(3)
    plain = Conv2dSame(16, 16, 3, stride=2, groups=16, bias=False).requires_grad_(False)
    lean = copy.deepcopy(plain)
    lean_convolutions(lean)
    x = torch.randn(BATCH, 16, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (plain_out, plain_grad, _), (lean_out, lean_grad, lean_pads) = _run(plain, x), _run(lean, x)
    assert lean_pads == 0 and lean_out.dtype == plain_out.dtype == torch.bfloat16
    torch.testing.assert_close(lean_out, plain_out)
    torch.testing.assert_close(lean_grad, plain_grad)


def test_the_modules_own_forward_runs_with_dilation_or_across_channels():
    torch.manual_seed(3)
    x = torch.randn(BATCH, 4, 12, 12)
    for plain in (Conv2dSame(4, 4, 3, stride=2, dilation=2, groups=4, bias=False),
                  Conv2dSame(4, 4, 3, stride=2, bias=False)):  # a full convolution's sums would round otherwise
        plain.requires_grad_(False)
        lean = copy.deepcopy(plain)
        lean_convolutions(lean)
        plain_out, plain_grad, _ = _run(plain, x)
        lean_out, lean_grad, lean_pads = _run(lean, x)
        assert lean_pads >= 1 and torch.equal(lean_out, plain_out) and torch.equal(lean_grad, plain_grad)


def test_the_modules_own_forward_runs_where_the_input_needs_no_gradient():
    torch.manual_seed(3)
    plain = Conv2dSame(4, 4, 3, stride=2, groups=4, bias=False).requires_grad_(False)
    lean = copy.deepcopy(plain)
    lean_convolutions(lean)
    x = torch.randn(BATCH, 4, 12, 12)
    with _PadCount() as counted:
        out = lean(x)  # pixels into a stem
    assert counted.pads == 1 and torch.equal(out, plain(x))
    with torch.no_grad(), _PadCount() as counted:
        lean(x.requires_grad_(True))  # evaluation
    assert counted.pads == 1

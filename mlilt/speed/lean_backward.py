"""Keep less for the backward pass of a tower that trains only a few parameters.

Autograd saves, for every convolution, its input: the weight gradient needs it. When the
weight is frozen only the input gradient is wanted, and that needs the weight alone, yet
PyTorch keeps the input all the same. In a CNN whose BatchNorm scales train (``ln``), that is
a third of everything kept. Changes made on a training copy only:

- ``lean_convolutions`` (always, in a tower that trains): convolutions with frozen weights
  keep nothing but the weight; it costs no time. Those that pad as TensorFlow does (timm's
  ``Conv2dSame``, one more zero after than before) no longer copy their input into a padded
  tensor and their input's gradient out of one: the convolution pads by itself and its
  kernel gets a leading row or column of zeros (``_padding_in_the_kernel``);
- ``lean_norm_clamps`` (always, in a tower that trains): a fused BatchNorm + ReLU/ReLU6
  module (timm's ``BatchNormAct2d``, frozen statistics, trained scale and shift) keeps only
  the norm's input, not also the activation's output. The backward pass recomputes the
  norm's output from it for the clamp's mask. Where that input is a frozen convolution's
  output over an input at most half its size (a 1x1 expansion in an inverted residual), the
  module keeps that smaller input instead and the backward pass redoes the convolution too
  (``_ConvFedNormClamp``): 42% less kept again on effnet-lite0
  (``benchmarks/perf/levers.py``). It also takes the convolution's backward pass, so the
  gradient goes straight to the smaller input and the expanded one is never made whole
  (less CPU time per ``ln`` step: ``benchmarks/perf/levers.py --parts kept``). Both backward
  passes run a few images at a time (``_norm_clamp_backward``), so what they recompute
  stays in the CPU's cache and the heap:
  over whole tensors each recomputed activation took a fresh mapping whose pages the kernel
  zeroes, which costs more than the recomputation;
- ``recompute_norm_activations`` (``--recompute-norms``): the other fused norm + activation
  modules (SiLU, GELU, ...) keep only their input and recompute their forward in the
  backward pass through autograd (more passes than the clamp's shortcut).

Lean convolutions and recomputed norms give bit for bit the same gradients
(``tests/test_training_speed_paths.py``). The norm-clamp paths give the same to float
rounding: the scale's and shift's gradients are summed a few images at a time, and a
recomputed expansion may round differently from the forward's, which moves the clamp's mask
only for values on its bounds (``tests/test_conv_fed_norms.py``; ``benchmarks/perf/levers.py``
prints each lever's difference). Like the gradient
checkpointing wrapper, each is set on a module's ``forward`` attribute: names and packs are
unchanged, and evaluation (no gradient) runs the plain forward.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from mlilt.speed.grad_checkpoint import checkpointed


def lean_convolutions(tower: nn.Module) -> int:
    """Frozen 2-D convolutions of ``tower`` stop keeping their inputs; returns how many."""
    from timm.layers import Conv2dSame  # here: a tower without timm need not import it

    convs = [m for m in tower.modules() if isinstance(m, nn.Conv2d) and not _trains(m)]
    for conv in convs:
        conv.forward = _with_lean_conv2d(conv.forward)
        if (isinstance(conv, Conv2dSame) and conv.padding_mode == "zeros" and conv.dilation == (1, 1)
                and conv.groups == conv.in_channels):
            conv.forward = _padding_in_the_kernel(conv, conv.forward)
    return len(convs)


def _padding_in_the_kernel(conv: nn.Conv2d, forward: Callable) -> Callable:
    """timm's ``Conv2dSame`` pads its input as TensorFlow does, ``total // 2`` zeros before and
    the rest after, with a copy: on effnet-lite0 a strided depthwise convolution copies its
    154 MB input into a padded tensor, and the backward pass copies the gradient out of one.
    Where one more zero goes after than before, padding ``after`` on both sides with a
    leading zero row (column) in the kernel puts every window on the same inputs with the
    same weights. Taken for depthwise convolutions only: their output and input gradient
    came out bit for bit the module's own (``tests/test_same_padding.py``), while a full
    convolution's input gradient, summed over channels and taps, rounded differently; with
    dilation the zero tap would not fall one input before the first. Runs where the input
    needs a gradient (deep in the tower); elsewhere the module's own forward runs."""
    from timm.layers import get_same_padding

    def run(x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return forward(x)
        weight, padding = conv.weight, []
        for dim, (size, kernel, stride) in enumerate(zip(x.shape[-2:], conv.kernel_size, conv.stride)):
            total = get_same_padding(size, kernel, stride, 1)
            padding.append(total - total // 2)
            if total % 2:  # a zero column (dim 1) or row (dim 0) before the kernel's first
                weight = nn.functional.pad(weight, (1, 0) if dim == 1 else (0, 0, 1, 0))
        return conv2d_keeping_weight_only(x, weight, conv.bias, conv.stride, padding, 1, conv.groups)
    return run


def lean_norm_clamps(tower: nn.Module, conv_inputs: bool = True) -> int:
    """Fused BatchNorm (frozen statistics) + ReLU/ReLU6 modules whose scale and shift train
    keep only the norm's input, or with ``conv_inputs`` the smaller input of the frozen
    convolution before them where there is one; returns how many."""
    found = [m for m in tower.modules() if _clamp_bounds(m) is not None and _trains(m)]
    for module in found:
        module.forward = _with_lean_norm_clamp(module, module.forward, conv_inputs)
    return len(found)


def recompute_norm_activations(tower: nn.Module) -> int:
    """Fused norm + activation modules whose parameters train recompute their forward in the
    backward pass, keeping only their input; returns how many. Modules ``lean_norm_clamps``
    already took are left as they are."""
    found = [m for m in tower.modules() if "NormAct" in type(m).__name__ and _trains(m)
             and not getattr(m.forward, "lean_norm_clamp", False)]
    for module in found:
        module.forward = checkpointed(module.forward)  # the same wrapper as --grad-checkpointing's blocks
    return len(found)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _clamp_bounds(module: nn.Module) -> tuple[float, float] | None:
    """(low, high) when ``module`` is BatchNorm with frozen statistics, then a clamp-shaped
    activation (ReLU, ReLU6, Hardtanh) and nothing else; else None."""
    if not (isinstance(module, nn.BatchNorm2d) and "NormAct" in type(module).__name__
            and isinstance(getattr(module, "drop", None), nn.Identity)
            and module.running_mean is not None and module.running_var is not None):
        return None
    act = getattr(module, "act", None)
    if type(act) is nn.ReLU:
        return 0.0, math.inf
    if isinstance(act, nn.Hardtanh):  # nn.ReLU6 included
        return float(act.min_val), float(act.max_val)
    return None


def _with_lean_norm_clamp(module: nn.Module, forward: Callable, conv_inputs: bool) -> Callable:
    low, high = _clamp_bounds(module)

    def run(x):
        if module.training or not torch.is_grad_enabled():  # batch statistics, or nothing kept anyway
            return forward(x)
        norm = (module.weight, module.bias, module.running_mean, module.running_var, module.eps, low, high)
        conv_fed = _smaller_conv_input(x) if conv_inputs else None
        if conv_fed is not None:
            # Detached: the gradient goes to the convolution's input straight from this norm's
            # backward pass, a few images at a time, so the expanded gradient never exists whole.
            return _ConvFedNormClamp.apply(x.detach(), *conv_fed, *norm)
        return _FrozenStatsNormClamp.apply(x, *norm)
    run.lean_norm_clamp = True
    return run


class _FrozenStatsNormClamp(torch.autograd.Function):
    """clamp(batch_norm(x), low, high) with running statistics; keeps x alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, low, high):
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.settings = (eps, low, high)
        return _norm(x, weight, bias, mean, var, eps).clamp_(low, high)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, var = ctx.saved_tensors
        grad_x = _empty_like_in(x, memory_format(x)) if ctx.needs_input_grad[0] else None
        x_scale = _input_scale(weight, var, ctx.settings[0]).view(1, -1, 1, 1)

        def to_input(masked: torch.Tensor, images: slice) -> None:
            torch.mul(masked, x_scale, out=grad_x[images])

        grads = _norm_clamp_backward(grad, lambda images: x[images], (weight, bias, mean, var, *ctx.settings),
                                     ctx.needs_input_grad[1:3], to_input if grad_x is not None else None)
        return (grad_x, *grads, None, None, None, None, None)


class _ConvFedNormClamp(torch.autograd.Function):
    """clamp(batch_norm(x), low, high) with running statistics, where ``x`` = conv(z, W) + b
    came from a frozen convolution over a smaller input ``z`` (a 1x1 expansion): keeps ``z``.
    ``x`` comes detached and the gradient goes to ``z``: the backward pass redoes the
    convolution, the norm's backward and the convolution's backward a few images at a time."""

    @staticmethod
    def forward(ctx, x, conv_input, conv, weight, bias, mean, var, eps, low, high):
        ctx.save_for_backward(conv_input, weight, bias, mean, var)  # conv_input: checked for in-place changes
        ctx.conv, ctx.settings = conv, (eps, low, high)
        return _norm(x, weight, bias, mean, var, eps).clamp_(low, high)

    @staticmethod
    def backward(ctx, grad):
        conv_input, weight, bias, mean, var = ctx.saved_tensors
        conv: _FrozenConv = ctx.conv

        def expanded(images: slice) -> torch.Tensor:
            return torch.conv2d(conv_input[images], conv.weight, conv.bias, conv.stride, conv.padding,
                                conv.dilation, conv.groups)

        grad_z = _empty_like_in(conv_input, memory_format(conv_input)) if ctx.needs_input_grad[1] else None
        # d norm(x) / dx per channel, folded into the convolution's weight: one pass less.
        scaled = conv._replace(weight=conv.weight * _input_scale(weight, var, ctx.settings[0]).view(-1, 1, 1, 1))

        def to_conv_input(masked: torch.Tensor, images: slice) -> None:
            grad_z[images] = _conv_input_grad(masked, conv_input[images], scaled)

        scale_grad, shift_grad = _norm_clamp_backward(grad, expanded, (weight, bias, mean, var, *ctx.settings),
                                                      ctx.needs_input_grad[3:5],
                                                      to_conv_input if grad_z is not None else None)
        return None, grad_z, None, scale_grad, shift_grad, None, None, None, None, None


CHUNK = 1 << 20  # elements per backward pass on a CPU (4 MB in float32); a GPU takes the batch at once


def _norm_clamp_backward(grad, norm_input: Callable[[slice], torch.Tensor], norm: tuple, wanted,
                         write: Callable[[torch.Tensor, slice], None] | None) -> tuple:
    """The scale's and the shift's gradients of clamp(batch_norm(x), low, high) with running
    statistics (None where not ``wanted``), a few images at a time; ``norm_input(images)``
    gives those images' x, kept or recomputed, ``norm`` is (weight, bias, mean, var, eps, low,
    high). ``write(masked, images)``, unless None, takes each chunk's gradient for the norm's
    output inside the clamp (a temporary) on to the gradient of x, or of what x came from.
    ``grad`` is read in whatever layout it comes: a contiguous copy of all of it would cost a
    fresh mapping as large as x."""
    weight, bias, mean, var, eps, low, high = norm
    sums = [torch.zeros_like(weight), torch.zeros_like(weight)]  # the scale's and the shift's gradients
    with torch.no_grad():
        for images in _image_chunks(grad):
            x = norm_input(images)
            inside = _norm(x, weight, bias, mean, var, eps)
            # The gradient inside the clamp, written over the recomputed norm's output.
            torch.ops.aten.hardtanh_backward.grad_input(grad[images], inside, low, high, grad_input=inside)
            if wanted[0] or wanted[1]:
                parts = torch.ops.aten.native_batch_norm_backward(
                    inside, x, weight, mean, var, None, None, False, eps, [False, wanted[0], wanted[1]])[1:]
                for total, part in zip(sums, parts):
                    if part is not None:
                        total += part
            if write is not None:
                write(inside, images)
    return sums[0] if wanted[0] else None, sums[1] if wanted[1] else None


def _input_scale(weight: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """d norm(x) / dx per channel of a BatchNorm with running statistics."""
    with torch.no_grad():
        return weight * torch.rsqrt(var + eps)


def _conv_input_grad(grad: torch.Tensor, conv_input: torch.Tensor, conv: "_FrozenConv") -> torch.Tensor:
    """The gradient for ``conv_input`` of a frozen convolution's output whose gradient is
    ``grad``; only ``conv_input``'s shape and layout are used."""
    return torch.ops.aten.convolution_backward(grad, conv_input, conv.weight, None, conv.stride, conv.padding,
                                               conv.dilation, False, [0, 0], conv.groups, (True, False, False))[0]


def _empty_like_in(tensor: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """An unwritten tensor of ``tensor``'s shape, dtype and device, in ``layout``."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device, memory_format=layout)


def _image_chunks(grad: torch.Tensor) -> list[slice]:
    """Slices of the batch of about ``CHUNK`` elements each, at least one image."""
    images = grad.shape[0]
    per_chunk = max(1, images if grad.device.type != "cpu" else CHUNK // grad[0].numel())
    return [slice(start, start + per_chunk) for start in range(0, images, per_chunk)]


class _FrozenConv(NamedTuple):
    """A frozen convolution's weight and settings."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


_CONV_INPUT = "_mlilt_frozen_conv_input"  # set on a lean convolution's output


def _smaller_conv_input(x: torch.Tensor) -> tuple[torch.Tensor, _FrozenConv] | None:
    """The input and convolution ``x`` came from, when that input is still alive, takes at
    most half the elements of ``x`` and nothing was cast on the way (autocast)."""
    found = getattr(x, _CONV_INPUT, None)
    if found is None:
        return None
    input_ref, conv = found
    conv_input = input_ref()
    if conv_input is None or not (x.dtype == conv_input.dtype == conv.weight.dtype):
        return None
    return (conv_input, conv) if conv_input.numel() * 2 <= x.numel() else None


def memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also contiguous), else contiguous."""
    if (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def _norm(x, weight, bias, mean, var, eps):
    with torch.no_grad():
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)


def _with_lean_conv2d(forward: Callable) -> Callable:
    # The module's own forward runs unchanged (timm's Conv2dSame pads first); only the
    # conv2d call inside it is swapped.
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is kept anyway
            return forward(*args, **kwargs)
        with _LeanConv2d():
            return forward(*args, **kwargs)
    return run


class _LeanConv2d(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            return conv2d_keeping_weight_only(*args, **kwargs)
        return func(*args, **kwargs)


def conv2d_keeping_weight_only(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.conv2d``; when only the input needs a gradient, autograd keeps just the weight."""
    lean = (torch.is_grad_enabled() and input.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and not isinstance(padding, str))
    if not lean:
        return torch.conv2d(input, weight, bias, stride, padding, dilation, groups)
    conv = _FrozenConv(weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)
    out = _FrozenConv2d.apply(input, *conv)
    # For a BatchNorm + clamp next (_ConvFedNormClamp). A weak reference: it must not keep
    # the input alive where something else keeps ``out`` (a BatchNorm without clamp does).
    setattr(out, _CONV_INPUT, (weakref.ref(input), conv))
    return out


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)  # a parameter: saving it copies nothing
        ctx.input_shape = input.shape
        ctx.input_format = memory_format(input)
        ctx.settings = (stride, padding, dilation, groups)
        return torch.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # Stands in for the input: its shape and layout choose the kernel (an expanded
        # 0-stride stand-in sent channels-last convolutions down a slow path); never read.
        shape_only = torch.empty(ctx.input_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.input_format)
        grad_input = _conv_input_grad(grad, shape_only, _FrozenConv(weight, None, *ctx.settings))
        return grad_input, None, None, None, None, None, None

"""``lora[:R][:alpha=A][:dropout=P][:targets=ROLE-ROLE]``: low-rank updates W + (alpha/R)·B·A.

Every target that is a ``nn.Linear`` the tower calls (BERT's query and value, HF ViT's
``q_proj``, timm's fused ``qkv``, any feed-forward layer) is wrapped in PEFT's own LoRA layer
(``peft.tuners.lora.Linear``, adapter name ``default``; without dropout its forward runs one
matmul with the merged weight W + (alpha/R)·B·A, measured faster on CPU than PEFT's
``base(x) + B·A·x·alpha/R``: ``_merged_linear_class``), the tensors are named as PEFT names them
(``<module>.lora_A.default.weight``) and a pack exports as a PEFT adapter unchanged
(``mlilt.export.peft``).

open_clip's attention is a fused ``nn.MultiheadAttention`` whose forward reads
``in_proj_weight`` and ``out_proj.weight`` directly. PEFT 0.21's LoRA for it always adapts
``out_proj`` as well (no way to choose) and does so by deleting the module's weights and
assigning merged ones around every call, which a module shared by serving threads must not
do. Those two weights keep mlilt's weight parametrisation (``LoRADelta``, tensors named
``<module>.parametrizations.<weight>.0.lora_A`` as before): the same W + (alpha/R)·B·A, with
no dropout (there is no input to drop out of a weight).

Defaults are the hand-written LoRA's: alpha = 2·R, no dropout, query and value (or the
fused qkv weight), A drawn from the same random stream, so packs trained before PEFT load
(``current_names`` maps their tensor names) and give the same outputs to float rounding.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mlilt.errors import UsageError
from mlilt.methods.base import Scope, method
from mlilt.methods.catalog import CATALOG
from mlilt.methods.inject import replace_module
from mlilt.towers.layout import find_layout

DEFAULT_RANK = CATALOG["lora"].default_arg
ALPHA_PER_RANK = 2.0  # alpha = 2·rank, the common LoRA setting and mlilt's default since its first LoRA
ADAPTER = "default"  # PEFT's adapter name: what PeftModel.from_pretrained loads by default

# Block-relative (module, parameter) of each ``targets`` role, per tower family. ``qkv`` of a
# family with separate projections is all three; a fused family has no single query.
ROLES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "bert": {"query": (("attention.self.query", "weight"),), "key": (("attention.self.key", "weight"),),
             "value": (("attention.self.value", "weight"),), "output": (("attention.output.dense", "weight"),),
             "up": (("intermediate.dense", "weight"),), "down": (("output.dense", "weight"),)},
    "hf-vit": {"query": (("attention.q_proj", "weight"),), "key": (("attention.k_proj", "weight"),),
               "value": (("attention.v_proj", "weight"),), "output": (("attention.o_proj", "weight"),),
               "up": (("mlp.fc1", "weight"),), "down": (("mlp.fc2", "weight"),)},
    "hf-vit4": {"query": (("attention.attention.query", "weight"),), "key": (("attention.attention.key", "weight"),),
                "value": (("attention.attention.value", "weight"),),
                "output": (("attention.output.dense", "weight"),), "up": (("intermediate.dense", "weight"),),
                "down": (("output.dense", "weight"),)},
    "timm-vit": {"qkv": (("attn.qkv", "weight"),), "output": (("attn.proj", "weight"),),
                 "up": (("mlp.fc1", "weight"),), "down": (("mlp.fc2", "weight"),)},
    "open_clip-vit": {"qkv": (("attn", "in_proj_weight"),), "output": (("attn.out_proj", "weight"),),
                      "up": (("mlp.c_fc", "weight"),), "down": (("mlp.c_proj", "weight"),)},
}
for _roles in ROLES.values():
    _roles.setdefault("qkv", _roles.get("query", ()) + _roles.get("key", ()) + _roles.get("value", ()))


@dataclass(frozen=True)
class LoRAOptions:
    """One ``lora`` part's settings, read from its spec options."""

    rank: int = DEFAULT_RANK
    alpha: float | None = None  # None: 2·rank
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # roles; None: the family's attention weights (towers/layout.py)

    @classmethod
    def from_spec(cls, rank: int | None, alpha: str | None = None, dropout: str | None = None,
                  targets: str | None = None) -> "LoRAOptions":
        if rank is not None and rank <= 0:
            raise UsageError(f"lora: the rank must be positive, not {rank}")
        return cls(rank or DEFAULT_RANK, float(alpha) if alpha is not None else None,
                   float(dropout) if dropout is not None else 0.0,
                   tuple(targets.split("-")) if targets is not None else None)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else ALPHA_PER_RANK * self.rank

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


class LoRADelta(nn.Module):
    """The weight parametrisation for weights PEFT cannot wrap (open_clip's fused attention)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scaling: float = ALPHA_PER_RANK):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # zero: starts as the base weight
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling


class TrainingStepDropout(nn.Dropout):
    """LoRA's dropout. Towers always run in eval mode (``Tower.train``), so ``training`` is
    never set: this drops out while a gradient is recorded (a training step) and never under
    ``no_grad`` (evaluation, encoding, cached features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=torch.is_grad_enabled(), inplace=False)


def apply(tower: nn.Module, arg: int | None, scope: Scope, **options: str) -> int:
    settings = LoRAOptions.from_spec(arg, **options)
    targets = [(module, param) for module, param in target_weights(tower, settings.targets) if scope(module)]
    config = None
    for module_name, param_name in targets:
        module = tower.get_submodule(module_name)
        if _peft_wraps(tower, module_name, module, param_name):
            config = config or _peft_config(settings)
            replace_module(tower, module_name, _peft_layer(module, settings, config))
        else:
            if settings.dropout:
                raise UsageError(f"lora: dropout needs the input of the adapted layer, and {module_name}.{param_name} "
                                 f"(a fused nn.MultiheadAttention weight) is adapted as a weight; "
                                 f"leave dropout out for this tower")
            weight = getattr(module, param_name)
            delta = LoRADelta(*weight.shape, settings.rank, settings.scaling).to(weight.dtype)
            parametrize.register_parametrization(module, param_name, delta, unsafe=True)
    return len(targets)


def target_weights(tower: nn.Module, roles: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """(module, parameter) of every weight the roles name in ``tower`` (None: the attention
    weights ``towers/layout.py`` lists); empty when the tower has no known blocks."""
    layout = find_layout(tower)
    if roles is None or not layout.lora_weights:
        return layout.lora_weights
    known = ROLES.get(layout.family, {})
    missing = [role for role in roles if not known.get(role)]
    if missing:
        have = "-".join(role for role, weights in known.items() if weights)
        raise UsageError(f"lora: targets {'-'.join(missing)} do not exist in a {layout.family} tower "
                         f"({'q, k and v are one fused weight there: use qkv; ' if 'qkv' in have else ''}"
                         f"its targets: {have})")
    wanted = {weight for role in roles for weight in known[role]}
    return [(f"{block}.{module}", param) for block in layout.blocks for module, param in _ordered(known, wanted)]


def _ordered(known: dict, wanted: set) -> list[tuple[str, str]]:
    """The wanted weights once each, in the roles' order (query before value, as the layout lists them)."""
    seen: list[tuple[str, str]] = []
    for weights in known.values():
        seen += [weight for weight in weights if weight in wanted and weight not in seen]
    return seen


def _peft_wraps(tower: nn.Module, module_name: str, module: nn.Module, param_name: str) -> bool:
    """A Linear whose own forward runs: not the ``out_proj`` that nn.MultiheadAttention reads directly."""
    if not (isinstance(module, nn.Linear) and param_name == "weight"):
        return False
    parent = module_name.rpartition(".")[0]
    return not isinstance(tower.get_submodule(parent) if parent else tower, nn.MultiheadAttention)


def _peft_config(settings: LoRAOptions):
    from peft import LoraConfig  # here: parsing a spec or loading a non-LoRA pack need not import PEFT

    return LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.dropout,
                      init_lora_weights=False)  # A is drawn below, from the stream the hand-written LoRA used


def _peft_layer(linear: nn.Linear, settings: LoRAOptions, config) -> nn.Module:
    from peft.tuners.lora import Linear as LoraLinear

    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws would move the seed's stream
        layer = (LoraLinear if settings.dropout else _merged_linear_class())(
            linear, ADAPTER, config=config, r=settings.rank, lora_alpha=settings.lora_alpha)
    lora_a = torch.empty(settings.rank, linear.in_features)
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # as LoRADelta did: same seed, same A
    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.copy_(lora_a)
        layer.lora_B[ADAPTER].weight.zero_()  # zero: starts as the base layer
    if settings.dropout:
        layer.lora_dropout[ADAPTER] = TrainingStepDropout(settings.dropout)
    return layer


_MERGED = None


def _merged_linear_class():
    """PEFT's LoRA Linear whose forward runs one matmul with W + (alpha/R)·B·A, as the
    hand-written LoRA did, instead of ``base(x) + B(A(x))·alpha/R``: the same layer, names,
    state and PEFT export, equal to float rounding. On a CPU the two skinny rank-R matmuls
    (and their backward) cost more than the merged weight's dense gradient: a [1600, 384]
    query layer of me5-small took 96-106 ms per forward + backward against 76-84 ms merged
    (2 shared cores, interleaved), and a whole anchored ``lora:8@text`` step 9% longer. Used
    without dropout only: dropout acts on the input, so it needs PEFT's own forward."""
    global _MERGED
    if _MERGED is None:
        from peft.tuners.lora import Linear as LoraLinear

        class MergedLoraLinear(LoraLinear):
            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                if args or kwargs or self.disable_adapters or self.merged or ADAPTER not in self.active_adapters:
                    return super().forward(x, *args, **kwargs)
                base = self.base_layer
                delta = self.lora_B[ADAPTER].weight @ self.lora_A[ADAPTER].weight
                return F.linear(x, base.weight + delta.to(base.weight.dtype) * self.scaling[ADAPTER], base.bias)

        _MERGED = MergedLoraLinear
    return _MERGED


_PEFT_NAME = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<factor>[AB])\.default\.weight|base_layer\.(?P<param>\w+))$")


def current_names(tensors: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Pack tensors saved before PEFT wrapped LoRA's Linear layers, renamed to what the model
    now calls them (``wanted``). The hand-written LoRA parametrised the Linear's weight, so a
    pack has ``<module>.parametrizations.weight.0.lora_A`` for ``<module>.lora_A.default.weight``,
    and a weight or bias of that Linear another method trains (bitfit, unlock) under
    ``<module>.bias`` / ``<module>.parametrizations.weight.original`` for
    ``<module>.base_layer.bias`` / ``.weight``. Names that match already are left alone."""
    renamed = dict(tensors)
    for name in wanted - set(tensors):
        match = _PEFT_NAME.match(name)
        if match is None:
            continue
        module, param = match["module"], match["param"]
        if match["factor"]:
            legacy = f"{module}.parametrizations.weight.0.lora_{match['factor']}"
        else:
            legacy = f"{module}.parametrizations.weight.original" if param == "weight" else f"{module}.{param}"
        if legacy in renamed and legacy not in wanted:
            renamed[name] = renamed.pop(legacy)
    return renamed


METHOD = method("lora", apply)

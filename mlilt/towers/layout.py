"""Where the parts of a tower are: its blocks, the sub-block outputs adapters follow, the
attention weights LoRA adapts, and the layers after the last block.

Methods ask this module instead of knowing every architecture. Known families are listed
as block-relative name patterns; anything else falls back to the longest list of
same-class blocks, and methods say when they find nothing to act on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mlilt.errors import UsageError

# Containers of the main blocks, most specific first.
BLOCK_CONTAINERS = ("encoder.layer", "encoder.layers", "layers", "transformer.resblocks", "blocks", "stages")


@dataclass(frozen=True)
class BlockPattern:
    """Block-relative names for one architecture family."""

    family: str
    adapter_sites: tuple[str, ...]  # outputs of the attention and feed-forward sub-blocks
    lora_weights: tuple[tuple[str, str], ...]  # (module, parameter) attention projections


BLOCK_PATTERNS = (
    # BERT, XLM-R, mBERT, mE5 (post-LN: adapters go before the residual LayerNorm, as LilT does)
    BlockPattern("bert", ("attention.output.dense", "output.dense"),
                 (("attention.self.query", "weight"), ("attention.self.value", "weight"))),
    # Hugging Face ViT/DeiT in transformers >= 5
    BlockPattern("hf-vit", ("attention.o_proj", "mlp.fc2"),
                 (("attention.q_proj", "weight"), ("attention.v_proj", "weight"))),
    # Hugging Face ViT/DeiT in transformers 4
    BlockPattern("hf-vit4", ("attention.output.dense", "output.dense"),
                 (("attention.attention.query", "weight"), ("attention.attention.value", "weight"))),
    # timm ViT/DeiT
    BlockPattern("timm-vit", ("attn.proj", "mlp.fc2"), (("attn.qkv", "weight"),)),
    # open_clip ViT: nn.MultiheadAttention keeps q/k/v fused in in_proj_weight; the LayerScale
    # slots (Identity unless enabled) sit exactly on each sub-block's output.
    BlockPattern("open_clip-vit", ("ls_1", "ls_2"), (("attn", "in_proj_weight"),)),
)

# Root-level parameters that belong after the blocks (open_clip's visual projection).
TAIL_ROOT_PARAMS = ("proj", "text_projection")


@dataclass
class TowerLayout:
    blocks: list[str] = field(default_factory=list)
    tail_params: list[str] = field(default_factory=list)
    adapter_sites: list[str] = field(default_factory=list)
    lora_weights: list[tuple[str, str]] = field(default_factory=list)
    family: str = "unknown"


def find_layout(module: nn.Module) -> TowerLayout:
    container = _block_container(module)
    if container is None:
        return TowerLayout()
    prefix, blocks_module = container
    blocks = [f"{prefix}.{name}" for name, _ in blocks_module.named_children()]
    layout = TowerLayout(blocks=blocks, tail_params=_tail_params(module, prefix))
    pattern = _matching_pattern(module, blocks)
    if pattern is not None:
        layout.family = pattern.family
        layout.adapter_sites = [f"{b}.{site}" for b in blocks for site in pattern.adapter_sites]
        layout.lora_weights = [(f"{b}.{m}", p) for b in blocks for m, p in pattern.lora_weights]
    return layout


def last_blocks(layout: TowerLayout, count: int, part: str, where: str) -> list[str]:
    """The last ``count`` blocks of a layout; a UsageError naming ``part`` and ``where`` if it has fewer."""
    if count > len(layout.blocks):
        raise UsageError(f"{part}: the {where} has only {len(layout.blocks)} blocks")
    return layout.blocks[-count:]


def _block_container(module: nn.Module) -> tuple[str, nn.Module] | None:
    modules = dict(module.named_modules())
    for name in BLOCK_CONTAINERS:
        for candidate in (name, *[n for n in modules if n.endswith("." + name)]):
            found = modules.get(candidate)
            if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) >= 1:
                return candidate, found
    best = None
    for name, found in modules.items():
        if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) >= 2:
            kinds = {type(child) for child in found}
            if len(kinds) == 1 and (best is None or len(found) > len(best[1])):
                best = (name, found)
    return best


def _matching_pattern(module: nn.Module, blocks: list[str]) -> BlockPattern | None:
    names = {name for name, _ in module.named_modules()}
    for pattern in BLOCK_PATTERNS:
        wanted = [f"{blocks[0]}.{site}" for site in pattern.adapter_sites]
        wanted += [f"{blocks[0]}.{m}" for m, _ in pattern.lora_weights]
        if all(name in names for name in wanted):
            return pattern
    return None


def _tail_params(module: nn.Module, container: str) -> list[str]:
    """Parameters of modules registered after the block container, plus the projections
    that some towers keep as bare parameters on an ancestor (open_clip's ``proj``)."""
    seen_container = False
    tail = []
    for name, child in module.named_modules():
        qualified = f"{name}." if name else ""
        if not name or container.startswith(qualified):  # the root or an ancestor
            tail += [qualified + p for p, _ in child.named_parameters(recurse=False) if p in TAIL_ROOT_PARAMS]
            continue
        if name == container:
            seen_container = True
        elif seen_container and not name.startswith(container + "."):
            tail += [qualified + p for p, _ in child.named_parameters(recurse=False)]
    return tail

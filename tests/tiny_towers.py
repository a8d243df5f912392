"""Tiny random towers of every family (2 layers, width 32), built inside the tests. The text
towers run padding-free, as training and serving copies do."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (BertConfig, BertModel, PreTrainedTokenizerFast, ViTConfig, ViTModel, XLMRobertaConfig,
                          XLMRobertaModel)

from mlilt.speed.packed import PADDING_FREE
from mlilt.towers.hf_text import HFTextTower
from mlilt.towers.hf_vision import HFVisionTower
from mlilt.towers.open_clip_vision import OpenClipImageTower
from mlilt.towers.preprocess import ImagePreprocess
from mlilt.towers.timm_vision import TimmImageTower

WORDS = ("a large small red blue green yellow circle square triangle star left right top bottom and "
         "kubwa ndogo nyekundu bluu duara mraba na").split()
PREPROCESS = ImagePreprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + list(WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_text_tower(seed: int = 0) -> HFTextTower:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return HFTextTower(f"tiny-bert-{seed}", BertModel(config, add_pooling_layer=False), tiny_tokenizer(),
                       max_length=32, runner=PADDING_FREE).freeze()


def tiny_xlmr_text_tower(seed: int = 0, pooling: str = "mean") -> HFTextTower:
    """XLM-R's layout: position ids counted from the padding token, as the offline me5 tower's
    BERT is not."""
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return HFTextTower(f"tiny-xlmr-{seed}", XLMRobertaModel(config, add_pooling_layer=False), tiny_tokenizer(),
                       pooling=pooling, max_length=32, runner=PADDING_FREE).freeze()


def save_tiny_text_tower(folder) -> HFTextTower:
    """``tiny_text_tower()`` saved as a Hugging Face folder (model and tokenizer) at ``folder``."""
    tower = tiny_text_tower()
    tower.model.save_pretrained(folder)
    tower.tokenizer.save_pretrained(folder)
    return tower


def tiny_hf_vit() -> HFVisionTower:
    torch.manual_seed(1)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    return HFVisionTower("tiny-hf-vit", ViTModel(config, add_pooling_layer=False), PREPROCESS).freeze()


def tiny_timm_vit() -> TimmImageTower:
    import timm
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=32,
                              num_heads=2, img_size=32, patch_size=8)
    return TimmImageTower("tiny-timm-vit", model, PREPROCESS).freeze()


def tiny_timm_cnn() -> TimmImageTower:
    import timm
    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    return TimmImageTower("tiny-timm-cnn", model, PREPROCESS).freeze()


def tiny_open_clip_vit() -> OpenClipImageTower:
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(4)
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                               output_dim=16)
    return OpenClipImageTower("tiny-open_clip-vit", visual, PREPROCESS).freeze()


IMAGE_TOWERS = {"hf-vit": tiny_hf_vit, "timm-vit": tiny_timm_vit, "timm-cnn": tiny_timm_cnn,
                "open_clip-vit": tiny_open_clip_vit}


class ForwardCalls:
    """Forward passes of a loaded tower and of every copy made of it from now on: a forward hook
    on the loaded tower, which copies carry with them (a plain function: deepcopy shares it)."""

    def __init__(self, tower):
        base = tower.shared_from.tower if tower.shared_from is not None else tower
        self.count = 0

        def seen(*_):
            self.count += 1
        self.handle = base.register_forward_hook(seen)



TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def save_tiny_open_clip(folder, seed: int = 0, name: str = "mlilt-tiny-clip") -> str:
    """A tiny random open_clip model: its config registered with open_clip, its weights saved in
    ``folder``; returns its ``MODEL:PRETRAINED`` spec (the weights file as PRETRAINED)."""
    import json
    from pathlib import Path

    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / f"{name}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
    torch.save(model.state_dict(), folder / f"weights-{seed}.pt")
    return f"{name}:{folder / f'weights-{seed}.pt'}"


def train_tiny_pack(root, lang: str = "sw", **overrides):
    """A pack trained on tiny demo pairs with the tiny BERT + CNN towers (registered by the
    caller, e.g. the ``tiny_cnn_towers`` fixture): ``method`` ln, width 16, one epoch."""
    from mlilt.demo.data import generate_demo
    from mlilt.training import TrainConfig, train

    generate_demo(root / "data", [lang], n=40, image_size=32)
    settings = dict(lang=lang, data=str(root / "data" / lang / "train.jsonl"), out=str(root / lang),
                    text_tower="tiny-bert-0", image_tower="tiny-timm-cnn", embed_dim=16, epochs=1, batch_size=8,
                    method="ln", checkpoint_every=0)
    return train(TrainConfig(**{**settings, **overrides})).pack


def save_tiny_tower_folders(folder) -> tuple[str, str]:
    """Tiny BERT and tiny HF ViT saved as Hugging Face folders (towers a subprocess can load):
    their (text, image) specs."""
    from transformers import ViTImageProcessor

    text, image = tiny_text_tower(), tiny_hf_vit()
    text.model.save_pretrained(folder / "text")
    text.tokenizer.save_pretrained(folder / "text")
    image.model.save_pretrained(folder / "image")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      do_center_crop=False).save_pretrained(folder / "image")
    return str(folder / "text"), str(folder / "image")


def run_mlilt(*args: str, threads: int = 1, timeout: int = 900):
    """``python -m mlilt ARGS`` in a new process with ``threads`` OpenMP threads."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-m", "mlilt", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)

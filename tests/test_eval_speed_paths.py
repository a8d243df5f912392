"""The fast paths of evaluation compute what the plain paths compute.

Captions are tokenized once, sorted by token count, padded per batch, and the captions of
every language a text side is evaluated on share one pass; images go through the tower once.
These tests check the behaviour (same embeddings, same metrics, the batches and tower calls
that happen), not timings.
"""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mlilt.data.images import ImageRef
from mlilt.modeling.encode import TokenizedTexts, encode_texts
from mlilt.evaluation.evaluate import PairsRetrievalSet
from mlilt.evaluation.runner import ImageSpace, evaluate_sets
from mlilt.modeling.model import SideEncoder
from mlilt.towers.hf_text import HFTextTower
from tiny_towers import ForwardCalls, tiny_text_tower, tiny_timm_vit

pytestmark = pytest.mark.usefixtures("one_thread")

# Character length and token count disagree: "a a a a a a" is 11 characters and 6 words,
# "triangle" 8 characters and 1 word.
CAPTIONS = ["a a a a a a", "triangle", "red", "a large red circle left and a small blue square right",
            "star", "a a a", "green triangle top", "kubwa ndogo nyekundu bluu duara mraba na", "blue",
            "a small yellow star bottom and a large green circle top and a red square left"]


@pytest.fixture(scope="module")
def text_side() -> SideEncoder:
    tower = tiny_text_tower()
    torch.manual_seed(0)
    return SideEncoder(tower, 16, base=tower)


def _one_by_one(encoder: SideEncoder, texts: list[str]) -> torch.Tensor:
    rows = []
    for text in texts:
        tokens = encoder.tower.tokenize([text])  # a batch of one: no padding at all
        rows.append(encoder(tokens["input_ids"], tokens["attention_mask"]))
    return torch.cat(rows)


@pytest.mark.parametrize("side", ["right", "left"])
def test_texts_tokenized_once_pad_each_batch_as_the_tokenizer_does(text_side, side, monkeypatch):
    tower = text_side.tower
    monkeypatch.setattr(tower.tokenizer, "padding_side", side)
    tokens = TokenizedTexts(tower, CAPTIONS)
    assert tokens.standalone and tokens.lengths() == [len(row) for row in tower.tokenize(CAPTIONS, pad=False)["input_ids"]]
    for batch in ([0, 1, 2, 3], [5, 2], [4]):
        input_ids, attention_mask = tokens.batch(batch)
        wanted = tower.tokenize([CAPTIONS[i] for i in batch])
        assert torch.equal(input_ids, wanted["input_ids"])
        assert torch.equal(attention_mask, wanted["attention_mask"])


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_sorted_per_batch_padding_gives_the_unpadded_embeddings(text_side, batch_size):
    with torch.no_grad():
        wanted = _one_by_one(text_side, CAPTIONS)
    got = encode_texts(text_side, CAPTIONS, batch_size=batch_size)
    assert got.shape == wanted.shape
    torch.testing.assert_close(got, wanted, atol=1e-5, rtol=1e-4)


def test_batches_are_sorted_by_token_count_not_characters(text_side):
    widths, sizes = [], []

    def record(module, args):
        sizes.append(args[0].shape[0])
        widths.append(args[0].shape[1])

    hook = text_side.tower.register_forward_pre_hook(record)
    try:
        encode_texts(text_side, CAPTIONS, batch_size=3)
    finally:
        hook.remove()
    counts = sorted(len(ids) for ids in text_side.tower.tokenize(CAPTIONS, pad=False)["input_ids"])
    # Each batch is padded to its longest caption, and batches take the sorted counts in turn:
    # the fewest padded positions any batching of these captions into 3s can have.
    assert widths == [counts[min(i + 3, len(counts)) - 1] for i in range(0, len(counts), 3)]
    assert sizes == [3, 3, 3, 1]


class PaddedOnlyTower(HFTextTower):
    """A tower whose tokenize always pads (as open_clip's tokenizers do)."""

    def tokenize(self, texts):
        return super().tokenize(texts)


def test_a_tower_that_only_pads_still_encodes_every_caption(text_side):
    base = text_side.tower
    tower = PaddedOnlyTower(base.spec, base.model, base.tokenizer, max_length=base.max_length).freeze()
    encoder = SideEncoder(tower, 16, base=tower)
    encoder.proj.load_state_dict(text_side.proj.state_dict())
    torch.testing.assert_close(encode_texts(encoder, CAPTIONS, batch_size=4), encode_texts(text_side, CAPTIONS),
                               atol=1e-5, rtol=1e-4)
    assert encode_texts(encoder, []).shape == (0, 16)


def _png(seed: int) -> ImageRef:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return ImageRef.from_bytes(buffer.getvalue(), name=f"image-{seed}")


def _sets() -> list[PairsRetrievalSet]:
    images = [_png(seed) for seed in range(4)]
    sets = []
    for index, lang in enumerate(["en", "sw", "de"]):
        captions = CAPTIONS[index:index + 4]  # each language its own captions, one per image
        sets.append(PairsRetrievalSet("toy", lang, images, captions, [0, 1, 2, 3]))
    return sets


def test_languages_share_one_caption_pass_and_one_image_pass(text_side):
    image_tower = tiny_timm_vit()
    image = SideEncoder(image_tower, 16, base=image_tower)
    text_calls, image_calls = ForwardCalls(text_side.tower), ForwardCalls(image_tower)
    together = evaluate_sets(text_side, ImageSpace(image, use_cache=False), _sets(), "toy", "toy")
    # 3 languages x 4 captions fit one batch of 64; 4 images one batch of 32.
    assert text_calls.count == 1
    assert image_calls.count == 1
    alone = [evaluate_sets(text_side, ImageSpace(image, use_cache=False), [item], "toy", "toy")[0]
             for item in _sets()]
    assert [r.language for r in together] == ["en", "sw", "de"]
    assert [r.metrics for r in together] == [r.metrics for r in alone]

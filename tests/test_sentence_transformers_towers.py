"""sentence-transformers models load through sentence-transformers itself: every module counts
(Transformer, Pooling in each mode, Dense, Normalize, prompts), and the tower gives what
``SentenceTransformer(folder).encode`` gives. Methods attach to its encoder as to any Hugging
Face tower, train, and their packs load back onto it, fingerprint checked.

Each model here is a tiny BERT (``tiny_towers.save_tiny_text_tower``) wrapped in
sentence-transformers' own modules and saved by ``SentenceTransformer.save``."""
from __future__ import annotations

import gc

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

import mlilt
from mlilt.errors import MliltError, PackError, TowerLoadError, UsageError
from mlilt.modeling.factory import build_sides
from mlilt.packs import read_pack
from mlilt.speed.packed import use_padding_free
from mlilt.towers.hf_text import HFTextTower
from mlilt.towers.layout import find_layout
from mlilt.towers.registry import load_text_tower, resolve
from mlilt.towers.st_text import SentenceTransformerTower, is_sentence_transformers
from tiny_towers import save_tiny_text_tower, train_tiny_pack

TEXTS = ["a red circle", "blue square and star left", "kubwa", "small green triangle top right and a star"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert") / "bert"
    save_tiny_text_tower(folder)
    return folder


def save_st(folder, bert, *head, transformer: dict | None = None, **model_kwargs):
    """A sentence-transformers model of ``bert`` and ``head`` saved at ``folder`` by the library."""
    torch.manual_seed(7)  # Dense layers start from fixed random weights
    modules = [Transformer(str(bert), **(transformer or {"max_seq_length": 32}))]
    modules += list(head)
    SentenceTransformer(modules=modules, device="cpu", **model_kwargs).save(str(folder))
    return folder


def features(tower, texts=TEXTS) -> torch.Tensor:
    """The tower's output before mlilt's projection, as training computes it."""
    tokens = tower.tokenize(texts)
    with torch.no_grad():
        return tower(tokens["input_ids"], tokens["attention_mask"])


def encoded(folder, texts=TEXTS, **kwargs) -> torch.Tensor:
    return torch.as_tensor(SentenceTransformer(str(folder), device="cpu").encode(texts, **kwargs))


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    assert float((actual - expected).abs().max()) <= TOLERANCE


HEADS = {
    "pooling": lambda mode: [Pooling(32, pooling_mode=mode)],
    "dense": lambda mode: [Pooling(32, pooling_mode=mode), Dense(32, 16)],
    "dense+normalize": lambda mode: [Pooling(32, pooling_mode=mode), Dense(32, 16, activation_function=torch.nn.GELU()),
                                     Normalize()],
}


@pytest.mark.parametrize("mode", Pooling.POOLING_MODES)
@pytest.mark.parametrize("head", list(HEADS))
def test_each_pooling_mode_dense_and_normalize_give_what_encode_gives(bert_folder, tmp_path, mode, head):
    folder = save_st(tmp_path / "st", bert_folder, *HEADS[head](mode))
    tower = load_text_tower(str(folder))  # as `mlilt train --text-tower FOLDER` loads it
    assert isinstance(tower, SentenceTransformerTower) and tower.pooling == mode
    assert tower.width == (32 if head == "pooling" else 16)
    out = features(tower)
    assert out.shape == (len(TEXTS), tower.width)
    assert_close(out, encoded(folder))
    if head == "dense+normalize":
        assert torch.allclose(out.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_several_pooling_modes_concatenate_as_encode_does(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode=("cls", "max", "mean")), Dense(96, 16))
    tower = load_text_tower(str(folder))
    assert tower.pooling == "cls+max+mean" and tower.width == 16
    assert_close(features(tower), encoded(folder))


def test_the_default_prompt_is_put_before_every_caption(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="mean"),
                     prompts={"query": "query ", "caption": "top left "}, default_prompt_name="caption")
    tower = load_text_tower(str(folder))
    assert tower.prefix == "top left "
    assert_close(features(tower), encoded(folder))  # encode uses the default prompt too
    assert not torch.allclose(features(tower), encoded(folder, prompt=""), atol=1e-3)


def test_without_a_default_prompt_the_query_prompt_is_used_and_an_asked_prefix_wins(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="cls"),
                     prompts={"query": "top left ", "document": ""})
    tower = load_text_tower(str(folder))
    assert tower.prefix == "top left "
    assert_close(features(tower), encoded(folder, prompt_name="query"))
    plain = load_text_tower(str(folder), prefix="")
    assert plain.prefix == "" and plain.fingerprint() != tower.fingerprint()
    assert_close(features(plain), encoded(folder))


@pytest.mark.parametrize("mode", ["mean", "cls", "weightedmean", "lasttoken"])
def test_a_pooling_that_leaves_the_prompt_out_leaves_it_out(bert_folder, tmp_path, mode):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode=mode, include_prompt=False),
                     prompts={"caption": "top left and "}, default_prompt_name="caption")
    tower = load_text_tower(str(folder))
    assert tower.prompt_length == 4  # [CLS] top left and
    assert_close(features(tower), encoded(folder))


def test_lower_casing_and_the_models_max_length_are_honoured(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="mean"),
                     transformer={"max_seq_length": 6, "do_lower_case": True})
    tower = load_text_tower(str(folder), max_length=64)
    assert tower.max_length == 6  # the model's shorter limit wins; a shorter mlilt limit would win too
    texts = ["A RED Circle", "Blue square and star left top"]
    assert max(len(ids) for ids in tower.tokenize(texts, pad=False)["input_ids"]) == 6
    assert_close(features(tower, texts), encoded(folder, texts))
    assert load_text_tower(str(folder), max_length=4).max_length == 4


def test_padding_free_runs_and_gives_the_same_features(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="max"), Dense(32, 16), Normalize())
    tower = load_text_tower(str(folder)).share_frozen_clone()
    assert use_padding_free(tower) and tower.runs_padding_free
    assert_close(features(tower), encoded(folder))
    assert tower.packing_problem is None  # the first batch's check agreed with the padded forward


def test_the_fingerprint_covers_every_module(bert_folder, tmp_path):
    base = save_st(tmp_path / "base", bert_folder, Pooling(32, pooling_mode="cls"), Dense(32, 16))
    fingerprint = load_text_tower(str(base)).fingerprint()
    assert load_text_tower(str(base), max_length=16).fingerprint() != fingerprint
    others = {
        "pooling": save_st(tmp_path / "pooling", bert_folder, Pooling(32, pooling_mode="max"), Dense(32, 16)),
        "normalize": save_st(tmp_path / "normalize", bert_folder, Pooling(32, pooling_mode="cls"), Dense(32, 16),
                             Normalize()),
        "activation": save_st(tmp_path / "activation", bert_folder, Pooling(32, pooling_mode="cls"),
                              Dense(32, 16, activation_function=torch.nn.GELU())),
        "prompt": save_st(tmp_path / "prompt", bert_folder, Pooling(32, pooling_mode="cls"), Dense(32, 16),
                          prompts={"query": "top "}),
    }
    dense = tmp_path / "dense"
    st = SentenceTransformer(str(base), device="cpu")
    with torch.no_grad():
        st[2].linear.weight[0, 0] += 1e-3
    st.save(str(dense))
    others["dense weights"] = dense
    for what, folder in others.items():
        assert load_text_tower(str(folder)).fingerprint() != fingerprint, what
    copy = tmp_path / "copy"
    SentenceTransformer(str(base), device="cpu").save(str(copy))
    assert load_text_tower(str(copy)).fingerprint() == fingerprint  # where it lives does not count


@pytest.mark.parametrize("method", ["ln", "bitfit", "adapter", "lora", "ln+adapter+top:1", "unlock:1"])
def test_methods_attach_to_the_encoder_as_on_a_plain_hugging_face_tower(bert_folder, tmp_path, method):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="mean"), Dense(32, 16), Normalize())
    st_tower, hf_tower = load_text_tower(str(folder)), load_text_tower(str(bert_folder))
    assert type(hf_tower) is HFTextTower
    assert find_layout(st_tower).blocks == find_layout(hf_tower).blocks == ["model.encoder.layer.0",
                                                                          "model.encoder.layer.1"]
    trained = {}
    for name, tower in (("st", st_tower), ("hf", hf_tower)):
        sides, _ = build_sides({"text": tower}, method, 8)
        trained[name] = {n for n, p in sides["text"].tower.named_parameters() if p.requires_grad}
    in_encoder = {n for n in trained["st"] if n.startswith("model.")}
    assert in_encoder == trained["hf"]
    head = trained["st"] - in_encoder  # the Dense after the blocks: a layer after the last block
    expected_head = {"bitfit": {"head.1.linear.bias"}, "unlock:1": {"head.1.linear.weight", "head.1.linear.bias"}}
    assert head == expected_head.get(method, set())


@pytest.mark.usefixtures("tiny_cnn_towers")
@pytest.mark.parametrize("method", ["ln", "lora"])
def test_a_method_trains_and_its_pack_loads_back_with_its_fingerprint_checked(bert_folder, tmp_path, method):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="max"), Dense(32, 16), Normalize(),
                     prompts={"query": "top "})
    pack_path = train_tiny_pack(tmp_path, "sw", text_tower=str(folder), method=method)
    pack = read_pack(pack_path)
    tower = load_text_tower(str(folder))
    assert pack.config.towers["text"]["fingerprint"] == tower.fingerprint()
    assert pack.config.towers["text"]["options"] == {"pooling": "max", "max_length": 32, "prefix": "top "}
    trained = pack.side_tensors("text")
    assert any(".model.encoder.layer." in name for name in trained), sorted(trained)[:5]
    model = mlilt.load(pack_path)
    assert model.encode_text(["duara nyekundu"], lang="sw").shape == (1, 16)
    # the same folder with another Dense: the pack refuses it
    del model, tower
    gc.collect()  # loaded towers are shared only while something holds them
    st = SentenceTransformer(str(folder), device="cpu")
    with torch.no_grad():
        st[2].linear.bias += 0.1
    st.save(str(folder))
    with pytest.raises(PackError, match="fingerprint"):
        mlilt.load(pack_path)


def test_a_pooling_other_than_the_models_own_is_refused(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="cls"))
    assert load_text_tower(str(folder), pooling="cls").pooling == "cls"
    with pytest.raises(UsageError, match="pools by 'cls'"):
        load_text_tower(str(folder), pooling="mean")


def test_a_model_the_tower_cannot_run_whole_is_refused(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32), Pooling(32))
    with pytest.raises(TowerLoadError, match="2 Pooling modules"):
        load_text_tower(str(folder))


def test_detection_and_the_st_prefix(bert_folder, tmp_path):
    folder = save_st(tmp_path / "st", bert_folder, Pooling(32, pooling_mode="lasttoken"))
    assert is_sentence_transformers(folder) and not is_sentence_transformers(bert_folder)
    assert not is_sentence_transformers("no-such-org/no-such-model")  # offline: only the cache is asked
    assert resolve(f"st:{folder}", "text").family == "st"
    assert_close(features(load_text_tower(f"st:{folder}")), encoded(folder))
    # st: on a plain transformers folder: the library's own default (mean pooling), as encode has it
    plain = load_text_tower(f"st:{bert_folder}")
    assert isinstance(plain, SentenceTransformerTower) and plain.pooling == "mean"
    assert_close(features(plain), torch.as_tensor(SentenceTransformer(str(bert_folder), device="cpu").encode(TEXTS)))
    with pytest.raises(MliltError):
        load_text_tower("st:no-such-org/no-such-model")


def test_the_tokenizer_is_handed_back_only_where_the_same_one_loads_again(bert_folder, tmp_path):
    plain = load_text_tower(str(save_st(tmp_path / "plain", bert_folder, Pooling(32))))
    expected = features(plain)
    assert plain.tokenizer_slot.hand_back() and not plain.tokenizer_slot.held
    assert_close(features(plain), expected)  # loaded again from the Transformer's folder
    folder = save_st(tmp_path / "lower", bert_folder, Pooling(32),
                     transformer={"max_seq_length": 32, "do_lower_case": True})
    lowered = load_text_tower(str(folder))
    # sentence-transformers saves its lower-casing into the tokenizer: what loads again lower-cases
    # too (a tokenizer that loaded otherwise would stay in memory instead)
    lowered.tokenizer_slot.hand_back()
    assert_close(features(lowered, ["A RED Circle"]), encoded(folder, ["A RED Circle"]))

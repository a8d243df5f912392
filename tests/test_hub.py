"""Packs on the Hub: the model card, what a push uploads, and loading from a Hugging Face
cache populated here the way huggingface_hub lays it out. Never reaches the network: the
upload itself (create_repo, upload_folder) cannot be tested here, only what it is given."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.errors import PackError, UsageError
from mlilt.evaluation.evaluate import find_packs
from mlilt.hub import model_card, parse_hub_ref, prepared_upload, pull, push
from mlilt.hub.card import hub_datasets, hub_id_of_tower
from mlilt.packs import PACK_CONFIG, PACK_TENSORS, read_pack, resolve_pack
from mlilt.training.anchors import load_anchor
from mlilt.training.teachers import PackTeacher, load_teacher
from tiny_towers import train_tiny_pack

pytestmark = pytest.mark.usefixtures("one_thread")
import huggingface_hub as hf  # noqa: E402  (a declared dependency: missing is a failure)

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "user/sw-pack"


@pytest.fixture(scope="module")
def tiny_pack(tiny_cnn_towers, tmp_path_factory):
    """A Swahili pack on the tiny towers (towers stay registered for the module)."""
    return train_tiny_pack(tmp_path_factory.mktemp("hub-pack"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own, offline mode on."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs=("main",)) -> Path:
    """Lay ``files`` out as huggingface_hub does: content-addressed blobs, a snapshot folder of
    relative links to them per commit, and refs/<branch-or-tag> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline: huggingface_hub reads it as is
    return snapshot


def pushed_files(pack_folder: Path, repo_id: str = REPO) -> dict[str, bytes]:
    """The files a push of ``pack_folder`` would upload (what a pull downloads back)."""
    with prepared_upload(read_pack(pack_folder), repo_id) as stage:
        return {p.name: p.read_bytes() for p in stage.iterdir()}


def variant(pack_folder: Path, tmp: Path, **changes) -> Path:
    """A copy of the pack whose langpack.json differs (the tensors, and their checks, stay valid)."""
    out = tmp / f"variant-{len(list(tmp.iterdir()))}"
    shutil.copytree(pack_folder, out)
    raw = json.loads((out / PACK_CONFIG).read_text())
    raw.update(changes)
    (out / PACK_CONFIG).write_text(json.dumps(raw, indent=2, sort_keys=True))
    return out


# ---- the card ---------------------------------------------------------------------------

def test_the_card_parses_back_with_its_metadata_and_validation_metrics(tiny_pack, tmp_path):
    pack = read_pack(tiny_pack)
    (tmp_path / "README.md").write_text(model_card(pack, REPO, license="cc-by-4.0"))
    card = hf.ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.library_name == "mlilt" and data.language == ["sw"] and data.license == "cc-by-4.0"
    assert {"mlilt", "image-text", "clip", "language-pack", "ln"} <= set(data.tags)
    assert data.base_model is None  # the tiny towers (like the embedded ones) are no Hub models
    assert data.datasets is None  # trained from a local file
    assert data.to_dict()["mlilt"]["tensors_sha256"] == pack.config.tensors_sha256
    val = pack.config.metrics["val"]
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == set(val)
    assert results["mean_recall"].metric_value == pytest.approx(val["mean_recall"], abs=1e-3)
    assert all(r.dataset_split == "validation" and "held-out" in r.dataset_name for r in results.values())
    assert results["image_retrieval_recall@1"].metric_name == "image retrieval (text→image) R@1"
    body = card.text
    assert f'mlilt.load("hf://{REPO}")' in body and 'lang="sw"' in body
    assert "tiny-bert-0" in body and "`ln`" in body and "held out of the training data" in body
    assert str(tiny_pack.parent) not in body  # the trainer's local paths stay out of the card text
    assert model_card(pack, REPO).count("license: apache-2.0") == 1  # the default licence


def test_an_anchored_distilled_pack_has_its_card_too(tiny_pack):
    pack = read_pack(tiny_pack)
    teacher = str(tiny_pack.parent / "en")
    pack.config = replace(pack.config, anchor={"name": teacher, "image_side_id": pack.config.image_side_id},
                          data={**pack.config.data, "teacher": {"spec": teacher, "width": 16},
                                "parallel": {"pairs": 60, "files": ["someone/parallel-en-sw", "/home/me/en_sw.tsv"]}},
                          metrics={"val": {"distill_target_to_source_recall@1": 50.0, "mean_recall": 40.0}})
    card = hf.ModelCard(model_card(pack, REPO))
    assert {"anchored", "distilled"} <= set(card.data.tags)
    assert card.data.datasets == ["someone/parallel-en-sw"]
    tasks = {r.metric_type: r.task_type for r in card.data.eval_results}
    assert tasks == {"distill_target_to_source_recall@1": "sentence-similarity", "mean_recall": "image-text-retrieval"}
    assert "Anchored to `en`" in card.text and "en_sw.tsv" in card.text
    assert str(tiny_pack.parent) not in card.text and "/home/me" not in card.text


def test_base_models_and_datasets_are_claimed_only_for_hub_ids():
    assert hub_id_of_tower("hf:intfloat/multilingual-e5-small", "text") == "intfloat/multilingual-e5-small"
    assert hub_id_of_tower("google/vit-base-patch16-224", "image") == "google/vit-base-patch16-224"
    assert hub_id_of_tower("open_clip:hf-hub:timm/ViT-B-16-SigLIP", "image") == "timm/ViT-B-16-SigLIP"
    for spec, side in [("me5-small", "text"), ("effnet-lite0", "image"), ("ViT-B-32:openai", "image"),
                       ("tf_efficientnet_lite0", "image"), ("tiny-bert-0", "text")]:
        assert hub_id_of_tower(spec, side) is None, spec
    assert hub_datasets({"source": "someone/captions-sw:train"}) == ["someone/captions-sw"]
    assert hub_datasets({"source": "/data/sw/train.jsonl", "parallel": {"source": "en_sw.tsv"}}) == []


# ---- push: what would be uploaded, and refusals before any network call --------------------

def test_a_push_stages_the_pack_and_its_card_without_touching_the_pack_folder(tiny_pack, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(tiny_pack, folder)
    (folder / "notes.txt").write_text("private")
    before = sorted(p.name for p in folder.iterdir())
    files = pushed_files(folder)
    assert set(files) == {PACK_CONFIG, PACK_TENSORS, "metrics.jsonl", "README.md"}
    assert files[PACK_TENSORS] == (folder / PACK_TENSORS).read_bytes()
    assert hf.ModelCard(files["README.md"].decode()).data.library_name == "mlilt"
    assert sorted(p.name for p in folder.iterdir()) == before  # no README.md written into the user's pack
    own = tmp_path / "card.md"
    own.write_text("---\nlicense: mit\n---\n# mine\n")
    with prepared_upload(read_pack(folder), REPO, card=own) as stage:
        assert (stage / "README.md").read_text() == own.read_text()


@pytest.fixture
def no_network(monkeypatch):
    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a network client was made")

    monkeypatch.setattr(hf, "HfApi", Refused)


def test_push_refuses_a_folder_that_is_not_a_pack_before_any_network_call(tiny_pack, tmp_path, no_network):
    (tmp_path / "not-a-pack").mkdir()
    with pytest.raises(PackError, match="not a complete pack"):
        push(tmp_path / "not-a-pack", REPO)
    result = CliRunner().invoke(app, ["packs", "push", str(tmp_path / "not-a-pack"), REPO])
    assert result.exit_code == PackError.exit_code, result.output
    with pytest.raises(UsageError, match="not a Hub model repo id"):
        push(tiny_pack, "not a repo!")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE=1"):  # conftest: offline
        push(tiny_pack, REPO)


# ---- pull and hf:// from the cache ---------------------------------------------------------

def test_a_pack_loads_from_the_hub_cache_as_it_does_from_its_folder(tiny_pack, hub_cache):
    snapshot = cache_snapshot(hub_cache, REPO, pushed_files(tiny_pack), COMMIT_A)
    assert resolve_pack(f"hf://{REPO}") == snapshot
    model = mlilt.load(f"hf://{REPO}")
    assert model.languages == ["sw"]
    local = mlilt.load(tiny_pack)
    text = ["duara nyekundu", "mraba wa bluu"]
    assert torch.allclose(model.encode_text(text, lang="sw"), local.encode_text(text, lang="sw"))


def test_other_commands_take_hf_packs_through_resolve_pack(tiny_pack, hub_cache):
    cache_snapshot(hub_cache, REPO, pushed_files(tiny_pack), COMMIT_A)
    spec = f"hf://{REPO}"
    assert [p.config.language for p in find_packs([spec])] == ["sw"]  # mlilt eval --pack
    teacher = load_teacher(spec)  # mlilt train --teacher
    assert isinstance(teacher, PackTeacher) and teacher.spec == spec
    anchor = load_anchor(spec)  # mlilt train --anchor: the name recorded is the hf:// spec
    assert anchor.record() == {"name": spec, "image_side_id": read_pack(tiny_pack).config.image_side_id}
    with pytest.raises(UsageError, match="not in the Hugging Face cache"):
        load_anchor("hf://user/missing")


def test_a_revision_is_chosen_by_at_or_by_revision(tiny_pack, hub_cache, tmp_path):
    old = variant(tiny_pack, tmp_path, created="2026-01-01T00:00:00+00:00")
    new = variant(tiny_pack, tmp_path, created="2026-06-01T00:00:00+00:00")
    cache_snapshot(hub_cache, REPO, pushed_files(old), COMMIT_A, refs=("v1",))
    cache_snapshot(hub_cache, REPO, pushed_files(new), COMMIT_B, refs=("main",))

    def created(spec):
        return read_pack(spec).config.created[:7]

    assert created(f"hf://{REPO}") == "2026-06"
    assert created(f"hf://{REPO}@v1") == "2026-01"
    assert created(f"hf://{REPO}@{COMMIT_A}") == "2026-01"
    assert pull(REPO, revision="v1").commit == COMMIT_A
    with pytest.raises(UsageError, match="give one"):
        parse_hub_ref(f"hf://{REPO}@v1", revision="main")
    with pytest.raises(PackError, match="not in the Hugging Face cache"):
        read_pack(f"hf://{REPO}@v2")


def test_a_damaged_or_incomplete_snapshot_is_refused(tiny_pack, hub_cache):
    snapshot = cache_snapshot(hub_cache, REPO, pushed_files(tiny_pack), COMMIT_A)
    blob = (snapshot / PACK_TENSORS).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(PackError, match="nothing from it was used") as error:
        mlilt.load(f"hf://{REPO}")
    assert "--force-download" in str(error.value) and COMMIT_A[:12] in str(error.value)
    (snapshot / PACK_TENSORS).unlink()  # a download interrupted before the tensors arrived
    with pytest.raises(PackError, match=f"{PACK_TENSORS} is missing"):
        mlilt.load(f"hf://{REPO}")
    cache_snapshot(hub_cache, "user/not-a-pack", {"README.md": b"# hello\n"}, COMMIT_B)
    with pytest.raises(PackError, match="holds no mlilt pack"):
        mlilt.load("hf://user/not-a-pack")


def test_offline_without_the_snapshot_says_so_and_how_to_fix_it(hub_cache):
    with pytest.raises(PackError) as error:
        mlilt.load("hf://user/missing@v3")
    message = str(error.value)
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    assert "mlilt packs pull user/missing --revision v3" in message
    result = CliRunner().invoke(app, ["packs", "pull", "user/missing"])
    assert result.exit_code == PackError.exit_code and "HF_HUB_OFFLINE" in result.output


def test_pull_out_copies_the_checked_pack_and_keeps_an_existing_one(tiny_pack, hub_cache, tmp_path):
    snapshot = cache_snapshot(hub_cache, REPO, pushed_files(tiny_pack), COMMIT_A, refs=("main", "v1"))
    out = tmp_path / "pulled"
    runner = CliRunner()
    result = runner.invoke(app, ["packs", "pull", f"hf://{REPO}@v1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in snapshot.iterdir())
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links into the cache
    assert read_pack(out).config.tensors_sha256 == read_pack(tiny_pack).config.tensors_sha256
    result = runner.invoke(app, ["packs", "pull", REPO, "--out", str(out)])
    assert result.exit_code == UsageError.exit_code and "--overwrite" in result.output
    assert runner.invoke(app, ["packs", "pull", REPO, "--out", str(out), "--overwrite"]).exit_code == 0
    # a damaged snapshot is not copied anywhere
    blob = (snapshot / PACK_TENSORS).resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    result = runner.invoke(app, ["packs", "pull", REPO, "--out", str(tmp_path / "fresh")])
    assert result.exit_code == PackError.exit_code and not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_card_from_another_pack_is_a_warning(tiny_pack, hub_cache):
    files = pushed_files(tiny_pack)
    card = files["README.md"].decode().replace(read_pack(tiny_pack).config.tensors_sha256, "f" * 64)
    files["README.md"] = card.encode()
    cache_snapshot(hub_cache, REPO, files, COMMIT_A)
    with pytest.warns(UserWarning, match="describes another pack"):
        pulled = pull(REPO)
    assert pulled.pack.config.language == "sw"
    with pytest.warns(UserWarning, match="describes another pack"):
        mlilt.load(f"hf://{REPO}")



def test_push_makes_one_commit_of_the_staged_folder(tiny_pack, monkeypatch):
    """The calls a push makes, on a stand-in client (the Hub itself is never reached here)."""
    calls = []

    class FakeApi:
        def __init__(self, token=None, **kwargs):
            calls.append(("client", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, repo_id, folder_path, revision, commit_message, delete_patterns):
            calls.append(("upload", repo_id, revision, sorted(p.name for p in Path(folder_path).iterdir()),
                          delete_patterns))
            return type("CommitInfo", (), {"oid": COMMIT_A, "commit_url": f"https://hub/{repo_id}/commit/x"})()

        def create_tag(self, repo_id, tag, revision):
            calls.append(("create_tag", repo_id, tag, revision))

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", False)
    pushed = push(tiny_pack, REPO, private=True, revision="exp", tag="v1", token="tok")
    assert pushed.commit == COMMIT_A
    assert calls == [("client", "tok"), ("create_repo", REPO, True, True), ("create_branch", REPO, "exp"),
                     ("upload", REPO, "exp", ["README.md", PACK_CONFIG, PACK_TENSORS, "metrics.jsonl"], None),
                     ("create_tag", REPO, "v1", COMMIT_A)]


def test_an_interrupted_download_found_offline_says_how_to_finish_it(tiny_pack, hub_cache):
    """huggingface_hub >= 1 keeps each commit's file listing: offline, a snapshot missing a listed
    file is reported incomplete rather than returned (its private writer is used to set that up)."""
    tree = pytest.importorskip("huggingface_hub._tree_cache")
    if not hasattr(hf.errors, "IncompleteSnapshotError"):
        pytest.skip("this huggingface_hub keeps no file listings")
    files = pushed_files(tiny_pack)
    snapshot = cache_snapshot(hub_cache, REPO, files, COMMIT_A)
    tree.write_tree_cache(str(snapshot.parent.parent), COMMIT_A,
                          {name: tree.TreeCacheEntry(size=len(data), blob_id=hashlib.sha1(data).hexdigest())
                           for name, data in files.items()})
    (snapshot / PACK_TENSORS).unlink()
    with pytest.raises(PackError, match="incomplete .interrupted..*mlilt packs pull user/sw-pack"):
        mlilt.load(f"hf://{REPO}")

"""WebDataset shards (written here with webdataset's TarWriter) and lazily read dataset images:
the same pairs as JSON Lines, no image bytes in memory, clear messages for bad input, URLs."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlilt.data import shards as shard_module
from mlilt.data.images import load_image
from mlilt.data.pairs import read_pairs
from mlilt.errors import DataError, UsageError

import webdataset as wds  # noqa: E402  (in the test extra: missing is a failure)

CAPTIONS = ["a red circle", "a blue square", "a green star", "a small triangle", "a large red star",
            "a yellow circle left", "a blue star right", "a green square top", "a red triangle bottom"]


def image_bytes(index: int, fmt: str = "PNG", size=(32, 32)) -> bytes:
    """A distinct picture per index (noise, so JPEGs differ too)."""
    pixels = np.random.default_rng(index).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """``samples`` as webdataset writes them: a dict of suffix -> bytes/str/dict plus ``__key__``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def caption(index: int) -> str:
    return CAPTIONS[index] if index < len(CAPTIONS) else f"a red circle and a blue square {index}"


def sample(index: int, **extra) -> dict:
    return {"__key__": f"{index:06d}", "png": image_bytes(index), "txt": caption(index), **extra}


@pytest.fixture
def three_shards(tmp_path):
    """9 samples over shards/000.tar..002.tar, and the same pairs as JSONL over image files."""
    for shard in range(3):
        write_shard(tmp_path / "shards" / f"{shard:03d}.tar", [sample(3 * shard + i) for i in range(3)])
    rows = []
    for index, caption in enumerate(CAPTIONS):
        image = tmp_path / "files" / f"img{index}.png"
        image.parent.mkdir(exist_ok=True)
        image.write_bytes(image_bytes(index))
        rows.append(json.dumps({"image": str(image), "caption": caption}))
    (tmp_path / "files" / "train.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def pattern(root: Path) -> str:
    return str(root / "shards" / "{000..002}.tar")


# --------------------------------------------------------------------------- same pairs as JSONL


def test_a_brace_pattern_of_shards_reads_as_the_jsonl_of_the_same_images(three_shards):
    from_shards = read_pairs(pattern(three_shards), lang="sw")
    from_jsonl = read_pairs(three_shards / "files" / "train.jsonl", lang="sw")
    assert [p.caption for p in from_shards] == CAPTIONS  # shard order, then tar order
    assert [(p.image.id, p.caption, p.lang) for p in from_shards] == \
           [(p.image.id, p.caption, p.lang) for p in from_jsonl]
    assert from_shards.summary() == {**from_jsonl.summary(), "source": pattern(three_shards)}
    first = from_shards.pairs[0]
    assert first.source == f"{three_shards / 'shards' / '000.tar'}:000000"
    assert first.image.name == f"{three_shards / 'shards' / '000.tar'}:000000.png"
    assert first.image.path is None
    assert first.image.data == image_bytes(0)  # code written for in-memory images still works
    assert np.array_equal(np.asarray(load_image(first.image)), np.asarray(load_image(from_jsonl.pairs[0].image)))


def test_a_double_colon_list_and_a_single_shard(three_shards):
    shards = three_shards / "shards"
    listed = read_pairs(f"{shards / '002.tar'}::{shards / '{000..001}.tar'}")
    assert [p.caption for p in listed] == CAPTIONS[6:] + CAPTIONS[:6]
    assert [p.caption for p in read_pairs(shards / "001.tar")] == CAPTIONS[3:6]


def test_keys_and_suffixes_are_grouped_as_webdataset_groups_them(tmp_path):
    """Upper-case suffixes, keys in folders, dotted suffixes, __meta__ members, names without a
    suffix and json captions."""
    path = tmp_path / "mixed.tar"
    members = [("__info__", b"{}"), ("__index__/x0.txt", b"meta"), ("a/x1.JPG", image_bytes(1, "JPEG")), ("a/x1.txt", b"one"),
               ("a/x1.seg.png", image_bytes(9)), ("x2.webp", image_bytes(2, "WEBP")),
               ("x2.json", json.dumps({"caption": "two", "lang": "sw"}).encode()),
               ("README", b"not a sample"), ("x3.jpeg", image_bytes(3, "JPEG")), ("x3.txt", "tatu ✓".encode())]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    theirs = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in
              wds.WebDataset(str(path), shardshuffle=False)]
    pairs = read_pairs(path)
    ours = [p.source.rpartition(":")[2] for p in pairs]
    assert ours == [key for key, _ in theirs] == ["a/x1", "x2", "x3"]
    assert [p.caption for p in pairs] == ["one", "two", "tatu ✓"]
    assert [p.lang for p in pairs] == [None, "sw", None]
    assert pairs.pairs[0].image.data == image_bytes(1, "JPEG")  # x1.seg.png is not "png"
    assert len(read_pairs(path, lang="sw")) == 3  # json lang kept; the others take --lang


def test_image_and_caption_columns_pick_members_and_json_fields(tmp_path):
    path = write_shard(tmp_path / "cols.tar", [
        {"__key__": "k0", "jpg": image_bytes(0, "JPEG"), "webp": image_bytes(5, "WEBP"), "txt": "plain",
         "en.txt": "english", "json": {"alt": "from json", "language": "en"}},
    ])
    default = read_pairs(path).pairs[0]
    assert (default.caption, default.image.data) == ("plain", image_bytes(0, "JPEG"))
    picked = read_pairs(path, image_column="webp", caption_column="en.txt").pairs[0]
    assert (picked.caption, picked.image.data) == ("english", image_bytes(5, "WEBP"))
    from_json = read_pairs(path, caption_column="alt", lang_column="language").pairs[0]
    assert (from_json.caption, from_json.lang) == ("from json", "en")


# --------------------------------------------------------------------------- memory


def test_pairs_over_shards_hold_no_image_bytes(three_shards):
    pairs = read_pairs(pattern(three_shards))
    refs = [pair.image for pair in pairs]
    assert all(ref._bytes is None and isinstance(ref.stored, shard_module.TarMember) for ref in refs)
    assert len({ref.id for ref in refs}) == len(CAPTIONS)  # hashing keeps no bytes either
    assert all(ref._bytes is None for ref in refs)
    total = sum(len(image_bytes(i)) for i in range(len(CAPTIONS)))
    assert len(pickle.dumps(pairs)) < total / 4  # refs and captions only
    assert [r.read_bytes() for r in pickle.loads(pickle.dumps(refs))] == [image_bytes(i) for i in range(9)]


def test_dataset_images_are_read_from_the_arrow_table_not_copied(tmp_path, hf_cache):
    import pyarrow as pa

    count = 24
    dataset = hf_cache.Dataset.from_dict(
        {"image": [{"bytes": image_bytes(i, size=(64, 64)), "path": None} for i in range(count)],
         "caption": [f"caption {i}" for i in range(count)]},
        features=hf_cache.Features({"image": hf_cache.Image(), "caption": hf_cache.Value("string")}))
    dataset.save_to_disk(str(tmp_path / "disk"))
    before = pa.total_allocated_bytes()
    pairs = read_pairs(tmp_path / "disk", check_images=False)
    assert all(pair.image._bytes is None and pair.image.stored is not None for pair in pairs)
    assert pa.total_allocated_bytes() - before < len(image_bytes(0, size=(64, 64)))  # memory-mapped
    assert [pair.image.read_bytes() for pair in pairs] == [image_bytes(i, size=(64, 64)) for i in range(count)]
    assert pairs.summary()["images"] == count


# --------------------------------------------------------------------------- training


def _pack_tensors(pack_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(pack_dir / "langpack.safetensors"))


def test_training_on_shards_gives_the_pack_of_the_jsonl(three_shards, tiny_cnn_towers, tmp_path):
    from mlilt.training import TrainConfig, train

    for shard in range(3, 8):  # 24 images: enough for a held-out split
        write_shard(three_shards / "shards" / f"{shard:03d}.tar", [sample(3 * shard + i) for i in range(3)])
    rows = [json.dumps({"image": str(_image_file(three_shards, i)), "caption": caption(i)}) for i in range(24)]
    (three_shards / "files" / "all.jsonl").write_text("\n".join(rows) + "\n")
    settings = dict(lang="sw", text_tower="tiny-bert-0", image_tower="tiny-timm-cnn", embed_dim=16, epochs=1,
                    batch_size=8, method="ln", checkpoint_every=0, holdout=4)
    shards = train(TrainConfig(data=str(three_shards / "shards" / "{000..007}.tar"),
                               out=str(tmp_path / "from-shards"), **settings))
    jsonl = train(TrainConfig(data=str(three_shards / "files" / "all.jsonl"), out=str(tmp_path / "from-jsonl"),
                              **settings))
    ours, theirs = _pack_tensors(tmp_path / "from-shards"), _pack_tensors(tmp_path / "from-jsonl")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k].numpy(), theirs[k].numpy()) for k in ours)
    summaries = [json.loads((result.pack / "langpack.json").read_text())["data"] for result in (shards, jsonl)]
    assert summaries[0]["sha256"] == summaries[1]["sha256"] and summaries[0]["rows"] == 24


def test_the_feature_cache_serves_shard_images_and_files_alike(three_shards, tiny_cnn_towers, tmp_path):
    from mlilt.data.feature_cache import FeatureCache, tower_features

    tower = tiny_cnn_towers["image"]
    cache = FeatureCache(tower, root=tmp_path / "features")
    from_shards = tower_features(tower, [p.image for p in read_pairs(pattern(three_shards))], cache=cache)
    assert (cache.hits, cache.misses) == (0, 9)
    from_files = tower_features(tower, [p.image for p in read_pairs(three_shards / "files" / "train.jsonl")],
                                cache=cache)
    assert (cache.hits, cache.misses) == (9, 9)
    assert torch.equal(from_shards, from_files)


def _image_file(root: Path, index: int) -> Path:
    path = root / "files" / f"img{index}.png"
    if not path.exists():
        path.write_bytes(image_bytes(index))
    return path


# --------------------------------------------------------------------------- bad input


def test_a_member_that_is_not_an_image_names_shard_and_member(tmp_path):
    path = write_shard(tmp_path / "bad.tar", [sample(0), {"__key__": "000001", "png": b"junk", "txt": "x"},
                                              sample(2)])
    with pytest.raises(DataError, match=r"bad\.tar:000001\.png: not a readable image"):
        read_pairs(path)
    pairs = read_pairs(path, skip_bad=True)
    assert [p.caption for p in pairs] == [CAPTIONS[0], CAPTIONS[2]]
    assert pairs.skipped == {"unreadable_image": 1}


def test_samples_without_a_caption_or_an_image_are_reported_and_counted(tmp_path):
    path = write_shard(tmp_path / "gaps.tar", [
        sample(0), {"__key__": "000001", "png": image_bytes(1)}, {"__key__": "000002", "txt": "orphan"},
        {"__key__": "000003", "png": image_bytes(3), "json": {"url": "http://x"}}, sample(4)])
    with pytest.raises(DataError, match=r"gaps\.tar:000001: sample 000001 has an image \(000001\.png\) but no "
                                        r"caption \(no \.txt member and no caption, text, sentences, captions"):
        read_pairs(path)
    pairs = read_pairs(path, skip_bad=True)
    assert [p.caption for p in pairs] == [CAPTIONS[0], CAPTIONS[4]]
    assert pairs.skipped == {"missing_caption": 2, "missing_image": 1}
    orphan = write_shard(tmp_path / "orphan.tar", [{"__key__": "000002", "txt": "orphan"}])
    with pytest.raises(DataError, match=r"orphan\.tar:000002: sample 000002 has a caption but no image \(images: "
                                        r"\.jpg, \.jpeg, \.png, \.webp; found: \.txt\)"):
        read_pairs(orphan)


def test_missing_shards_empty_entries_and_other_wrong_sources(three_shards, tmp_path):
    shards = three_shards / "shards"
    with pytest.raises(DataError, match=r"no such shard: .*003\.tar, .*004\.tar \(2 of the 5 shards of"):
        read_pairs(str(shards / "{000..004}.tar"))
    with pytest.raises(DataError, match=r"no such shard: .*nope\.tar$"):
        read_pairs(shards / "nope.tar")
    with pytest.raises(UsageError, match="empty entry"):
        read_pairs(f"{shards / '000.tar'}::")
    with pytest.raises(UsageError, match="bad brace pattern"):
        read_pairs(str(shards / "{000..002.tar"))
    with pytest.raises(UsageError, match=r"not a \.tar"):
        read_pairs(str(shards / "{a,b}.jsonl"))
    with pytest.raises(UsageError, match=r"compressed shards \(\.tar\.gz\).*gunzip"):
        read_pairs(shards / "000.tar.gz")
    (tmp_path / "fake.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(DataError, match=r"fake\.tar: not an uncompressed tar"):
        read_pairs(tmp_path / "fake.tar")


def test_a_truncated_or_changed_shard_is_an_error_not_wrong_bytes(three_shards, tmp_path):
    whole = (three_shards / "shards" / "000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.tar"):
        read_pairs(cut)
    copy = tmp_path / "copy.tar"
    copy.write_bytes(whole)
    pairs = read_pairs(copy, check_images=False)
    copy.write_bytes(whole[::-1])  # same size, new contents
    with pytest.raises(DataError, match=r"copy\.tar:000000\.png: the shard changed"):
        load_image(pairs.pairs[0].image)


# --------------------------------------------------------------------------- URLs


@pytest.fixture
def served(three_shards, monkeypatch):
    """A local HTTP server over tmp_path (not the network), with downloads switched on."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    handler = functools.partial(_QuietHandler, directory=str(three_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server, three_shards
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_url_shards_are_downloaded_once_and_read_as_local_ones(served, three_shards, monkeypatch):
    base, server, _ = served
    url = f"{base}/shards/{{000..002}}.tar"
    pairs = read_pairs(url)
    assert pairs.summary() == {**read_pairs(pattern(three_shards)).summary(), "source": url}
    assert pairs.pairs[0].image.name == f"{base}/shards/000.tar:000000.png"
    cached = shard_module.cached_path(f"{base}/shards/000.tar")
    assert cached.is_file() and not list(cached.parent.glob(".*partial"))
    server.shutdown()  # cached now: no server needed, offline mode or not
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert read_pairs(url).summary() == pairs.summary()


def test_offline_uncached_and_failed_downloads_are_clear_and_cache_nothing(served, monkeypatch):
    base, _, root = served
    with pytest.raises(DataError, match=r"nope\.tar: download failed \(HTTP 404"):
        read_pairs(f"{base}/shards/nope.tar")
    assert not shard_module.cached_path(f"{base}/shards/nope.tar").exists()
    (root / "files" / "page.tar").write_text("<html>a login page</html>")
    with pytest.raises(DataError, match=r"page\.tar: the download is not an uncompressed tar file.*nothing was cached"):
        read_pairs(f"{base}/files/page.tar")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"000\.tar: this shard is not downloaded yet and downloads are off "
                                        r"\(HF_HUB_OFFLINE=1\)"):
        read_pairs(f"{base}/shards/000.tar")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # datasets' own switch wins when set
    assert len(read_pairs(f"{base}/shards/000.tar")) == 3


def test_a_download_cut_short_never_counts_as_a_shard(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    whole = write_shard(tmp_path / "s.tar", [sample(0)]).read_bytes()

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(whole)))
            self.end_headers()
            self.wfile.write(whole[:1000])  # then the connection closes

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/s.tar"
    try:
        with pytest.raises(DataError, match=r"s\.tar: download (cut short|failed)"):
            read_pairs(url)
    finally:
        server.shutdown()
        server.server_close()
    folder = shard_module.cached_path(url).parent
    assert not folder.exists() or os.listdir(folder) == []

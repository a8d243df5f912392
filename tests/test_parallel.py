"""The parallel-sentences reader: every format, every documented bad input, counts and hash."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mlilt.data.parallel import ParallelSet, read_parallel
from mlilt.errors import DataError, UsageError

# --------------------------------------------------------------------------- helpers


def write_tsv(path: Path, lines: list[str]) -> Path:
    """``lines`` as a UTF-8 file, gzipped when its name ends in ``.gz``."""
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    return write_tsv(path, [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows])


def pairs(result: ParallelSet) -> list[tuple[str, str]]:
    return list(zip(result.sources, result.targets))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["p.tsv", "p.tsv.gz"])
def test_tsv_with_extra_target_columns(tmp_path, name):
    lines = ["  a cat\t paka ", "", "two dogs\tmbwa wawili\tdeux chiens", "  \t ", " \tpaka", "x\ty\r"]
    data = write_tsv(tmp_path / name, lines)
    result = read_parallel(data)
    assert pairs(result) == [("a cat", "paka"), ("two dogs", "mbwa wawili"), ("two dogs", "deux chiens"),
                             ("x", "y")]
    assert len(result) == 4
    assert result.counts == {"rows": 4, "pairs": 4, "skipped_bad": 0, "empty_dropped": 1, "duplicates_dropped": 0}


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.gz"])
def test_jsonl_with_target_lists_and_inner_text_kept(tmp_path, name):
    data = write_jsonl(tmp_path / name, [
        {"source": " a  cat ", "target": "paka\u00a0mdogo"},
        {"source": "dogs", "target": ["mbwa", " chiens "]},
        {"english": "sun", "non_english": "jua", "extra": 1},
    ])
    assert pairs(read_parallel(data)) == [("a  cat", "paka\u00a0mdogo"), ("dogs", "mbwa"), ("dogs", "chiens"),
                                          ("sun", "jua")]


def _tiny_dataset(datasets, source="english", target="non_english"):
    return datasets.Dataset.from_dict({source: ["a cat", "dogs", " sun "], target: ["paka", "mbwa", "jua "],
                                       "other": [1, 2, 3]})


def test_parquet_arrow_and_save_to_disk(tmp_path, hf_cache):
    dataset = _tiny_dataset(hf_cache)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "disk"))
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    expected = [("a cat", "paka"), ("dogs", "mbwa"), ("sun", "jua")]
    for source in (tmp_path / "d.parquet", arrow, tmp_path / "disk"):
        assert pairs(read_parallel(source)) == expected, source
    hf_cache.DatasetDict({"train": dataset, "test": dataset.select([2])}).save_to_disk(str(tmp_path / "dd"))
    assert pairs(read_parallel(f"{tmp_path / 'dd'}:test")) == [("sun", "jua")]


def test_columns_option_names_fields_and_columns(tmp_path, hf_cache):
    _tiny_dataset(hf_cache, "en", "sw").to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet: no source and target columns .*found: en, sw, other.*columns="):
        read_parallel(tmp_path / "d.parquet")
    assert pairs(read_parallel(tmp_path / "d.parquet", columns=("en", "sw")))[0] == ("a cat", "paka")
    assert pairs(read_parallel(tmp_path / "d.parquet", columns=("sw", "en")))[0] == ("paka", "a cat")
    data = write_jsonl(tmp_path / "p.jsonl", [{"en": "a", "sw": "b", "source": "x", "target": "y"}])
    assert pairs(read_parallel(data, columns=("en", "sw"))) == [("a", "b")]
    with pytest.raises(UsageError, match="two non-empty names"):
        read_parallel(data, columns=("en",))


def test_several_files_are_concatenated_in_order_and_deduplicated_across(tmp_path, hf_cache):
    first = write_tsv(tmp_path / "a.tsv", ["one\tmoja", "two\tmbili"])
    second = write_jsonl(tmp_path / "b.jsonl", [{"source": "two", "target": "mbili"},
                                                {"source": "three", "target": "tatu"}])
    hf_cache.Dataset.from_dict({"source": ["four"], "target": ["nne"]}).to_parquet(str(tmp_path / "c.parquet"))
    result = read_parallel([str(second), first, tmp_path / "c.parquet"])
    assert pairs(result) == [("two", "mbili"), ("three", "tatu"), ("one", "moja"), ("four", "nne")]
    assert result.counts["duplicates_dropped"] == 1
    assert result.summary()["files"] == [str(second), str(first), str(tmp_path / "c.parquet")]


# --------------------------------------------------------------------------- bad rows

FINE = b'{"source": "fine", "target": "sawa"}\n\n'  # line 1, then a blank line 2
BAD_ROWS = [
    ("t.tsv", b"fine\tsawa\n\njust one column\n", "no tab"),
    ("t.tsv", b"fine\tsawa\n\ncaf\xe9\tkahawa\n", "not valid UTF-8"),
    ("j.jsonl", FINE + b'{"source": "x", "target": }\n', "malformed JSON"),
    ("j.jsonl", FINE + b'["x", "y"]\n', "expected a JSON object, got list"),
    ("j.jsonl", FINE + b'{"source": "x"}\n', "missing 'target' field (found: source)"),
    ("j.jsonl", FINE + b'{"text": "x"}\n', "missing source and target fields"),
    ("j.jsonl", FINE + b'{"source": 5, "target": "y"}\n', "source must be a string, got int"),
    ("j.jsonl", FINE + b'{"source": "x", "target": null}\n', "got null"),
    ("j.jsonl", FINE + b'{"source": "x", "target": ["y", 2]}\n', "got int"),
    ("j.jsonl", FINE + b'{"source": "x", "target": []}\n', "target list is empty"),
    ("j.jsonl", FINE + b'{"source": "\\ud800", "target": "y"}\n', "not valid UTF-8"),
]


@pytest.mark.parametrize("name,content,expected", BAD_ROWS, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(BAD_ROWS)])
def test_bad_row_names_file_and_line(tmp_path, name, content, expected):
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_parallel(data)
    message = str(info.value)
    assert message.startswith(f"{data}:3: "), message
    assert expected in message
    result = read_parallel(data, skip_bad=True)
    assert pairs(result) == [("fine", "sawa")]
    assert result.counts["skipped_bad"] == 1 and result.counts["rows"] == 2


def test_bad_dataset_row_names_the_row(tmp_path, hf_cache):
    dataset = hf_cache.Dataset.from_dict({"source": ["a", "b", "c"], "target": ["x", None, "z"]})
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet row 1: target must be a string .*got null"):
        read_parallel(tmp_path / "d.parquet")
    result = read_parallel(tmp_path / "d.parquet", skip_bad=True)
    assert pairs(result) == [("a", "x"), ("c", "z")] and result.counts["skipped_bad"] == 1


def test_skip_bad_counts_in_gz_and_across_files(tmp_path):
    first = write_tsv(tmp_path / "a.tsv.gz", ["ok\tsawa", "broken", "also broken"])
    second = write_jsonl(tmp_path / "b.jsonl", ["{", {"source": "yes", "target": "ndiyo"}])
    with pytest.raises(DataError, match=rf"{first}:2: no tab"):
        read_parallel([first, second])
    result = read_parallel([first, second], skip_bad=True)
    assert pairs(result) == [("ok", "sawa"), ("yes", "ndiyo")]
    assert result.counts == {"rows": 5, "pairs": 2, "skipped_bad": 3, "empty_dropped": 0, "duplicates_dropped": 0}


# --------------------------------------------------------------------------- empty, duplicates, summary


def test_empty_sentences_and_duplicates_are_dropped_and_counted(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"source": "a", "target": ["x", "  ", "x", " x "]},
        {"source": " \t", "target": ["y", "z"]},
        {"source": "a", "target": "x"},
        {"source": "a", "target": "X"},
    ])
    result = read_parallel(data)
    assert pairs(result) == [("a", "x"), ("a", "X")]
    assert result.counts == {"rows": 4, "pairs": 2, "skipped_bad": 0, "empty_dropped": 3, "duplicates_dropped": 3}


def test_summary_hash_follows_content_and_order(tmp_path):
    data = write_tsv(tmp_path / "a.tsv", ["one\tmoja", "two\tmbili"])
    summary = read_parallel(data).summary()
    assert {k: v for k, v in summary.items() if k != "sha256"} == {
        "rows": 2, "pairs": 2, "skipped_bad": 0, "empty_dropped": 0, "duplicates_dropped": 0, "files": [str(data)]}
    renamed = write_tsv(tmp_path / "b.tsv", [" one\tmoja ", "", "two\tmbili"])
    assert read_parallel(renamed).summary()["sha256"] == summary["sha256"]
    for name, lines in (("c.tsv", ["two\tmbili", "one\tmoja"]), ("d.tsv", ["one\tmoja", "two\tmbili!"])):
        assert read_parallel(write_tsv(tmp_path / name, lines)).summary()["sha256"] != summary["sha256"], lines
    json.dumps(summary)  # goes into pack metadata as is


# --------------------------------------------------------------------------- file-level errors


def test_missing_file_unknown_format_and_nothing_left(tmp_path):
    good = write_tsv(tmp_path / "a.tsv", ["one\tmoja"])
    for absent in (tmp_path / "absent.tsv.gz", tmp_path / "absent.jsonl", tmp_path / "gone"):
        with pytest.raises(DataError, match=rf"{absent}: no such file or folder"):
            read_parallel([good, absent])
    other = tmp_path / "p.txt"
    other.write_text("one\tmoja\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{other}: unsupported format '\.txt'.*supported: \.tsv"):
        read_parallel(other)
    not_gzip = tmp_path / "p.tsv.gz"
    not_gzip.write_text("one\tmoja\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{not_gzip}: not a valid gzip file"):
        read_parallel(not_gzip)
    empty = write_tsv(tmp_path / "e.tsv", ["one\t ", " \ttwo"])
    with pytest.raises(DataError, match=rf"no parallel pairs left in {empty} \(rows 2, skipped bad 0, empty dropped 2"):
        read_parallel(empty)
    with pytest.raises(DataError, match=r"pairs left in .*e\.tsv.*skipped bad 1.*first problem: .*b\.tsv:1: no tab"):
        read_parallel([write_tsv(tmp_path / "b.tsv", ["broken"]), empty], skip_bad=True)
    (tmp_path / "blank.tsv").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="file is empty"):
        read_parallel(tmp_path / "blank.tsv")
    with pytest.raises(UsageError, match="non-empty list"):
        read_parallel([])


def test_hub_name_failure_is_a_data_error(monkeypatch, hf_cache):
    import huggingface_hub.constants

    monkeypatch.setattr(hf_cache.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="nobody/no-such-parallel-set"):
        read_parallel("nobody/no-such-parallel-set:train")


def test_a_set_needs_one_target_per_source():
    with pytest.raises(UsageError, match="2 sources but 1 targets"):
        ParallelSet(("a", "b"), ("x",), {})

"""`mlilt data translate`: tiny random Marian, M2M100 and NLLB models built here, no network.

The models translate into nonsense, but deterministic nonsense: enough to check the plumbing
(language codes, forced BOS, formats, resume, the round-trip filter) end to end.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mlilt.cli import app
from mlilt.data.pairs import read_pairs
from mlilt.data.parallel import read_parallel
from mlilt.data.translate import translate_data
from mlilt.data.translation_models import FLORES, aliases, direction, language_codes, resolve_code
from mlilt.errors import UsageError

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")]
runner = CliRunner()

SENTENCES = ["a red circle on the left", "two blue squares", "a small green triangle",
             "the big yellow star at the top", "mduara mwekundu upande wa kushoto",
             "miraba miwili ya bluu", "pembetatu ndogo ya kijani", "nyota kubwa ya njano juu"]
CAPTIONS = ["a red circle", "two blue squares on the left", "a small green triangle", "the big star",
            "a yellow square at the top", "three red circles", "one blue triangle", "a green star",
            "two small squares", "a big red triangle on the right"]
TINY = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, init_std=0.5)
FAST = ["--num-beams", "1", "--max-length", "8", "--batch-size", "3", "--device", "cpu"]

# --------------------------------------------------------------------------- tiny models


def _sentencepiece(folder: Path) -> tuple[Path, list[str]]:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(SENTENCES * 4), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"),
                                   vocab_size=40, model_type="unigram", character_coverage=1.0, bos_id=-1,
                                   eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2, hard_vocab_limit=False,
                                   num_threads=1)
    processor = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    return folder / "sp.model", [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def _vocab(first: list[str], pieces: list[str], extra: list[str] = ()) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in [*first, *pieces, *extra]:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_marian(folder: Path, src: str, tgt: str, seed: int, targets: list[str] = ()) -> Path:
    """A MarianMTModel + MarianTokenizer; ``targets`` adds ``>>xx<<`` tokens (a multi-target model)."""
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    spm_file, pieces = _sentencepiece(folder / "spm")
    vocab = _vocab(["</s>", "<unk>", "<pad>"], pieces, [f">>{code}<<" for code in targets])
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    for name in ("source.spm", "target.spm"):
        shutil.copy(spm_file, folder / name)
    tokenizer = MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"),
                                source_lang=src, target_lang=tgt)
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=len(vocab), pad_token_id=2, eos_token_id=0, decoder_start_token_id=2,
                          forced_eos_token_id=0, **TINY)
    MarianMTModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_m2m100(folder: Path) -> Path:
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    spm_file, pieces = _sentencepiece(folder / "spm")
    (folder / "vocab.json").write_text(json.dumps(_vocab(["<s>", "<pad>", "</s>", "<unk>"], pieces)), "utf-8")
    tokenizer = M2M100Tokenizer(str(folder / "vocab.json"), str(spm_file))
    size = max(tokenizer.lang_code_to_id.values()) + 9  # language tokens and made-up words sit above the vocab
    torch.manual_seed(0)
    config = M2M100Config(vocab_size=size, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, **TINY)
    M2M100ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_nllb(folder: Path) -> Path:
    """M2M100 architecture + NllbTokenizer (its built-in FLORES-200 codes, an almost empty vocabulary)."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    tokenizer = NllbTokenizer()
    torch.manual_seed(0)
    config = M2M100Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          decoder_start_token_id=tokenizer.eos_token_id, **TINY)
    M2M100ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation-models")
    return {
        "marian": str(build_marian(root / "opus-mt-en-sw", "en", "sw", seed=0)),
        "marian_back": str(build_marian(root / "opus-mt-sw-en", "sw", "en", seed=1)),
        "m2m100": str(build_m2m100(root / "m2m100")),
    }


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    """Ten English pairs (one row with two captions) over five images, paths relative to the file."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    rows = []
    for i, caption in enumerate(CAPTIONS[:9]):
        name = f"images/{i % 5}.png"
        if not (tmp_path / "data" / name).exists():
            Image.new("RGB", (4, 4), (40 * i, 10, 200)).save(tmp_path / "data" / name)
        rows.append({"image": name, "caption": caption if i != 8 else [caption, CAPTIONS[9]], "lang": "en"})
    path = tmp_path / "data" / "en_pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def translate(*args: str):
    return runner.invoke(app, ["data", "translate", *args])


def is_subsequence(items: list, of: list) -> bool:
    rest = iter(of)
    return all(item in rest for item in items)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- outputs


def test_pairs_output_keeps_images_and_sets_lang(models, pairs_file, tmp_path):
    out = tmp_path / "out" / "sw_pairs.jsonl"
    result = translate("--data", str(pairs_file), "--to", "sw", "--model", models["marian"], "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "of 10 rows" in result.output
    rows = read_jsonl(out)
    source = read_pairs(pairs_file, check_images=False)
    assert len(rows) + json.loads(out.with_name(out.name + ".translate.json").read_text())["counts"][
        "dropped_empty"] == len(source) == 10
    by_caption = {pair.caption: pair for pair in source}
    for row in rows:
        assert set(row) == {"image", "caption", "lang", "source_caption"} and row["lang"] == "sw" and row["caption"]
        assert (out.parent / row["image"]).resolve() == by_caption[row["source_caption"]].image.path
    assert {pair.lang for pair in read_pairs(out)} == {"sw"}  # the output is a valid pairs file
    meta = json.loads((out.parent / "sw_pairs.jsonl.translate.json").read_text())
    assert meta["complete"] and meta["settings"]["to"] == "sw" and meta["done"] == 10
    assert not (out.parent / "sw_pairs.jsonl.partial").exists()


def test_parallel_output_from_pairs_and_from_sentences(models, pairs_file, tmp_path):
    out = tmp_path / "parallel.tsv"
    result = translate("--data", str(pairs_file), "--src", "en", "--to", "sw", "--model", models["m2m100"],
                       "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines and all(len(line.split("\t")) == 2 for line in lines)
    assert is_subsequence([line.split("\t")[0] for line in lines], CAPTIONS)  # input order
    assert len(read_parallel(out)) >= 1  # what `mlilt train --parallel` reads
    assert not any("__sw__" in line for line in lines)  # language tokens are not text

    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES[:4]) + "\n\n", encoding="utf-8")
    out2 = tmp_path / "parallel.jsonl"
    result = translate("--data", str(sentences), "--src", "en", "--to", "sw", "--model", models["m2m100"],
                       "--out", str(out2), *FAST)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out2)
    assert rows and all(set(row) == {"source", "target"} for row in rows)
    assert is_subsequence([row["source"] for row in rows], SENTENCES[:4])
    st_style = tmp_path / "en-sw.tsv"  # sentence-transformers' parallel file: its first column is read
    st_style.write_text("".join(f"{s}\tx\n" for s in SENTENCES[:3]), encoding="utf-8")
    out3 = tmp_path / "again.tsv"
    result = translate("--data", str(st_style), "--src", "en", "--to", "sw", "--model", models["m2m100"],
                       "--out", str(out3), *FAST)
    assert result.exit_code == 0, result.output
    assert is_subsequence([line.split("\t")[0] for line in out3.read_text().splitlines()], SENTENCES[:3])
    bad = translate("--data", str(sentences), "--src", "en", "--to", "sw", "--model", models["m2m100"],
                    "--out", str(tmp_path / "p.jsonl"), "--format", "pairs", *FAST)
    assert bad.exit_code == 2 and "needs image-caption pairs" in bad.output


# --------------------------------------------------------------------------- resume


def test_resume_after_interruption_matches_one_run(models, pairs_file, tmp_path):
    settings = dict(to="sw", model=models["m2m100"], src="en", batch_size=3, num_beams=1, max_length=8,
                    device="cpu")
    whole = translate_data(pairs_file, tmp_path / "a" / "out.jsonl", **settings)
    assert whole.resumed_from == 0 and whole.rows == 10

    out = tmp_path / "b" / "out.jsonl"

    def stop_after_two_batches(done, total):
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        translate_data(pairs_file, out, progress=stop_after_two_batches, **settings)
    partial = out.with_name("out.jsonl.partial")
    assert not out.exists() and partial.exists()
    with open(partial, "ab") as handle:  # a torn row: written after the sidecar's count
        handle.write(b'{"image": "images/3.png", "capt')

    result = translate("--data", str(pairs_file), "--src", "en", "--to", "sw", "--model", models["m2m100"],
                       "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert "resumed after row 6" in result.output
    assert out.read_bytes() == (tmp_path / "a" / "out.jsonl").read_bytes()
    assert not partial.exists()

    again = translate("--data", str(pairs_file), "--src", "en", "--to", "sw", "--model", models["m2m100"],
                      "--out", str(out), *FAST)
    assert again.exit_code == 0 and "already complete" in again.output


def test_changed_settings_refuse_unless_overwrite(models, pairs_file, tmp_path):
    out = tmp_path / "out.jsonl"
    base = ["--data", str(pairs_file), "--src", "en", "--model", models["m2m100"], "--out", str(out), *FAST]
    assert translate(*base, "--to", "sw").exit_code == 0
    finished = out.read_bytes()
    refused = translate(*base, "--to", "fr")
    assert refused.exit_code == 2, refused.output
    assert "other settings" in refused.output and "--overwrite" in refused.output and "'sw' -> 'fr'" in refused.output
    assert out.read_bytes() == finished  # a finished output is never lost

    def stop(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # --overwrite cut short: the old output stays
        translate_data(pairs_file, out, to="fr", model=models["m2m100"], src="en", batch_size=3, num_beams=1,
                       max_length=8, device="cpu", overwrite=True, progress=stop)
    assert out.read_bytes() == finished
    filtered = translate(*base, "--to", "fr", "--min-chrf", "10")  # differs from the partial too
    assert filtered.exit_code == 2 and "min_chrf" in filtered.output
    resumed = translate(*base, "--to", "fr")  # same settings as the partial: it resumes
    assert resumed.exit_code == 0 and "resumed after row 3" in resumed.output, resumed.output
    assert json.loads((tmp_path / "out.jsonl.translate.json").read_text())["settings"]["to"] == "fr"

    (tmp_path / "out.jsonl.translate.json").unlink()  # an output of unknown origin
    unknown = translate(*base, "--to", "fr")
    assert unknown.exit_code == 2 and "not written by mlilt data translate" in unknown.output
    assert translate(*base, "--to", "fr", "--overwrite").exit_code == 0


# --------------------------------------------------------------------------- round-trip filter


def test_min_chrf_keeps_rows_at_or_above_the_threshold(models, pairs_file, tmp_path):
    base = ["--data", str(pairs_file), "--src", "en", "--to", "sw", "--model", models["m2m100"], *FAST]
    everything = tmp_path / "all.jsonl"
    assert translate(*base, "--out", str(everything), "--min-chrf", "0").exit_code == 0
    rows = read_jsonl(everything)
    scores = [row["chrf"] for row in rows]
    assert rows and all(0 <= score <= 100 for score in scores)
    threshold = min(score for score in scores if score > min(scores))  # keeps some, drops some
    some = tmp_path / "some.jsonl"
    result = translate(*base, "--out", str(some), "--min-chrf", str(threshold))
    assert result.exit_code == 0, result.output
    kept = read_jsonl(some)
    assert kept == [row for row in rows if row["chrf"] >= threshold]
    assert 0 < len(kept) < len(rows)
    counts = json.loads((tmp_path / "some.jsonl.translate.json").read_text())["counts"]
    assert counts["kept"] == len(kept) and counts["dropped_chrf"] == len(rows) - len(kept)

    none = tmp_path / "none.tsv"
    result = translate(*base, "--out", str(none), "--min-chrf", "100")
    assert result.exit_code == 0, result.output
    assert none.read_text() == "" and f"kept 0 of 10 rows, dropped {len(rows)} below --min-chrf" in result.output


def test_marian_round_trip_needs_a_back_model(models, pairs_file, tmp_path):
    base = ["--data", str(pairs_file), "--to", "sw", "--model", models["marian"], *FAST, "--min-chrf", "0"]
    missing = translate(*base, "--out", str(tmp_path / "x.jsonl"))
    assert missing.exit_code == 2 and "needs --back-model" in missing.output and "opus-mt-sw-en" in missing.output
    wrong_way = translate(*base, "--out", str(tmp_path / "x.jsonl"), "--back-model", models["marian"])
    assert wrong_way.exit_code == 2 and "translates en -> sw, not sw -> en" in wrong_way.output
    result = translate(*base, "--out", str(tmp_path / "x.jsonl"), "--back-model", models["marian_back"])
    assert result.exit_code == 0, result.output
    assert all("chrf" in row for row in read_jsonl(tmp_path / "x.jsonl"))
    assert not list(tmp_path.glob("x.jsonl*.partial"))


# --------------------------------------------------------------------------- language codes


def test_nllb_codes_and_forced_bos(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_nllb(tmp_path / "nllb"))
    codes = language_codes(tokenizer, "nllb")
    assert set(FLORES.values()) <= set(codes)  # every short code in the table maps to a real NLLB code
    assert resolve_code("sw", codes, "target language", "nllb") == "swh_Latn"
    assert resolve_code("en", codes, "target language", "nllb") == "eng_Latn"
    assert resolve_code("swh", codes, "target language", "nllb") == "swh_Latn"
    assert resolve_code("fra_Latn", codes, "target language", "nllb") == "fra_Latn"
    with pytest.raises(UsageError, match="ambiguous.*zho_Hans, zho_Hant"):
        resolve_code("zho", codes, "target language", "nllb")
    way = direction("nllb", tokenizer, "nllb", "en", "sw")
    assert way.src_code == "eng_Latn" and way.forced_bos_token_id == tokenizer.convert_tokens_to_ids("swh_Latn")
    tokenizer.src_lang = way.src_code  # what Translator does: the source code leads the input
    assert tokenizer("a red circle").input_ids[0] == tokenizer.convert_tokens_to_ids("eng_Latn")

    out = tmp_path / "nllb.tsv"
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(SENTENCES[:3]), encoding="utf-8")
    result = translate_data(sentences, out, to="sw", src="en", model=str(tmp_path / "nllb"), num_beams=1,
                            max_length=6, device="cpu")
    assert result.rows == 3 and result.direction == {"src": "eng_Latn", "to": "swh_Latn", "family": "nllb"}


def test_m2m100_mbart_and_marian_codes(models, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["m2m100"])
    codes = language_codes(tokenizer, "m2m100")
    assert resolve_code("swh_Latn", codes, "target language", "m2m") == "sw"
    way = direction("m2m100", tokenizer, "m2m", "eng_Latn", "sw")
    assert way.src_code == "en" and way.forced_bos_token_id == tokenizer.get_lang_id("sw")
    from transformers import MBart50Tokenizer

    mbart = MBart50Tokenizer()  # its built-in mBART-50 codes, no vocabulary
    way = direction("mbart50", mbart, "mbart", "en", "sw")
    assert (way.src_code, way.tgt_code) == ("en_XX", "sw_KE")
    assert way.forced_bos_token_id == mbart.convert_tokens_to_ids("sw_KE")
    with pytest.raises(UsageError, match=r"'xx' is not a language of m2m .*e\.g\. en, sw, fr"):
        resolve_code("xx", codes, "target language", "m2m")
    assert {"sw", "swh", "swh_Latn", "swa"} <= aliases("sw")

    multi = build_marian(tmp_path / "opus-mt-en-mul", "en", "mul", seed=2, targets=["swh", "fra", "deu"])
    marian = AutoTokenizer.from_pretrained(multi)
    assert language_codes(marian, "marian") == ["deu", "fra", "swh"]
    way = direction("marian", marian, str(multi), None, "sw")
    assert way.prefix == ">>swh<< " and way.forced_bos_token_id is None
    with pytest.raises(UsageError, match="'ja' is not a language"):
        direction("marian", marian, str(multi), None, "ja")
    single = AutoTokenizer.from_pretrained(models["marian"])
    with pytest.raises(UsageError, match="translates en -> sw, not en -> fr"):
        direction("marian", single, models["marian"], "en", "fr")


# --------------------------------------------------------------------------- errors


def test_clear_errors_before_any_work(models, pairs_file, tmp_path):
    out = tmp_path / "out.jsonl"
    unknown = translate("--data", str(pairs_file), "--src", "en", "--to", "xx", "--model", models["m2m100"],
                        "--out", str(out))
    assert unknown.exit_code == 2 and "'xx' is not a language of" in unknown.output and "sw" in unknown.output
    assert not list(tmp_path.glob("out.jsonl*"))  # nothing written
    no_src = translate("--data", str(tmp_path / "nothing.jsonl"), "--to", "sw", "--model", models["m2m100"],
                       "--out", str(out))
    assert no_src.exit_code == 3 and "nothing.jsonl: no such file" in no_src.output
    no_model = translate("--data", str(pairs_file), "--to", "sw", "--model", str(tmp_path / "missing-model"),
                         "--out", str(out))
    assert no_model.exit_code == 2 and "no such folder" in no_model.output
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(pairs_file.read_text() + '{"image": "images/0.png"}\n', encoding="utf-8")
    shutil.copytree(pairs_file.parent / "images", tmp_path / "images")
    broken = translate("--data", str(bad_row), "--to", "sw", "--model", models["marian"], "--out", str(out))
    assert broken.exit_code == 3 and "bad.jsonl:10: missing caption field" in broken.output
    wrong_suffix = translate("--data", str(pairs_file), "--to", "sw", "--model", models["marian"],
                             "--out", str(tmp_path / "out.csv"))
    assert wrong_suffix.exit_code == 2 and "name it .jsonl" in wrong_suffix.output
    weightless = shutil.copytree(models["marian"], tmp_path / "opus-mt-en-sw")
    (weightless / "model.safetensors").unlink()
    no_weights = translate("--data", str(pairs_file), "--to", "sw", "--model", str(weightless), "--out", str(out))
    assert no_weights.exit_code == 2 and "cannot load translation model" in no_weights.output
    assert not list(tmp_path.glob("out.jsonl*"))  # a failed load leaves nothing that blocks the next run
    multi = translate("--data", str(pairs_file), "--to", "sw", "--model", models["m2m100"], "--out", str(out))
    assert multi.exit_code == 0  # the pairs' lang field (en) is the source

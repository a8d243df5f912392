"""The demo data generator: layout, determinism, ground truth and the grammar of the captions."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mlilt.demo import data as demo
from mlilt.demo.data import COLORS, POSITIONS, SHAPES, SIZES, caption_scene, demo_languages, generate_demo, lexicon
from mlilt.errors import UsageError

N = 60
SIZE = 64  # small images keep the tests fast; the drawing is the same at 224


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "set"
    generate_demo(out, langs=demo_languages(), n=N, seed=3, image_size=SIZE)
    return out


def scene(*shapes: tuple[str, str, str, str], sid: int = 0) -> dict:
    """A scene dict with the attributes caption_scene needs (shape, color, size, position)."""
    return {"scene": sid, "shapes": [dict(zip(("shape", "color", "size", "position"), s)) for s in shapes]}


# --------------------------------------------------------------------------------------------
# Layout


def test_languages_available():
    langs = demo_languages()
    assert {"en", "sw", "de", "fr", "es"} <= set(langs)
    for lang in langs:
        assert lexicon(lang).lang == lang  # loads and passes the completeness check


def test_layout_and_counts(demo_set: Path):
    summary = json.loads((demo_set / "demo.json").read_text())
    assert summary["version"] == demo.GENERATOR_VERSION
    assert summary["langs"] == demo_languages()
    assert (summary["n"], summary["seed"], summary["image_size"]) == (N, 3, SIZE)
    assert summary["counts"] == {"train": 48, "test": 12}
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    assert sorted(train + test) == list(range(N)) and not set(train) & set(test)

    images = sorted((demo_set / "images").iterdir())
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(N)]
    for lang in demo_languages():
        for split, ids in (("train", train), ("test", test)):
            records = read_jsonl(demo_set / lang / f"{split}.jsonl")
            # Split by scene: the same scene ids in every language.
            assert [r["scene"] for r in records] == ids
            assert all(r["lang"] == lang and r["caption"] for r in records)
            assert set(records[0]) == {"image", "caption", "lang", "scene"}
    assert not list(demo_set.parent.glob(".*partial"))  # no staging leftovers


def test_image_paths_resolve_relative_to_jsonl(demo_set: Path):
    for lang in ("en", "sw"):
        path = demo_set / lang / "test.jsonl"
        for rec in read_jsonl(path):
            image = (path.parent / rec["image"]).resolve()
            assert image == (demo_set / "images" / f"{rec['scene']:06d}.png").resolve()
            with Image.open(image) as im:
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_summary_object(tmp_path: Path):
    s = generate_demo(tmp_path / "d", langs=["en"], n=10, test_fraction=0.3, image_size=SIZE)
    assert s.counts == {"train": 7, "test": 3} and s.langs == ["en"] and s.n == 10
    assert s.files("en")["test"] == tmp_path / "d" / "en" / "test.jsonl"
    assert len(read_jsonl(s.files("en")["test"])) == 3


# --------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_bytes(tmp_path: Path, demo_set: Path):
    again = tmp_path / "again"
    generate_demo(again, langs=demo_languages(), n=N, seed=3, image_size=SIZE)
    for rel in ["demo.json", "scenes.jsonl", "en/train.jsonl", "sw/test.jsonl", "de/train.jsonl",
                "images/000000.png", "images/000017.png", f"images/{N - 1:06d}.png"]:
        assert (again / rel).read_bytes() == (demo_set / rel).read_bytes(), rel


def test_different_seed_differs(tmp_path: Path, demo_set: Path):
    other = tmp_path / "other"
    generate_demo(other, langs=["en"], n=N, seed=4, image_size=SIZE)
    assert (other / "en/train.jsonl").read_bytes() != (demo_set / "en/train.jsonl").read_bytes()
    differing = sum((other / "images" / f"{i:06d}.png").read_bytes() != (demo_set / "images" / f"{i:06d}.png").read_bytes()
                    for i in range(5))
    assert differing == 5


def test_captions_do_not_depend_on_other_languages(tmp_path: Path, demo_set: Path):
    alone = tmp_path / "alone"
    generate_demo(alone, langs=["sw"], n=N, seed=3, image_size=SIZE)
    assert (alone / "sw/train.jsonl").read_bytes() == (demo_set / "sw/train.jsonl").read_bytes()
    assert (alone / "scenes.jsonl").read_bytes() == (demo_set / "scenes.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------
# Ground truth: the captions say what the images show


def nearest_color(rgb) -> str:
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], rgb)))


def test_every_shape_is_drawn(demo_set: Path):
    for sc in read_jsonl(demo_set / "scenes.jsonl"):
        assert 1 <= len(sc["shapes"]) <= 3
        assert len({sh["position"] for sh in sc["shapes"]}) == len(sc["shapes"])  # one shape per cell
        bg = sc["background"]
        assert min(sum((a - b) ** 2 for a, b in zip(COLORS[c], bg)) for c in COLORS) > 60 ** 2
        with Image.open(demo_set / sc["image"]) as im:
            im = im.convert("RGB")
            for sh in sc["shapes"]:
                px = im.getpixel((int(sh["probe"][0]), int(sh["probe"][1])))
                assert nearest_color(px) == sh["color"], (sc["scene"], sh)
                # Inside its own grid cell, with a margin: shapes never overlap.
                cell = SIZE / 3
                cx, cy, r = sh["center"][0], sh["center"][1], sh["radius"]
                assert sh["col"] * cell < cx - r and cx + r < (sh["col"] + 1) * cell
                assert sh["row"] * cell < cy - r and cy + r < (sh["row"] + 1) * cell
                assert POSITIONS[3 * sh["row"] + sh["col"]] == sh["position"]


def test_nothing_drawn_outside_the_shapes(demo_set: Path):
    np = pytest.importorskip("numpy")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    for sc in read_jsonl(demo_set / "scenes.jsonl")[:20]:
        with Image.open(demo_set / sc["image"]) as im:
            pixels = np.asarray(im.convert("RGB")).astype(int)
        outside = np.ones((SIZE, SIZE), bool)
        for sh in sc["shapes"]:
            (cx, cy), r = sh["center"], sh["radius"]
            outside &= (xx - cx) ** 2 + (yy - cy) ** 2 > (r + 1.5) ** 2
        assert outside.any()
        assert (pixels[outside] == sc["background"]).all(), sc["scene"]


@functools.lru_cache(maxsize=None)
def all_items(lang: str) -> dict[str, set[tuple[str, str, str, str]]]:
    """Every possible item phrase of a language (all cases its templates use) -> its attributes."""
    lex = lexicon(lang)
    items: dict[str, set] = {}
    for shape in SHAPES:
        for color in COLORS:
            for size in SIZES:
                for pos in POSITIONS:
                    attrs = {"shape": shape, "color": color, "size": size, "position": pos}
                    for case in {None, *[t.get("case") for t in lex.data["templates"]]}:
                        items.setdefault(lex.item(attrs, case), set()).add((shape, color, size, pos))
    return items


def mentioned(caption: str, lang: str) -> set[tuple[str, str, str, str]]:
    """Every (shape, color, size, position) whose phrase occurs in the caption as a whole item."""
    end = "(?=$|,|" + re.escape(lexicon(lang).data["list"]["last"]) + ")"
    found: set = set()
    for phrase, attrs in all_items(lang).items():
        if phrase in caption and re.search(r"(?:^|(?<=\s))" + re.escape(phrase) + end, caption):
            found |= attrs
    return found


def test_captions_name_exactly_the_shapes_in_the_scene(demo_set: Path):
    scenes = {sc["scene"]: sc for sc in read_jsonl(demo_set / "scenes.jsonl")}
    for lang in demo_languages():
        for split in ("train", "test"):
            for rec in read_jsonl(demo_set / lang / f"{split}.jsonl"):
                truth = {(s["shape"], s["color"], s["size"], s["position"]) for s in scenes[rec["scene"]]["shapes"]}
                assert mentioned(rec["caption"], lang) == truth, (lang, rec)


def test_minimal_pairs_in_the_data(demo_set: Path):
    scenes = read_jsonl(demo_set / "scenes.jsonl")
    twins = [sc for sc in scenes if sc["twin_of"] is not None]
    assert twins and any(sc["swapped"] == "color" for sc in twins)
    split = {sc["scene"]: sc["split"] for sc in scenes}
    for sc in twins:
        a = {(s["shape"], s["color"], s["size"], s["position"]) for s in scenes[sc["twin_of"]]["shapes"]}
        b = {(s["shape"], s["color"], s["size"], s["position"]) for s in sc["shapes"]}
        assert a != b
        # Same words, other binding: the bag of attribute values is unchanged.
        assert sorted(v for t in a for v in t) == sorted(v for t in b for v in t)
    # Pairs stay on one side of the split (the test set holds hard negatives), but for
    # at most one pair broken up to hit the exact test count.
    assert sum(split[sc["scene"]] != split[sc["twin_of"]] for sc in twins) <= 1
    en = {r["scene"]: r["caption"] for s in ("train", "test") for r in read_jsonl(demo_set / "en" / f"{s}.jsonl")}
    assert all(en[sc["scene"]] != en[sc["twin_of"]] for sc in twins)


@pytest.mark.parametrize("lang", demo_languages())
def test_binding_changes_the_caption(lang: str):
    a = scene(("circle", "red", "large", "left"), ("square", "blue", "small", "right"))
    b = scene(("circle", "blue", "large", "left"), ("square", "red", "small", "right"))
    for seed in range(5):
        ca, cb = caption_scene(a, lang, seed), caption_scene(b, lang, seed)
        assert ca != cb
        assert mentioned(ca, lang) == {("circle", "red", "large", "left"), ("square", "blue", "small", "right")}
        assert mentioned(cb, lang) == {("circle", "blue", "large", "left"), ("square", "red", "small", "right")}
    if lang == "en":  # same bag of words, different meaning
        a0 = lexicon("en").noun_phrase("circle", "red", "large") + " and " + lexicon("en").noun_phrase("square", "blue", "large")
        b0 = lexicon("en").noun_phrase("circle", "blue", "large") + " and " + lexicon("en").noun_phrase("square", "red", "large")
        assert sorted(a0.split()) == sorted(b0.split()) and a0 != b0


def test_templates_vary(demo_set: Path):
    for lang in demo_languages():
        captions = [r["caption"] for r in read_jsonl(demo_set / lang / "train.jsonl")]
        frames = {t["text"].split("{list}")[0] for t in lexicon(lang).data["templates"]}
        used = {f for f in frames for c in captions if f and c.startswith(f)}
        assert len(used) >= 2, lang


# --------------------------------------------------------------------------------------------
# Grammar: golden phrases and agreement


GOLDEN_NP = {
    "en": [(("triangle", "green", "small"), "a small green triangle"),
           (("circle", "red", "large"), "a large red circle")],
    "de": [(("triangle", "green", "small"), "ein kleines grünes Dreieck"),
           (("circle", "red", "large"), "ein großer roter Kreis"),
           (("crescent", "blue", "small"), "eine kleine blaue Mondsichel"),
           (("star", "white", "large"), "ein großer weißer Stern")],
    "fr": [(("circle", "red", "large"), "un grand cercle rouge"),
           (("star", "blue", "small"), "une petite étoile bleue"),
           (("cross", "white", "large"), "une grande croix blanche"),
           (("square", "green", "small"), "un petit carré vert")],
    "es": [(("circle", "red", "large"), "un círculo rojo grande"),
           (("star", "blue", "small"), "una estrella azul pequeña"),
           (("cross", "white", "small"), "una cruz blanca pequeña"),
           (("crescent", "yellow", "large"), "una media luna amarilla grande")],
    "it": [(("circle", "red", "large"), "un grande cerchio rosso"),
           (("star", "blue", "small"), "una piccola stella blu"),
           (("triangle", "yellow", "small"), "un piccolo triangolo giallo")],
    "nl": [(("circle", "red", "large"), "een grote rode cirkel"),
           (("square", "green", "small"), "een klein groen vierkant"),
           (("cross", "white", "large"), "een groot wit kruis")],
    "sw": [(("square", "red", "large"), "mraba mkubwa mwekundu"),
           (("star", "blue", "small"), "nyota ndogo ya bluu"),
           (("circle", "yellow", "small"), "duara dogo la njano"),
           (("circle", "white", "large"), "duara kubwa jeupe"),
           (("cross", "black", "small"), "msalaba mdogo mweusi"),
           (("triangle", "green", "large"), "pembetatu kubwa ya kijani"),
           (("crescent", "red", "small"), "hilali ndogo nyekundu")],
}


@pytest.mark.parametrize("lang", sorted(GOLDEN_NP))
def test_golden_noun_phrases(lang: str):
    lex = lexicon(lang)
    for (shape, color, size), expected in GOLDEN_NP[lang]:
        assert lex.noun_phrase(shape, color, size) == expected


def test_german_dative_after_mit():
    lex = lexicon("de")
    assert lex.noun_phrase("triangle", "green", "small", "dat") == "einem kleinen grünen Dreieck"
    assert lex.noun_phrase("crescent", "yellow", "large", "dat") == "einer großen gelben Mondsichel"
    assert lex.noun_phrase("circle", "black", "large", "dat") == "einem großen schwarzen Kreis"


GOLDEN_CAPTIONS = {
    # template index -> caption of: large red circle top left + small yellow crescent centre
    ("en", 1): "an image of a large red circle at the top left and a small yellow crescent in the center",
    ("de", 1): "ein Bild mit einem großen roten Kreis oben links und einer kleinen gelben Mondsichel in der Mitte",
    ("de", 2): "zwei Formen: ein großer roter Kreis oben links und eine kleine gelbe Mondsichel in der Mitte",
    ("fr", 2): "deux formes : un grand cercle rouge en haut à gauche et un petit croissant jaune au centre",
    ("es", 1): "una imagen con un círculo rojo grande arriba a la izquierda y una media luna amarilla pequeña en el centro",
    ("it", 0): "un grande cerchio rosso in alto a sinistra e una piccola mezzaluna gialla al centro",
    ("nl", 1): "een afbeelding met een grote rode cirkel linksboven en een kleine gele halve maan in het midden",
    ("sw", 1): "kuna duara kubwa jekundu juu upande wa kushoto na hilali ndogo ya njano katikati",
    ("sw", 3): "maumbo mawili: duara kubwa jekundu juu upande wa kushoto na hilali ndogo ya njano katikati",
}


@pytest.mark.parametrize("lang,index", sorted(GOLDEN_CAPTIONS))
def test_golden_captions(lang: str, index: int):
    lex = lexicon(lang)
    shapes = scene(("circle", "red", "large", "top_left"), ("crescent", "yellow", "small", "center"))["shapes"]
    assert lex.caption(shapes, lex.data["templates"][index]) == GOLDEN_CAPTIONS[(lang, index)]


def test_three_item_lists():
    shapes = scene(("star", "red", "small", "top"), ("square", "blue", "large", "bottom_right"),
                   ("cross", "green", "small", "left"))["shapes"]
    assert lexicon("en").caption(shapes, {"text": "{list}"}) == (
        "a small red star at the top, a large blue square at the bottom right and a small green cross on the left")
    assert lexicon("sw").caption(shapes, {"text": "{list}"}) == (
        "nyota ndogo nyekundu juu katikati, mraba mkubwa wa bluu chini upande wa kulia "
        "na msalaba mdogo wa kijani upande wa kushoto")


@pytest.mark.parametrize("lang", demo_languages())
def test_agreement_depends_only_on_gender(lang: str):
    """Nouns of one gender/class take identical article and adjective forms."""
    lex = lexicon(lang)
    nouns = lex.data["nouns"]
    cases = {None, *[t.get("case") for t in lex.data["templates"]]}
    by_gender: dict = {}
    for shape in SHAPES:
        by_gender.setdefault(nouns[shape].get("gender"), []).append(shape)
    for shapes in by_gender.values():
        for color in COLORS:
            for size in SIZES:
                for case in cases:
                    frames = {lex.noun_phrase(s, color, size, case).replace(nouns[s]["word"], "<N>") for s in shapes}
                    assert len(frames) == 1, (lang, shapes, color, size, case, frames)


def test_gender_agreement_rules():
    # Romance languages: article and every agreeing adjective follow the noun's gender.
    for lang, fem_article in (("fr", "une "), ("es", "una "), ("it", "una ")):
        lex = lexicon(lang)
        for shape, noun in lex.data["nouns"].items():
            for color in COLORS:
                np_ = lex.noun_phrase(shape, color, "small")
                assert np_.startswith(fem_article) == (noun["gender"] == "f"), np_
    fr = lexicon("fr")
    assert fr.noun_phrase("cross", "white", "small") == "une petite croix blanche"
    assert fr.noun_phrase("crescent", "white", "small") == "un petit croissant blanc"
    # German: the article and both endings change with gender.
    de = lexicon("de")
    for shape, gender, article, ending in (("circle", "m", "ein", "er"), ("square", "n", "ein", "es"),
                                           ("crescent", "f", "eine", "e")):
        assert de.data["nouns"][shape]["gender"] == gender
        words = de.noun_phrase(shape, "red", "small").split()
        assert words[0] == article and words[1] == "klein" + ending and words[2] == "rot" + ending
    # Dutch: adjectives after 'een' take -e with de-words only.
    nl = lexicon("nl")
    assert nl.noun_phrase("square", "white", "small") == "een klein wit vierkant"
    assert nl.noun_phrase("star", "white", "small") == "een kleine witte ster"
    # Swahili: size prefix and colour concord follow the noun class.
    sw = lexicon("sw")
    expected = {"3": ("mdogo", "mwekundu", "wa kijani"), "5": ("dogo", "jekundu", "la kijani"),
                "9": ("ndogo", "nyekundu", "ya kijani")}
    for shape, noun in sw.data["nouns"].items():
        small, red, green = expected[noun["gender"]]
        assert sw.noun_phrase(shape, "red", "small") == f"{noun['word']} {small} {red}"
        assert sw.noun_phrase(shape, "green", "small") == f"{noun['word']} {small} {green}"


def test_every_lexicon_has_notes_and_full_vocabulary():
    for lang in demo_languages():
        data = lexicon(lang).data
        assert data["notes"], lang
        assert set(data["nouns"]) == set(SHAPES) and set(data["colors"]) == set(COLORS)
        assert set(data["positions"]) == set(POSITIONS) and set(data["sizes"]) == set(SIZES)
        # Nine distinct position phrases and distinct nouns: no two cells read the same.
        assert len(set(data["positions"].values())) == 9
        assert len({n["word"] for n in data["nouns"].values()}) == len(SHAPES)
        # So every item phrase names exactly one (shape, colour, size, position).
        assert all(len(attrs) == 1 for attrs in all_items(lang).values()), lang


# --------------------------------------------------------------------------------------------
# Errors


def test_existing_folder_is_left_alone(tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match=re.escape(str(out))):
        generate_demo(out, langs=["en"], n=10, image_size=SIZE)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_overwrite_replaces(tmp_path: Path):
    out = tmp_path / "set"
    generate_demo(out, langs=["en"], n=10, image_size=SIZE)
    (out / "stale.txt").write_text("old")
    generate_demo(out, langs=["fr"], n=12, image_size=SIZE, overwrite=True)
    assert not (out / "stale.txt").exists() and not (out / "en").exists()
    assert json.loads((out / "demo.json").read_text())["n"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_unknown_language(tmp_path: Path):
    with pytest.raises(UsageError) as err:
        generate_demo(tmp_path / "x", langs=["en", "xx"], n=10)
    msg = str(err.value)
    assert "'xx'" in msg and all(lang in msg for lang in demo_languages())
    with pytest.raises(UsageError, match="available"):
        lexicon("klingon")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("n,fraction", [(1, 0.2), (2, 0.2), (4, 0.1), (3, 0.9)])
def test_too_few_scenes_for_a_split(tmp_path: Path, n: int, fraction: float):
    with pytest.raises(UsageError, match=r"too small .*\(use n >= \d+\)"):
        generate_demo(tmp_path / "x", langs=["en"], n=n, test_fraction=fraction)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"test_fraction": 0}, {"test_fraction": 1.0}, {"image_size": 8},
                                    {"langs": []}, {"seed": "a"}])
def test_bad_arguments(tmp_path: Path, kwargs: dict):
    args = {"langs": ["en"], "n": 10} | kwargs
    with pytest.raises(UsageError):
        generate_demo(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_smallest_split_works(tmp_path: Path):
    s = generate_demo(tmp_path / "x", langs=["en"], n=3, image_size=SIZE)
    assert s.counts == {"train": 2, "test": 1}

"""Procedurally drawn demo data: shapes on a grey canvas with compositional captions.

The toolkit's offline default data set. Each scene has one to three non-overlapping shapes,
each with a colour, a shape type, a size and a position in a 3x3 grid, and every language
gets one caption per scene that names all of them. The words recur in all combinations
(and about a quarter of the scenes come as minimal pairs that swap the colours, sizes or
positions of two shapes), so a text encoder has to read how the words bind, not just which
words occur. Licence-free, deterministic given the seed, and fast (PIL + PNG).

Layout written by :func:`generate_demo`::

    out/images/000000.png ...          one image per scene, shared by all languages
    out/<lang>/train.jsonl             {"image": "../images/000000.png", "caption": ..., "lang": ..., "scene": 0}
    out/<lang>/test.jsonl
    out/scenes.jsonl                   ground truth per scene: shapes, geometry, split, minimal pairs
    out/demo.json                      summary: langs, n, seed, splits, counts, generator version

The lexicons live in ``lexicons/<lang>.json`` as data (gender/class per noun, adjective forms
per gender/class and case, position phrases, caption frames); the code below only puts the
forms in order. Each lexicon's ``notes`` say which grammatical choices it makes.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw

from mlilt.files.atomic import staged_dir
from mlilt.errors import UsageError

GENERATOR_VERSION = 1

LEXICON_DIR = Path(__file__).with_name("lexicons")

# Nominal RGB of each colour word. Shapes are drawn with a small per-shape jitter around it;
# the background is a neutral grey (115..150 with a slight tint), far from all six.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 75, 215),
    "green": (30, 160, 55),
    "yellow": (240, 210, 35),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "crescent")
SIZES = ("large", "small")
# Grid cells in reading order: index = 3 * row + col.
POSITIONS = (
    "top_left", "top", "top_right",
    "left", "center", "right",
    "bottom_left", "bottom", "bottom_right",
)
# Radius (of the shape's bounding circle) as a fraction of the grid cell's side.
SIZE_RANGES = {"large": (0.36, 0.43), "small": (0.18, 0.23)}
COUNT_WEIGHTS = {1: 0.2, 2: 0.4, 3: 0.4}
TWIN_PROBABILITY = 0.35  # chance that an eligible scene is followed by its minimal pair
MAX_SHAPE_JITTER = 12    # per-channel colour jitter of a shape
# Crescent: the bite is a disc of radius 0.75 r whose centre is 0.5 r off the shape's centre,
# leaving a body 0.75 r thick on the far side.
CRESCENT_BITE = (0.5, 0.75)
SUPERSAMPLE = 2          # draw at 2x and box-filter down: smooth edges, still fast


# --------------------------------------------------------------------------------------------
# Lexicons


class Lexicon:
    """One language's words and the rules for putting them together (see ``lexicons/*.json``)."""

    def __init__(self, data: Mapping[str, Any]):
        self.data = data
        self.lang: str = data["lang"]
        self.name: str = data["name"]
        self.default_case: str | None = data.get("default_case")
        self._validate()

    # Forms are a string (invariable), or a dict keyed by case and/or gender (noun class);
    # a case key is looked up first, then the gender: {"nom": {"m": "roter", ...}, "dat": "roten"}.
    def _form(self, entry: Any, gender: str | None, case: str | None, what: str) -> str:
        while isinstance(entry, dict):
            if case is not None and case in entry:
                entry = entry[case]
            elif gender is not None and gender in entry:
                entry = entry[gender]
            else:
                raise KeyError(f"{self.lang}: no form of {what} for gender {gender!r}, case {case!r}")
        if not isinstance(entry, str):
            raise KeyError(f"{self.lang}: form of {what} is not a string: {entry!r}")
        return entry

    def noun_phrase(self, shape: str, color: str, size: str, case: str | None = None) -> str:
        """The noun phrase for one shape, e.g. de ``ein kleines grünes Dreieck``."""
        case = case or self.default_case
        noun = self.data["nouns"][shape]
        gender = noun.get("gender")
        parts = []
        for slot in self.data["noun_phrase"]:
            if slot == "noun":
                parts.append(noun["word"])
            elif slot == "det":
                parts.append(self._form(self.data["determiner"], gender, case, "the article"))
            elif slot == "size":
                parts.append(self._form(self.data["sizes"][size], gender, case, f"size {size!r}"))
            elif slot == "color":
                parts.append(self._form(self.data["colors"][color], gender, case, f"colour {color!r}"))
            else:
                raise KeyError(f"{self.lang}: unknown noun-phrase slot {slot!r}")
        return " ".join(p for p in parts if p)

    def position(self, position: str) -> str:
        return self.data["positions"][position]

    def item(self, shape: Mapping[str, Any], case: str | None = None) -> str:
        """A shape with its position, e.g. en ``a large red circle at the top left``."""
        return self.data["item"].format(
            np=self.noun_phrase(shape["shape"], shape["color"], shape["size"], case),
            pos=self.position(shape["position"]),
        )

    def join(self, items: Sequence[str]) -> str:
        sep, last = self.data["list"]["sep"], self.data["list"]["last"]
        if len(items) == 1:
            return items[0]
        return sep.join(items[:-1]) + last + items[-1]

    def templates(self, count: int) -> list[dict]:
        return [t for t in self.data["templates"] if t.get("count", count) == count]

    def caption(self, shapes: Sequence[Mapping[str, Any]], template: Mapping[str, Any]) -> str:
        """Name every shape, in the given order, inside one caption frame."""
        case = template.get("case")
        return template["text"].format(list=self.join([self.item(s, case) for s in shapes]))

    def _validate(self) -> None:
        d = self.data
        for key in ("nouns", "sizes", "colors", "positions", "templates", "noun_phrase", "item", "list"):
            if key not in d:
                raise KeyError(f"lexicon {self.lang}: missing {key!r}")
        for vocab, key in ((SHAPES, "nouns"), (SIZES, "sizes"), (tuple(COLORS), "colors"), (POSITIONS, "positions")):
            missing = set(vocab) - set(d[key])
            if missing:
                raise KeyError(f"lexicon {self.lang}: {key} lacks {sorted(missing)}")
        cases = {t.get("case") for t in d["templates"]}
        for count in COUNT_WEIGHTS:
            if not self.templates(count):
                raise KeyError(f"lexicon {self.lang}: no caption template for {count} shape(s)")
        # Every combination must resolve: a gap in a table fails here, not mid-generation.
        for shape in SHAPES:
            for color in COLORS:
                for size in SIZES:
                    for case in cases:
                        self.noun_phrase(shape, color, size, case)


@functools.lru_cache(maxsize=None)
def _load_lexicon(lang: str) -> Lexicon:
    path = LEXICON_DIR / f"{lang}.json"
    return Lexicon(json.loads(path.read_text(encoding="utf-8")))


@functools.lru_cache(maxsize=None)
def _available() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in LEXICON_DIR.glob("*.json")))


def demo_languages() -> list[str]:
    """The languages that have a lexicon (and so can be generated)."""
    return list(_available())


def lexicon(lang: str) -> Lexicon:
    """The lexicon of ``lang``; UsageError listing the available languages if there is none."""
    available = demo_languages()
    if lang not in available:
        raise UsageError(
            f"no demo lexicon for language {lang!r}; available: {', '.join(available)}"
        )
    return _load_lexicon(lang)


# --------------------------------------------------------------------------------------------
# Scenes


def _choose_count(rng: random.Random) -> int:
    counts = list(COUNT_WEIGHTS)
    return rng.choices(counts, weights=[COUNT_WEIGHTS[c] for c in counts])[0]


def _random_attributes(rng: random.Random) -> list[dict]:
    cells = rng.sample(range(len(POSITIONS)), _choose_count(rng))
    return [
        {
            "shape": rng.choice(SHAPES),
            "color": rng.choice(tuple(COLORS)),
            "size": rng.choice(SIZES),
            "position": POSITIONS[cell],
        }
        for cell in cells
    ]


def _twin_attributes(attrs: list[dict], rng: random.Random) -> tuple[list[dict], str] | None:
    """A minimal pair of ``attrs``: swap the colours, sizes or positions of two shapes.

    Only swaps that give a different scene (the two shapes differ in the swapped attribute)
    are candidates; returns None when there is none (e.g. a single shape).
    """
    options = []
    for i in range(len(attrs)):
        for j in range(i + 1, len(attrs)):
            for key in ("color", "size", "position"):
                if attrs[i][key] != attrs[j][key]:
                    options.append((i, j, key))
    if not options:
        return None
    # Colour swaps are the bag-of-words breakers the data set is about: prefer them.
    color_options = [o for o in options if o[2] == "color"]
    if color_options and rng.random() < 0.6:
        options = color_options
    i, j, key = rng.choice(options)
    twin = [dict(a) for a in attrs]
    twin[i][key], twin[j][key] = attrs[j][key], attrs[i][key]
    return twin, key


def _polygon(cx: float, cy: float, radii: Sequence[float], angle0: float) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced in angle starting at ``angle0`` (0 = up)."""
    k = len(radii)
    return [
        (cx + r * math.sin(angle0 + 2 * math.pi * i / k), cy - r * math.cos(angle0 + 2 * math.pi * i / k))
        for i, r in enumerate(radii)
    ]


def _geometry(attrs: list[dict], image_size: int, rng: random.Random) -> dict:
    """Place and colour the shapes: everything needed to draw the scene, in pixels."""
    cell = image_size / 3
    base = rng.randint(115, 150)
    background = [min(255, max(0, base + rng.randint(-6, 6))) for _ in range(3)]
    shapes = []
    for a in attrs:
        index = POSITIONS.index(a["position"])
        row, col = divmod(index, 3)
        lo, hi = SIZE_RANGES[a["size"]]
        radius = cell * rng.uniform(lo, hi)
        slack = max(0.0, cell / 2 - radius - cell * 0.04)  # keep a margin: shapes never touch
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        rgb = [min(255, max(0, c + rng.randint(-MAX_SHAPE_JITTER, MAX_SHAPE_JITTER))) for c in COLORS[a["color"]]]
        shape = a["shape"]
        if shape == "crescent":
            angle = rng.uniform(0, 2 * math.pi)  # direction of the bite
        elif shape == "star":
            angle = rng.uniform(-math.pi / 5, math.pi / 5)
        else:
            angle = rng.uniform(-0.15, 0.15)
        # A point surely inside the drawn shape (the crescent's centre is bitten out).
        if shape == "crescent":
            depth = (1 + CRESCENT_BITE[1] - CRESCENT_BITE[0]) / 2  # middle of the body
            probe = [cx - depth * radius * math.sin(angle), cy + depth * radius * math.cos(angle)]
        else:
            probe = [cx, cy]
        shapes.append(
            dict(a, row=row, col=col, center=[round(cx, 2), round(cy, 2)], radius=round(radius, 2),
                 angle=round(angle, 4), rgb=rgb, probe=[round(probe[0], 2), round(probe[1], 2)])
        )
    return {"background": background, "shapes": shapes}


def draw_scene(scene: Mapping[str, Any], image_size: int) -> Image.Image:
    """Render a scene (as stored in ``scenes.jsonl``) to an RGB image.

    Every shape lies inside the circle of its ``radius`` around its ``center``, which lies
    inside its grid cell with a margin, so shapes never touch and each is fully visible.
    """
    s = SUPERSAMPLE
    size = image_size * s
    img = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for sh in scene["shapes"]:
        cx, cy = sh["center"][0] * s, sh["center"][1] * s
        r = sh["radius"] * s
        a = sh["angle"]
        fill = tuple(sh["rgb"])
        kind = sh["shape"]
        if kind == "circle":
            rr = 0.92 * r
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)
        elif kind == "square":
            draw.polygon(_polygon(cx, cy, [r] * 4, a + math.pi / 4), fill=fill)
        elif kind == "triangle":
            draw.polygon(_polygon(cx, cy, [r] * 3, a), fill=fill)
        elif kind == "star":
            draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5, a), fill=fill)
        elif kind == "cross":
            arm, half = 0.94 * r, 0.32 * r  # corners of the arms at 0.993 r
            local = [(-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
                     (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half)]
            ca, sa = math.cos(a), math.sin(a)
            draw.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in local], fill=fill)
        elif kind == "crescent":
            # A disc with a smaller disc bitten out of it, drawn through a mask on the
            # shape's bounding box only (a full-canvas mask would cost more than the rest).
            x0, y0 = int(math.floor(cx - r)) - 1, int(math.floor(cy - r)) - 1
            box = int(math.ceil(2 * r)) + 3
            mask = Image.new("L", (box, box), 0)
            mdraw = ImageDraw.Draw(mask)
            mx, my = cx - x0, cy - y0
            mdraw.ellipse([mx - r, my - r, mx + r, my + r], fill=255)
            bx, by = mx + CRESCENT_BITE[0] * r * math.sin(a), my - CRESCENT_BITE[0] * r * math.cos(a)
            br = CRESCENT_BITE[1] * r
            mdraw.ellipse([bx - br, by - br, bx + br, by + br], fill=0)
            img.paste(fill, (x0, y0, x0 + box, y0 + box), mask)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {kind!r}")
    return img.reduce(s) if s > 1 else img


def make_scenes(n: int, seed: int, image_size: int) -> list[dict]:
    """The ``n`` scenes of a demo set: attributes, geometry and minimal-pair links."""
    rng = random.Random(f"mlilt.demo/v{GENERATOR_VERSION}/{seed}/scenes")
    scenes: list[dict] = []
    while len(scenes) < n:
        sid = len(scenes)
        prev = scenes[-1] if scenes else None
        twin = None
        if prev is not None and prev["twin_of"] is None and rng.random() < TWIN_PROBABILITY:
            twin = _twin_attributes([{k: sh[k] for k in ("shape", "color", "size", "position")}
                                     for sh in prev["shapes"]], rng)
        if twin is not None:
            attrs, swapped = twin
            group, twin_of = prev["group"], prev["scene"]
        else:
            attrs, swapped = _random_attributes(rng), None
            group, twin_of = sid, None
        geo = _geometry(attrs, image_size, rng)
        scenes.append({"scene": sid, "group": group, "twin_of": twin_of, "swapped": swapped, **geo})
    return scenes


def _split(scenes: list[dict], n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Split by scene, keeping a scene and its minimal pair on the same side when it can."""
    rng = random.Random(f"mlilt.demo/v{GENERATOR_VERSION}/{seed}/split")
    groups: dict[int, list[int]] = {}
    for sc in scenes:
        groups.setdefault(sc["group"], []).append(sc["scene"])
    order = list(groups.values())
    rng.shuffle(order)
    test: list[int] = []
    rest: list[list[int]] = []
    for g in order:
        if len(test) + len(g) <= n_test:
            test.extend(g)
        else:
            rest.append(g)
    for g in rest:  # rare: only pairs left and one slot to fill
        for sid in g:
            if len(test) < n_test:
                test.append(sid)
    test_set = set(test)
    return [s["scene"] for s in scenes if s["scene"] not in test_set], sorted(test_set)


def caption_scene(scene: Mapping[str, Any], lang: str, seed: int = 0) -> str:
    """The caption of ``scene`` in ``lang``: a frame and an order of the shapes drawn from the seed.

    Deterministic in (seed, lang, scene id) and independent of which other languages are
    generated. The shapes come in reading order (top left to bottom right) or shuffled.
    """
    lex = lexicon(lang)
    rng = random.Random(f"mlilt.demo/v{GENERATOR_VERSION}/{seed}/caption/{lang}/{scene['scene']}")
    shapes = sorted(scene["shapes"], key=lambda sh: POSITIONS.index(sh["position"]))
    if rng.random() < 0.5:
        rng.shuffle(shapes)
    template = rng.choice(lex.templates(len(shapes)))
    return lex.caption(shapes, template)


# --------------------------------------------------------------------------------------------
# The data set


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`generate_demo` wrote (the content of ``demo.json`` plus the folder)."""

    out: Path
    langs: list[str]
    n: int
    seed: int
    image_size: int
    test_fraction: float
    counts: dict[str, int]
    splits: dict[str, list[int]] = field(repr=False)
    version: int = GENERATOR_VERSION

    def files(self, lang: str) -> dict[str, Path]:
        """The caption files of one language: {"train": path, "test": path}."""
        return {split: self.out / lang / f"{split}.jsonl" for split in ("train", "test")}


def _split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    n_test = math.floor(n * test_fraction + 0.5)
    return n - n_test, n_test


def _check_args(out: Path, langs: Sequence[str], n: int, seed: int, test_fraction: float,
                image_size: int, overwrite: bool) -> list[str]:
    if isinstance(langs, str):
        langs = [langs]
    langs = list(dict.fromkeys(langs))
    if not langs:
        raise UsageError(f"no languages given; available: {', '.join(demo_languages())}")
    unknown = [lang for lang in langs if lang not in demo_languages()]
    if unknown:
        raise UsageError(
            f"no demo lexicon for {', '.join(map(repr, unknown))}; available: {', '.join(demo_languages())}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"n must be a positive number of scenes, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise UsageError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    n_train, n_test = _split_sizes(n, test_fraction)
    if n_train < 1 or n_test < 1:
        need = next(m for m in range(2, 10**9) if min(_split_sizes(m, test_fraction)) >= 1)
        raise UsageError(
            f"n={n} is too small for a train/test split with test_fraction={test_fraction}: it gives "
            f"{n_train} train and {n_test} test scenes; both need at least one (use n >= {need})"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise UsageError(f"image_size must be an integer of at least 32 pixels, got {image_size!r}")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; choose another folder or pass overwrite=True")
    return langs


def _jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def generate_demo(
    out: str | Path,
    langs: Sequence[str] = ("en", "sw"),
    n: int = 1000,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int = 224,
    overwrite: bool = False,
) -> DemoSummary:
    """Draw ``n`` scenes and caption them in ``langs``; write the set to ``out`` atomically.

    The same scenes (and so the same images and the same train/test split) come out for a
    given ``seed`` and ``image_size`` whatever the languages; the bytes are identical run to run.
    ``out`` must not exist unless ``overwrite`` (then it is replaced only once the new set is
    complete).
    """
    out = Path(out)
    langs = _check_args(out, langs, n, seed, test_fraction, image_size, overwrite)
    lexicons = {lang: lexicon(lang) for lang in langs}  # load (and validate) before drawing
    n_train, n_test = _split_sizes(n, test_fraction)

    scenes = make_scenes(n, seed, image_size)
    train_ids, test_ids = _split(scenes, n_test, seed)
    split_of = {sid: "train" for sid in train_ids} | {sid: "test" for sid in test_ids}
    width = max(6, len(str(n - 1)))
    image_name = {sc["scene"]: f"{sc['scene']:0{width}d}.png" for sc in scenes}

    with staged_dir(out, replace=overwrite) as stage:
        (stage / "images").mkdir()

        def write_image(sc: dict) -> None:
            draw_scene(sc, image_size).save(stage / "images" / image_name[sc["scene"]], format="PNG",
                                            compress_level=3)

        # PIL releases the GIL while drawing and encoding: threads help, and each image
        # depends only on its scene, so the bytes do not depend on the scheduling.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for _ in pool.map(write_image, scenes):
                pass

        scene_records = [
            {"scene": sc["scene"], "image": f"images/{image_name[sc['scene']]}", "split": split_of[sc["scene"]],
             **{k: v for k, v in sc.items() if k != "scene"}}
            for sc in scenes
        ]
        (stage / "scenes.jsonl").write_text(_jsonl(scene_records), encoding="utf-8")

        files = {}
        for lang in lexicons:
            (stage / lang).mkdir()
            for split, ids in (("train", train_ids), ("test", test_ids)):
                records = [
                    {"image": f"../images/{image_name[sid]}", "caption": caption_scene(scenes[sid], lang, seed),
                     "lang": lang, "scene": sid}
                    for sid in ids
                ]
                (stage / lang / f"{split}.jsonl").write_text(_jsonl(records), encoding="utf-8")
            files[lang] = {"train": f"{lang}/train.jsonl", "test": f"{lang}/test.jsonl"}

        summary = {
            "generator": "mlilt.demo.data",
            "version": GENERATOR_VERSION,
            "langs": langs,
            "n": n,
            "seed": seed,
            "image_size": image_size,
            "test_fraction": test_fraction,
            "counts": {"train": len(train_ids), "test": len(test_ids)},
            "splits": {"train": train_ids, "test": test_ids},
            "files": files,
            "scenes": "scenes.jsonl",
            "vocabulary": {"colors": list(COLORS), "shapes": list(SHAPES), "sizes": list(SIZES),
                           "positions": list(POSITIONS)},
            "minimal_pairs": sum(1 for sc in scenes if sc["twin_of"] is not None),
        }
        (stage / "demo.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n",
                                         encoding="utf-8")

    assert len(train_ids) == n_train and len(test_ids) == n_test
    return DemoSummary(out=out, langs=langs, n=n, seed=seed, image_size=image_size,
                       test_fraction=test_fraction, counts={"train": n_train, "test": n_test},
                       splits={"train": train_ids, "test": test_ids})

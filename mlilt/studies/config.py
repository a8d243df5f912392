"""A study's YAML config, read and checked before any cell runs, and the grid of cells it names.

A study is towers × languages × methods × data budgets × seeds; each combination is a
*cell*: one training run and its evaluation. Everything a cell does follows from the config
and its id, so ``mlilt bench --config C --cell ID`` reruns exactly that cell.

A ``parallel:`` section adds *student* cells that learn a language from parallel sentences
(source in the teacher's language, target in the student's), distilled from a *teacher*: the
study's own cell of the teacher language and budget, with the same method and seed, so the
teacher saw only the study's training split. A student has ``parallel`` sentences and
``budget`` image-caption pairs of its language as well (0: text only).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlilt.errors import UsageError
from mlilt.methods.spec import parse_method

# TrainConfig options set per cell by the runner; a config that sets them would be ambiguous.
_CELL_OWNED = {"lang", "data", "out", "method", "text_tower", "image_tower", "seed", "overwrite", "resume",
               "parallel", "teacher"}
_TOP_KEYS = {"name", "description", "towers", "languages", "methods", "baseline", "budgets", "seeds", "train",
             "method_train", "data", "evaluate", "keep_packs", "parallel"}
_PARALLEL_KEYS = {"sizes", "languages", "teacher", "with_pairs", "train", "seed"}
_DEMO_KEYS = {"scenes", "seed", "test_fraction", "image_size"}
_EVAL_KEYS = {"benchmark", "root", "captions", "data", "transfer"}
_CELL_ID = re.compile(r"^(?P<lang>[^_]+)_(?P<method>.+)_n(?P<budget>\d+)(_p(?P<parallel>\d+))?_s(?P<seed>\d+)$")


@dataclass(frozen=True)
class Cell:
    lang: str
    method: str
    budget: int  # image-caption pairs of ``lang`` (0 only for a student: parallel text alone)
    seed: int
    parallel: int = 0  # parallel sentences distilled from the teacher cell; 0: not a student

    @property
    def id(self) -> str:
        # ':' is not allowed in Windows file names; methods never contain '_' or '~'.
        sentences = f"_p{self.parallel}" if self.parallel else ""
        return f"{self.lang}_{self.method.replace(':', '~')}_n{self.budget}{sentences}_s{self.seed}"

    def fields(self) -> dict:
        """The cell's fields; ``parallel`` only for a student, so other cells' specs (and
        hashes) are what they were before students existed."""
        fields = dataclasses.asdict(self)
        if not self.parallel:
            fields.pop("parallel")
        return fields


@dataclass
class ParallelSpec:
    """Student cells: languages learned from parallel sentences and a teacher cell."""

    sizes: list[int]  # parallel sentences per student: the first N of the study's file
    languages: list[str]  # student languages
    teacher_lang: str  # the teacher cell's language (the sources' language) ...
    teacher_budget: int  # ... and budget
    with_pairs: list[int] = field(default_factory=lambda: [0])  # image-caption pairs beside (0: text only)
    train: str | None = None  # a parallel file per student language, a path with {lang}; None: demo data
    seed: int | None = None  # demo data: the scenes the sentences describe (never the images' scenes)

    def file(self, lang: str, data_root: Path) -> Path:
        if self.train is None:
            return data_root / "parallel" / f"{self.teacher_lang}-{lang}.tsv"
        return Path(self.train.replace("{lang}", lang)).expanduser()

    def source(self) -> dict:
        """What every student's sentences depend on (not the sizes: adding one changes no cell)."""
        return {"teacher": [self.teacher_lang, self.teacher_budget], "train": self.train, "seed": self.seed}


@dataclass
class DataSpec:
    """Training pairs per language: generated demo data, or one pairs file per language."""

    demo: dict | None = None  # generate_demo arguments (scenes, seed, test_fraction, image_size)
    train: str | None = None  # a path with {lang}, e.g. ~/data/coco35l/{lang}.jsonl

    def train_file(self, lang: str, demo_root: Path) -> Path:
        if self.demo is not None:
            return demo_root / lang / "train.jsonl"
        return Path(self.train.replace("{lang}", lang)).expanduser()


@dataclass
class EvalSpec:
    benchmark: str = "demo"  # demo (the generated test split), xm3600, xtd10, multi30k, custom
    root: str | None = None
    captions: str = "first"
    data: str | None = None  # the held-out pairs file of the custom benchmark
    transfer: dict[str, list[str]] = field(default_factory=dict)  # trained language -> extra eval languages


@dataclass
class StudyConfig:
    name: str
    path: Path
    text_tower: str
    image_tower: str
    languages: list[str]
    methods: list[str]
    budgets: list[int]
    seeds: list[int]
    data: DataSpec
    evaluate: EvalSpec
    train: dict = field(default_factory=dict)
    method_train: dict[str, dict] = field(default_factory=dict)
    baseline: str | None = None
    keep_packs: bool = False
    description: str = ""
    lang_budgets: dict[str, list[int]] = field(default_factory=dict)  # per language; default: every budget
    parallel: ParallelSpec | None = None

    def budgets_of(self, lang: str) -> list[int]:
        return self.lang_budgets.get(lang, self.budgets)

    def cells(self) -> list[Cell]:
        # Seed and budget outermost: a study stopped early has whole comparisons, not a few methods.
        # Within a seed every teacher comes before its students.
        return [cell for seed in self.seeds for cell in self._plain_cells(seed) + self._student_cells(seed)]

    def _plain_cells(self, seed: int) -> list[Cell]:
        return [Cell(lang, method, budget, seed) for budget in self.budgets for lang in self.languages
                for method in self.methods if budget in self.budgets_of(lang)]

    def _student_cells(self, seed: int) -> list[Cell]:
        spec = self.parallel
        if spec is None:
            return []
        return [Cell(lang, method, pairs, seed, size) for size in spec.sizes for pairs in spec.with_pairs
                for lang in spec.languages for method in self.methods]

    def teacher_of(self, cell: Cell) -> Cell | None:
        """The cell whose pack a student learns from (same method and seed); None for other cells."""
        if not cell.parallel:
            return None
        return Cell(self.parallel.teacher_lang, cell.method, self.parallel.teacher_budget, cell.seed)

    def teachers(self) -> list[Cell]:
        return list(dict.fromkeys(t for t in map(self.teacher_of, self.cells()) if t is not None))

    def cell(self, cell_id: str) -> Cell:
        match = _CELL_ID.match(cell_id)
        found = [c for c in self.cells() if c.id == cell_id] if match else []
        if not found:
            raise UsageError(f"{self.path}: no cell {cell_id!r} in this study; cells look like "
                             f"{self.cells()[0].id}")
        return found[0]

    def eval_languages(self, cell: Cell) -> list[str]:
        if cell.parallel:
            return [cell.lang]
        return [cell.lang] + [lang for lang in self.evaluate.transfer.get(cell.lang, []) if lang != cell.lang]

    def all_languages(self) -> list[str]:
        targets = [lang for langs in self.evaluate.transfer.values() for lang in langs]
        students = self.parallel.languages if self.parallel else []
        return list(dict.fromkeys(self.languages + targets + students))

    def train_settings(self, method: str) -> dict:
        """Training settings of one method; ``steps`` (a bench-only setting) or ``epochs``, not both."""
        settings = {**self.train, **self.method_train.get(method, {})}
        if "epochs" in self.method_train.get(method, {}):
            settings.pop("steps", None)
        if "steps" in self.method_train.get(method, {}):
            settings.pop("epochs", None)
        return settings

    def cell_spec(self, cell: Cell) -> dict:
        """Everything a cell's numbers depend on; its hash tells a done cell from a stale one."""
        spec = {"cell": cell.fields(), "towers": [self.text_tower, self.image_tower],
                "train": self.train_settings(cell.method), "data": dataclasses.asdict(self.data),
                "evaluate": {**dataclasses.asdict(self.evaluate), "langs": self.eval_languages(cell)}}
        teacher = self.teacher_of(cell)
        if teacher is not None:  # a changed teacher makes its students stale too
            spec["parallel"] = {**self.parallel.source(), "teacher_cell": teacher.id,
                                "teacher_hash": self.cell_hash(teacher)}
        return spec

    def cell_hash(self, cell: Cell) -> str:
        return hashlib.sha256(json.dumps(self.cell_spec(cell), sort_keys=True).encode()).hexdigest()[:16]


def load_study(path: str | Path) -> StudyConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of settings at the top level")
    return _study(raw, path)


def _study(raw: dict, path: Path) -> StudyConfig:
    from mlilt.training.config import TrainConfig

    where = str(path)
    _no_unknown(raw, _TOP_KEYS, where)
    towers = _mapping(raw.get("towers", {}), f"{where}: towers")
    _no_unknown(towers, {"text", "image"}, f"{where}: towers")
    defaults = TrainConfig.defaults()
    study = StudyConfig(
        name=str(raw.get("name") or path.stem), path=path, description=str(raw.get("description", "")),
        text_tower=str(towers.get("text", defaults["text_tower"])),
        image_tower=str(towers.get("image", defaults["image_tower"])),
        languages=_strings(raw.get("languages"), f"{where}: languages"),
        methods=_strings(raw.get("methods"), f"{where}: methods"),
        **_budgets(raw.get("budgets"), raw.get("languages"), where),
        seeds=_ints(raw.get("seeds", [0]), f"{where}: seeds"),
        data=_data_spec(raw.get("data"), where), evaluate=_eval_spec(raw.get("evaluate", {}), where),
        train=_train_settings(raw.get("train", {}), f"{where}: train"),
        method_train={str(m): _train_settings(v, f"{where}: method_train.{m}")
                      for m, v in _mapping(raw.get("method_train", {}), f"{where}: method_train").items()},
        baseline=raw.get("baseline"), keep_packs=bool(raw.get("keep_packs", False)))
    _check_methods(study, where)
    _check_transfer(study, where)
    if "parallel" in raw:
        study.parallel = _parallel_spec(raw["parallel"], study, where)
    return study


def _budgets(raw, languages, where: str) -> dict:
    """``budgets``: a list for every language, or a mapping language -> list (each its own)."""
    if not isinstance(raw, dict):
        return {"budgets": _positive_ints(raw, f"{where}: budgets")}
    per_lang = {str(lang): _positive_ints(v, f"{where}: budgets.{lang}") for lang, v in raw.items()}
    listed = [languages] if isinstance(languages, str) else languages if isinstance(languages, list) else []
    if sorted(per_lang) != sorted(listed):
        raise UsageError(f"{where}: budgets as a mapping needs one list per language in languages "
                         f"({', '.join(map(str, listed))}); it has {', '.join(per_lang) or 'none'}")
    return {"budgets": sorted({b for values in per_lang.values() for b in values}), "lang_budgets": per_lang}


def _parallel_spec(raw, study: StudyConfig, where: str) -> ParallelSpec:
    here = f"{where}: parallel"
    raw = _mapping(raw, here)
    _no_unknown(raw, _PARALLEL_KEYS, here)
    missing = sorted({"sizes", "languages", "teacher"} - set(raw))
    if missing:
        raise UsageError(f"{here}: missing {', '.join(missing)}, e.g. parallel: {{sizes: [250, 1000], "
                         f"languages: [sw], teacher: {{lang: en, budget: 500}}}}")
    teacher = _mapping(raw["teacher"], f"{here}.teacher")
    _no_unknown(teacher, {"lang", "budget"}, f"{here}.teacher")
    if not isinstance(teacher.get("lang"), str) or not _is_int(teacher.get("budget")):
        raise UsageError(f"{here}.teacher: needs lang (a language in languages) and budget (one of its budgets)")
    spec = ParallelSpec(sizes=_sizes(raw["sizes"], f"{here}.sizes", least=4),
                        languages=_strings(raw["languages"], f"{here}.languages"),
                        teacher_lang=teacher["lang"], teacher_budget=teacher["budget"],
                        with_pairs=_sizes(raw.get("with_pairs", [0]), f"{here}.with_pairs", least=0),
                        train=raw.get("train"), seed=raw.get("seed"))
    _check_parallel(spec, study, here)
    return spec


def _check_parallel(spec: ParallelSpec, study: StudyConfig, here: str) -> None:
    if spec.teacher_lang not in study.languages:
        raise UsageError(f"{here}.teacher.lang {spec.teacher_lang} is not in languages: the teacher is the "
                         f"study's own cell of that language")
    if spec.teacher_budget not in study.budgets_of(spec.teacher_lang):
        raise UsageError(f"{here}.teacher.budget {spec.teacher_budget} is not a budget of {spec.teacher_lang} "
                         f"({', '.join(map(str, study.budgets_of(spec.teacher_lang)))})")
    if spec.teacher_lang in spec.languages:
        raise UsageError(f"{here}.languages: {spec.teacher_lang} is the teacher's language; a student learns "
                         f"another one")
    if any(0 < pairs < 2 for pairs in spec.with_pairs):
        raise UsageError(f"{here}.with_pairs: 0 (parallel text only) or at least 2 image-caption pairs")
    if spec.train is not None and (not isinstance(spec.train, str) or "{lang}" not in spec.train):
        raise UsageError(f"{here}.train must be a path containing {{lang}} (the student language), e.g. "
                         f"data/en-{{lang}}.tsv")
    if spec.train is None and study.data.demo is None:
        raise UsageError(f"{here}: give train: path/with/{{lang}}.tsv (source<TAB>target lines); only demo "
                         f"data generates its own parallel sentences")
    if spec.train is not None and spec.seed is not None:
        raise UsageError(f"{here}.seed chooses generated demo sentences; it has no effect with train")
    if spec.seed is not None and (not _is_int(spec.seed) or spec.seed == study.data.demo.get("seed", 0)):
        raise UsageError(f"{here}.seed must be an integer other than data.demo.seed: the sentences describe "
                         f"scenes that are not the study's images")


def _sizes(raw, where: str, least: int) -> list[int]:
    values = _ints(raw, where)
    if any(v < least for v in values):
        raise UsageError(f"{where}: every value must be at least {least}")
    return sorted(values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_methods(study: StudyConfig, where: str) -> None:
    for method in study.methods:
        try:
            parse_method(method)
        except UsageError as error:
            raise UsageError(f"{where}: methods: {error}") from None
    if len(set(study.methods)) != len(study.methods):
        raise UsageError(f"{where}: methods: a method is listed twice")
    for name, settings in (("baseline", [study.baseline] if study.baseline else []),
                           ("method_train", list(study.method_train))):
        stray = [m for m in settings if m not in study.methods]
        if stray:
            raise UsageError(f"{where}: {name} names {', '.join(stray)}, which is not in methods")


def _check_transfer(study: StudyConfig, where: str) -> None:
    stray = [lang for lang in study.evaluate.transfer if lang not in study.languages]
    if stray:
        raise UsageError(f"{where}: evaluate.transfer trains from {', '.join(stray)}, which is not in languages")


def _data_spec(raw, where: str) -> DataSpec:
    raw = _mapping(raw, f"{where}: data")
    _no_unknown(raw, {"demo", "train"}, f"{where}: data")
    if ("demo" in raw) == ("train" in raw):
        raise UsageError(f"{where}: data needs exactly one of demo: {{scenes: N}} or train: path/with/{{lang}}.jsonl")
    if "demo" in raw:
        demo = _mapping(raw["demo"] or {}, f"{where}: data.demo")
        _no_unknown(demo, _DEMO_KEYS, f"{where}: data.demo")
        return DataSpec(demo=demo)
    if not isinstance(raw["train"], str) or "{lang}" not in raw["train"]:
        raise UsageError(f"{where}: data.train must be a path containing {{lang}}, e.g. data/{{lang}}.jsonl")
    return DataSpec(train=raw["train"])


def _eval_spec(raw, where: str) -> EvalSpec:
    raw = _mapping(raw, f"{where}: evaluate")
    _no_unknown(raw, _EVAL_KEYS, f"{where}: evaluate")
    transfer = _mapping(raw.get("transfer", {}), f"{where}: evaluate.transfer")
    spec = EvalSpec(benchmark=str(raw.get("benchmark", "demo")), root=raw.get("root"),
                    captions=str(raw.get("captions", "first")), data=raw.get("data"),
                    transfer={str(k): _strings(v, f"{where}: evaluate.transfer.{k}") for k, v in transfer.items()})
    if spec.benchmark != "demo" and spec.benchmark != "custom" and not spec.root:
        raise UsageError(f"{where}: evaluate.benchmark {spec.benchmark} needs evaluate.root (where it lives)")
    if spec.benchmark == "custom" and not spec.data:
        raise UsageError(f"{where}: evaluate.benchmark custom needs evaluate.data (a held-out pairs file)")
    return spec


def _train_settings(raw, where: str) -> dict:
    """A ``train:`` mapping: TrainConfig options (less those each cell sets) checked as TrainConfig
    checks them, plus the bench-only ``steps``."""
    from mlilt.training.config import TrainConfig, check_settings

    raw = _mapping(raw, where)
    allowed = (set(TrainConfig.defaults()) - _CELL_OWNED) | {"steps"}
    _no_unknown(raw, allowed, where)
    if "steps" in raw and "epochs" in raw:
        raise UsageError(f"{where}: give steps or epochs, not both")
    if "steps" in raw and (not isinstance(raw["steps"], int) or raw["steps"] < 1):
        raise UsageError(f"{where}: steps must be a positive number of optimizer steps")
    check_settings({k: v for k, v in raw.items() if k != "steps"}, where)
    return dict(raw)


def _no_unknown(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown setting {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")


def _mapping(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(raw).__name__}")
    return raw


def _strings(raw, where: str) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x.strip() for x in raw):
        raise UsageError(f"{where}: expected a non-empty list of names")
    if any("_" in x for x in raw) and "languages" in where:
        raise UsageError(f"{where}: language codes may not contain '_' (use '-', e.g. pt-BR)")
    return list(raw)


def _ints(raw, where: str) -> list[int]:
    if isinstance(raw, int):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        raise UsageError(f"{where}: expected a non-empty list of integers")
    if len(set(raw)) != len(raw):
        raise UsageError(f"{where}: a value is listed twice")
    return list(raw)


def _positive_ints(raw, where: str) -> list[int]:
    values = _ints(raw, where)
    if any(v < 2 for v in values):
        raise UsageError(f"{where}: every budget must be at least 2 pairs")
    return values

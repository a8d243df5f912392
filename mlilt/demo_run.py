"""``mlilt demo``: the whole path on one machine with no network — demo data, a Swahili pack
trained with the default method on the offline towers, and held-out retrieval against the
same model before training."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mlilt.build import build_sides
from mlilt.data.pairs import read_pairs
from mlilt.evaluation.pairs_eval import evaluate_pairs
from mlilt.train import train
from mlilt.train_config import TrainConfig


@dataclass
class DemoResult:
    pack: Path
    before: dict
    after: dict
    seconds: float
    test_pairs: int


def run_demo(out: str | Path, lang: str = "sw", n: int = 1000, epochs: int = 4, overwrite: bool = False,
             console=None) -> DemoResult:
    from mlilt.data.demo import generate_demo

    started = time.perf_counter()
    out = Path(out)
    data = out / "data"
    if not (data / "demo.json").exists():
        generate_demo(data, ["en", lang], n=n, seed=0)
    config = TrainConfig(lang=lang, data=str(data / lang / "train.jsonl"), out=str(out / "langpacks" / lang),
                         epochs=epochs, overwrite=overwrite)
    result = train(config, console=console)
    test = read_pairs(data / lang / "test.jsonl", lang=lang)
    import mlilt
    model = mlilt.load(result.pack)
    after = evaluate_pairs(model.texts[lang], model.image, test)
    before = _untrained(config, test)
    return DemoResult(result.pack, before, after, time.perf_counter() - started, len(test))


def _untrained(config: TrainConfig, test) -> dict:
    """The same towers, method and initialisation, before any step: the chance baseline."""
    from mlilt.towers.registry import load_image_tower, load_text_tower

    sides, _ = build_sides({"text": load_text_tower(config.text_tower, max_length=config.max_length),
                            "image": load_image_tower(config.image_tower)}, config.method, config.embed_dim,
                           seed=config.seed)
    return evaluate_pairs(sides["text"], sides["image"], test)

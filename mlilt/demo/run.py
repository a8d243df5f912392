"""``mlilt demo``: the whole path on one machine with no network — demo data, a Swahili pack
trained with the default method on the offline towers, and held-out retrieval against the
same model before training."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path



@dataclass
class DemoResult:
    pack: Path
    before: dict
    after: dict
    seconds: float
    test_pairs: int


# Sized for a few minutes on 2 CPU cores: the default method trains the image tower's
# BatchNorm affine parameters, so every step runs EfficientNet forward and backward.
DEMO_SCENES = 600
DEMO_EPOCHS = 3
DEMO_BATCH = 32


def run_demo(out: str | Path, lang: str = "sw", n: int = DEMO_SCENES, epochs: int = DEMO_EPOCHS,
             batch_size: int = DEMO_BATCH, overwrite: bool = False, console=None) -> DemoResult:
    import mlilt
    from mlilt.demo.data import generate_demo
    from mlilt.data.pairs import read_pairs
    from mlilt.evaluation.pairs_eval import evaluate_pairs
    from mlilt.training.trainer import train
    from mlilt.training.config import TrainConfig

    started = time.perf_counter()
    out = Path(out)
    data = out / "data"
    if not (data / "demo.json").exists():
        generate_demo(data, ["en", lang], n=n, seed=0)
    config = TrainConfig(lang=lang, data=str(data / lang / "train.jsonl"), out=str(out / "langpacks" / lang),
                         epochs=epochs, batch_size=batch_size, overwrite=overwrite)
    result = train(config, console=console)
    test = read_pairs(data / lang / "test.jsonl", lang=lang)
    model = mlilt.load(result.pack)
    after = evaluate_pairs(model.texts[lang], model.image, test)
    before = _untrained(config, test)
    return DemoResult(result.pack, before, after, time.perf_counter() - started, len(test))


def _untrained(config, test) -> dict:
    """The same towers, method and initialisation, before any step: the chance baseline."""
    from mlilt.modeling.factory import build_sides
    from mlilt.evaluation.pairs_eval import evaluate_pairs
    from mlilt.towers.registry import load_image_tower, load_text_tower

    text_tower = load_text_tower(config.text_tower, pooling=config.pooling, max_length=config.max_length,
                                 prefix=config.text_prefix)
    sides, _ = build_sides({"text": text_tower,
                            "image": load_image_tower(config.image_tower)}, config.method, config.embed_dim,
                           seed=config.seed)
    return evaluate_pairs(sides["text"], sides["image"], test)

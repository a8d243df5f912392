"""What a trained pack records about itself: method, anchor, data, metrics and settings."""
from __future__ import annotations

from mlilt.methods import MethodReport
from mlilt.modeling.model import ContrastiveModel
from mlilt.packs import PackConfig
from mlilt.training.anchors import Anchor
from mlilt.training.config import TrainConfig

# Settings that say where a run read and wrote, not how the pack was trained.
NOT_RECORDED = ("out", "overwrite", "data", "parallel", "resume")


def pack_config(config: TrainConfig, model: ContrastiveModel, report: MethodReport, anchor: Anchor | None,
                summary: dict, best: dict, features_cached: bool, skipped: int = 0) -> PackConfig:
    """The pack's config for ``model`` as trained by ``config``; ``best`` is the kept epoch's row.
    Towers, fingerprints and the image space come from the model (``PackConfig.for_model``)."""
    training = {k: v for k, v in config.to_dict().items() if k not in NOT_RECORDED}
    training.update(best_epoch=best["epoch"], feature_cache=features_cached, nonfinite_batches_skipped=skipped)
    return PackConfig.for_model(
        model, language=config.lang, method=config.method,
        image_method=anchor.image_method if anchor else config.method,
        anchor=anchor.record() if anchor else None,
        data=summary, metrics={"val": best["val"]}, training=training, trainable=report.to_dict())

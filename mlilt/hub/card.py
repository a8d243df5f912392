"""The model card (``README.md``) of a pushed pack, generated from the pack's own record.

YAML metadata the Hub reads (language, license, ``library_name: mlilt``, tags, base models,
datasets, a ``model-index`` of the pack's validation metrics) plus an ``mlilt`` block naming
the pack it was made for (``tensors_sha256``: a card left over from another pack is noticed on
download), then a body: what the pack is, how to use it, how it was trained.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePath

from mlilt.packs import PACK_CONFIG, PACK_TENSORS, Pack

DEFAULT_LICENSE = "apache-2.0"
TAGS = ["mlilt", "image-text", "clip", "language-pack"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATASET_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?::[\w.-]+)?$")  # USER/NAME[:SPLIT]
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".tar", ".gz"}
_RECALL = re.compile(r"^(image|text)_retrieval_recall@(\d+)$")


def model_card(pack: Pack, repo_id: str, license: str | None = None) -> str:
    """README.md for ``pack`` pushed to ``repo_id``: front matter, then the body."""
    data = card_data(pack, repo_id, license or DEFAULT_LICENSE)
    return f"---\n{data.to_yaml()}\n---\n\n{card_body(pack, repo_id)}"


def card_data(pack: Pack, repo_id: str, license: str):
    from huggingface_hub import ModelCardData

    config = pack.config
    method_tags = [part for part in config.method.split("+") if part]
    extra = (["anchored"] if config.anchor else []) + (["distilled"] if config.data.get("teacher") else [])
    return ModelCardData(
        language=[config.language], license=license, library_name="mlilt",
        tags=list(dict.fromkeys([*TAGS, *method_tags, *extra])),
        base_model=[t for t in (hub_id_of_tower(config.towers[s]["spec"], s) for s in ("text", "image")) if t] or None,
        datasets=hub_datasets(config.data) or None,
        pipeline_tag="zero-shot-image-classification",
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(pack) or None,
        mlilt={"format_version": config.format_version, "mlilt_version": config.mlilt_version,
               "language": config.language, "method": config.method, "image_side_id": config.image_side_id,
               "anchor": config.anchor["name"] if config.anchor else None, "tensors_sha256": config.tensors_sha256})


def hub_id_of_tower(spec: str, side: str) -> str | None:
    """The Hub model id a tower spec loads, if it is one: ``hf:ORG/NAME``, ``ORG/NAME``,
    ``hf-hub:ORG/NAME``. The embedded offline towers (``me5-small``, ``effnet-lite0``: weights
    converted from other packages), timm and open_clip names, folders and towers registered in
    Python are not Hub ids: no base model is claimed for them."""
    from mlilt.towers.registry import resolve

    try:
        resolved = resolve(spec, side)
    except Exception:  # a spec this mlilt cannot read: claim nothing
        return None
    name = resolved.name
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        if resolved.family != "hf":
            return None
    return name if _HUB_ID.match(name) and PurePath(name).suffix not in _FILE_SUFFIXES else None


def hub_datasets(data: dict) -> list[str]:
    """Hub dataset ids among the data summary's sources (``USER/NAME[:SPLIT]``, not files)."""
    found = []
    for summary in (data, *(v for v in data.values() if isinstance(v, dict))):
        sources = summary.get("source"), *(summary.get("sources") or []), *(summary.get("files") or [])
        for source in sources:
            match = _DATASET_ID.match(source) if isinstance(source, str) else None
            # a relative folder ("demo/sw") looks the same: a path that exists here is not claimed
            if (match and PurePath(match.group(1)).suffix.lower() not in _FILE_SUFFIXES
                    and not Path(source.split(":")[0]).exists()):
                found.append(match.group(1))
    return list(dict.fromkeys(found))


def metric_order(key: str) -> tuple:
    """Image retrieval R@1, 5, 10, then text retrieval, then the mean, then anything else."""
    match = _RECALL.match(key)
    if match:
        return (0, match.group(1) != "image", int(match.group(2)), "")
    return (1, key != "mean_recall", 0, key)


def metric_label(key: str) -> str:
    match = _RECALL.match(key)
    if match:
        side, k = match.groups()
        way = "text→image" if side == "image" else "image→text"
        return f"{side} retrieval ({way}) R@{k}"
    if key == "mean_recall":
        return "mean recall (R@1/5/10, both ways)"
    return key.replace("_", " ")


def eval_results(pack: Pack) -> list:
    """``model-index`` entries for the pack's validation metrics: held-out training pairs, not a benchmark."""
    from huggingface_hub import EvalResult

    data = pack.config.data
    val = {k: v for k, v in (pack.config.metrics.get("val") or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    datasets = hub_datasets(data)
    pairs = data.get("val_pairs")
    results = []
    for key, value in sorted(val.items(), key=lambda item: metric_order(item[0])):
        distill = key.startswith("distill_") or "target_to_source" in key or key == "distance"
        results.append(EvalResult(
            task_type="sentence-similarity" if distill else "image-text-retrieval",
            task_name=("Distillation: student vs teacher on held-out parallel sentences" if distill
                       else "Image-text retrieval"),
            dataset_type=datasets[0] if datasets else "mlilt-validation",
            dataset_name=f"validation: held-out training pairs{f' ({pairs})' if pairs else ''}",
            dataset_split="validation",
            metric_type=key, metric_name=metric_label(key), metric_value=round(float(value), 4)))
    return results


# ---- the body ---------------------------------------------------------------------------

def card_body(pack: Pack, repo_id: str) -> str:
    config = pack.config
    lang = config.language
    return "\n".join([
        f"# {repo_id.split('/')[-1]}: an mlilt language pack ({lang})",
        "",
        f"A language pack for mlilt: the small set of trained tensors "
        f"({_trainable_summary(config.trainable)}) that, on top of two frozen towers, embeds `{lang}` "
        f"captions and images in one space for retrieval and zero-shot classification. Method: "
        f"`{config.method}`{_image_method(config)}. It loads only onto the towers it was trained on "
        f"(their fingerprints are checked).",
        "",
        "## Usage",
        "",
        "```python",
        "import mlilt",
        "",
        f'model = mlilt.load("hf://{repo_id}")  # or "hf://{repo_id}@REVISION"',
        f'texts = model.encode_text(["..."], lang="{lang}")',
        'images = model.encode_image(["photo.jpg"])',
        f'scores = model.similarity(texts, images, lang="{lang}")',
        "```",
        "",
        f"`mlilt packs pull {repo_id}` downloads it into the Hugging Face cache (afterwards it loads with "
        f"`HF_HUB_OFFLINE=1`); `--out DIR` copies it into a folder. Every download is checked against the "
        f"pack's recorded sha256 before use.",
        "",
        "## Towers",
        "",
        "| side | tower | fingerprint |",
        "|---|---|---|",
        *(f"| {side} | `{_cell(config.towers[side]['spec'])}` | `{config.towers[side]['fingerprint'][:12]}` |"
          for side in ("text", "image")),
        "",
        _anchor_text(config),
        "",
        "## Trainable parameters",
        "",
        *_trainable_table(config.trainable),
        "",
        "## Training",
        "",
        *_data_lines(config.data),
        "",
        "<details><summary>Settings recorded in langpack.json</summary>",
        "",
        *(f"- `{key}`: `{_cell(_public(value))}`"
          for key, value in sorted(config.training.items()) if value is not None),
        "",
        "</details>",
        "",
        "## Validation metrics",
        "",
        "Measured at the end of training on pairs held out of the training data (same source, not a "
        "benchmark). Recall in %. For benchmark numbers run "
        f"`mlilt eval --pack hf://{repo_id} --benchmark xm3600 --root DATA`.",
        "",
        *_metrics_table(config.metrics.get("val") or {}),
        "",
        "## Files",
        "",
        f"- `{PACK_CONFIG}`: what the pack is, for which towers, how it was trained and how good it is",
        f"- `{PACK_TENSORS}`: the trained tensors only (sha256 `{config.tensors_sha256 or 'not recorded'}`)",
        "- `metrics.jsonl`: the per-epoch training history",
        "",
        f"Made with mlilt {config.mlilt_version or '?'} (pack format {config.format_version}), {config.created}.",
        "",
    ])


def _image_method(config) -> str:
    return f" (image side: `{config.image_method}`)" if config.image_method != config.method else ""


def _anchor_text(config) -> str:
    if not config.anchor:
        return (f"Image space `{config.image_side_id[:12]}`: this pack trained its own image side, so other "
                f"packs can be trained against it (`mlilt train --anchor hf://...`) and load beside it.")
    name = _cell(_public(config.anchor["name"]))
    return (f"Anchored to `{name}` (image space `{config.image_side_id[:12]}`): only the text side trained, "
            f"so this pack loads beside every pack on the same anchor (`mlilt.load(pack_a, pack_b)`) and "
            f"shares one image index with them.")


def _trainable_summary(trainable: dict) -> str:
    towers = trainable.get("towers") or {}
    total = sum(t.get("trainable", 0) for t in towers.values() if isinstance(t, dict))
    return f"{total:,} trainable parameters in the towers" if total else "the trained parameters only"


def _trainable_table(trainable: dict) -> list[str]:
    towers = {k: v for k, v in (trainable.get("towers") or {}).items() if isinstance(v, dict)}
    if not towers:
        return ["Not recorded."]
    rows = ["| side | trainable | of | % |", "|---|---|---|---|"]
    for side, t in sorted(towers.items()):
        rows.append(f"| {side} | {t.get('trainable', 0):,} | {t.get('total', 0):,} | {t.get('percent', 0):.2f} |")
    return rows + ["", "Projections and the temperature train too; they are in the tensor file as well."]


def _data_lines(data: dict) -> list[str]:
    lines = []
    if "rows" in data:
        source = _public(str(data.get("source", "?")))
        lines.append(f"- pairs: {data['rows']} from `{_cell(source)}` ({data.get('train_pairs', '?')} trained on, "
                     f"{data.get('val_pairs', '?')} held out), {data.get('images', '?')} images, "
                     f"sha256 `{str(data.get('sha256', ''))[:12]}`")
    for key in ("teacher", "parallel"):
        if isinstance(data.get(key), dict):
            summary = ", ".join(f"{k}: {_cell(_public(v))}" for k, v in sorted(data[key].items())
                                if isinstance(v, (str, int, float, list)))
            lines.append(f"- {key}: {summary}")
    return lines or ["- data: not recorded"]


def _metrics_table(val: dict) -> list[str]:
    rows = [(metric_label(k), v) for k, v in sorted(val.items(), key=lambda item: metric_order(item[0]))
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return ["No validation metrics recorded."]
    return ["| metric | value |", "|---|---|", *(f"| {label} | {value:.2f} |" for label, value in rows)]


def _public(value):
    """Local paths as their last part: where the trainer kept its files is nobody's business."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(_public(v)) for v in value)
    if isinstance(value, str) and value.startswith(("/", "~", "./", "../")):
        return PurePath(value).name
    return value


def _cell(value) -> str:
    """A value inside a markdown table cell or code span: no pipes, no backticks, one line."""
    return str(value).replace("|", "\\|").replace("`", "'").replace("\n", " ")

"""Zero-shot image classification in a language, CLIP_benchmark style.

Layout under ``root``:

    images/<class_id>/*.jpg            a folder per class (or labels.jsonl: {"image", "label"})
    classnames/<lang>.txt              one line per class: ``<class_id>\\t<name in lang>``
    templates/<lang>.txt               prompt templates, one per line, each with ``{}``

The classifier for a language is the mean of its template embeddings per class, normalised;
reported metrics are top-1 / top-5 accuracy and mean per-class recall, as CLIP_benchmark names them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mlilt.data.images import ImageRef
from mlilt.modeling.encode import encode_texts
from mlilt.errors import DataError
from mlilt.modeling.model import SideEncoder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class ZeroShotSet:
    benchmark: str
    language: str
    images: list[ImageRef]
    labels: list[int]  # class index per image
    classnames: list[str]  # in this language, by class index
    templates: list[str]
    counts: dict = field(default_factory=dict)


def zeroshot_languages(root: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(root) / "classnames").glob("*.txt"))


def load_zeroshot(root: str | Path, lang: str) -> ZeroShotSet:
    root = Path(root)
    class_ids, names = _classnames(root / "classnames" / f"{lang}.txt")
    templates = _templates(root / "templates" / f"{lang}.txt")
    images, labels, unknown = _labelled_images(root, {cid: i for i, cid in enumerate(class_ids)})
    if not images:
        raise DataError(f"{root}: no labelled images (expected images/<class_id>/*.jpg or labels.jsonl)")
    return ZeroShotSet("zeroshot", lang, images, labels, names, templates, {"images_with_unknown_class": unknown})


def _classnames(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise DataError(f"missing class-name file {path} (one line per class: <class_id><TAB><name>)")
    ids, names = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        class_id, tab, name = line.partition("\t")
        if not tab or not name.strip():
            raise DataError(f"{path}:{number}: expected <class_id><TAB><name>, got {line!r}")
        ids.append(class_id.strip())
        names.append(name.strip())
    return ids, names


def _templates(path: Path) -> list[str]:
    if not path.is_file():
        return ["{}"]  # no templates: the class name alone
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DataError(f"{path}: every template needs '{{}}' for the class name; not: {bad[0]!r}")
    return templates or ["{}"]


def _labelled_images(root: Path, index: dict[str, int]) -> tuple[list[ImageRef], list[int], int]:
    images, labels, unknown = [], [], 0
    labels_file = root / "labels.jsonl"
    if labels_file.is_file():
        rows = []
        for number, line in enumerate(labels_file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append((root / row["image"], str(row["label"])))
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise DataError(f"{labels_file}:{number}: expected {{\"image\", \"label\"}} ({error})") from None
    else:
        rows = [(p, p.parent.name) for p in sorted((root / "images").glob("*/*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    for path, label in rows:
        if label not in index:
            unknown += 1
            continue
        images.append(ImageRef.from_path(path))
        labels.append(index[label])
    return images, labels, unknown


@torch.no_grad()
def classifier(text: SideEncoder, item: ZeroShotSet) -> torch.Tensor:
    """[classes, D]: mean template embedding per class, normalised."""
    prompts = [template.format(name) for name in item.classnames for template in item.templates]
    embedded = encode_texts(text, prompts).view(len(item.classnames), len(item.templates), -1).mean(1)
    return F.normalize(embedded, dim=-1)


def accuracy(image_emb: torch.Tensor, weights: torch.Tensor, labels: list[int]) -> dict[str, float]:
    labels_t = torch.as_tensor(labels)
    scores = image_emb @ weights.t()
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    acc1 = (top[:, 0] == labels_t).float().mean().item()
    acc5 = (top == labels_t[:, None]).any(1).float().mean().item()
    per_class = [(top[labels_t == c, 0] == c).float().mean().item() for c in labels_t.unique().tolist()]
    return {"acc1": 100 * acc1, "acc5": 100 * acc5, "mean_per_class_recall": 100 * sum(per_class) / len(per_class)}

"""Trainable share and pack size per method on the given towers (default: the offline pair).

    python benchmarks/trainable_share.py [--methods ln,bitfit,adapter,ln+adapter,lora] [--anchored]

Pack size is the size of the safetensors file a pack of that method holds: the text side's
own tensors, the image side's (its method tensors and projection) and the temperature.
"""
from __future__ import annotations

import argparse

from safetensors.torch import save

from mlilt.modeling.factory import build_sides
from mlilt.modeling.model import ContrastiveModel
from mlilt.defaults import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER
from mlilt.towers.registry import load_image_tower, load_text_tower


def measure(method: str, text_tower, image_tower, anchored: bool) -> dict:
    frozen = ("image",) if anchored else ()
    sides, report = build_sides({"text": text_tower, "image": image_tower}, method, 256, frozen_sides=frozen)
    model = ContrastiveModel(sides["text"], sides["image"])
    tensors = {k: v.detach().contiguous() for k, v in model.pack_state().items()}
    total = report.total["text"] + report.total["image"]
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return {"method": method, "text %": report.percent("text"), "image %": report.percent("image"),
            "tower params trained": report.trainable["text"] + report.trainable["image"],
            "all trained incl. projections": trainable, "% of both towers": 100 * trainable / total,
            "pack MB": len(save(tensors)) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ln,bitfit,adapter,ln+adapter,lora,unlock:1,full-text,full")
    parser.add_argument("--text-tower", default=DEFAULT_TEXT_TOWER)
    parser.add_argument("--image-tower", default=DEFAULT_IMAGE_TOWER)
    parser.add_argument("--anchored", action="store_true", help="text side only (training against an anchor)")
    args = parser.parse_args()
    text_tower, image_tower = load_text_tower(args.text_tower), load_image_tower(args.image_tower)
    rows = [measure(m, text_tower, image_tower, args.anchored) for m in args.methods.split(",")]
    print(f"towers: {args.text_tower} + {args.image_tower}{' (anchored: text side only)' if args.anchored else ''}")
    print("| method | text tower % | image tower % | trained params (incl. projections) | % of both towers | pack MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['text %']:.3f} | {r['image %']:.3f} | {r['all trained incl. projections']:,} "
              f"| {r['% of both towers']:.3f} | {r['pack MB']:.2f} |")


if __name__ == "__main__":
    main()

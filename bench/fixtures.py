"""MMR-format splits made of real photographs for the benchmarks: JPEGs from scikit-image's
sample photos (re-sized and cropped so that images differ in size and aspect), questions whose
answers hold ``{seg}`` slots, and ellipse masks stored as COCO RLE — read through the real MMR
reader like any MMR split.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def _photos():
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket(), skimage.data.cat()]


def _ellipse_rle(rng, h: int, w: int, yy, xx) -> dict:
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    rx, ry = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
    m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"bbox": [cx - rx, cy - ry, 2 * rx, 2 * ry],
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}}


def write_mmr_split(out: str, n_images: int, *, questions: int = 3, targets=(1, 3),
                    sizes=None, split: str = "val", seed: int = 0) -> tuple[str, str]:
    """``n_images`` JPEGs under ``out/images`` and ``out/MMR_{split}.json``; each image has
    ``questions`` questions with a number of targets drawn from ``targets`` (inclusive range,
    or an int), alternately objects and parts. ``sizes``: (height, width) per image, cycled;
    default the photographs' own sizes, shrunk a little more for every image (all different).
    Returns (json path, image root)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    root = os.path.join(out, "images")
    os.makedirs(root, exist_ok=True)
    lo, hi = (targets, targets) if isinstance(targets, int) else targets
    records = []
    for i in range(n_images):
        photo = photos[i % len(photos)]
        if sizes:
            h, w = sizes[i % len(sizes)]
        else:
            h, w = photo.shape[0] - 7 * i % 50, photo.shape[1] - 11 * i % 60
        img = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        name = f"{i:06d}.jpg"
        Image.fromarray(img).save(os.path.join(root, name), quality=90)
        yy, xx = np.mgrid[0:h, 0:w]
        qs, answers, texts = [], [], []
        for q in range(questions):
            anns = []
            for _ in range(int(rng.integers(lo, hi + 1))):
                anns.append(dict(_ellipse_rle(rng, h, w, yy, xx), image_id=i,
                                 category_name="thing:part" if q % 2 else "thing",
                                 category_id=1, sorted_category_id=0))
            qs.append(f"Which things in image {i} would you pick for task {q}?")
            answers.append(anns)
            texts.append(" and ".join("the thing {seg}" for _ in anns))
        records.append({"file_name": name, "height": h, "width": w, "image_id": i,
                        "not_exhaustive_category_ids": [], "neg_category_ids": [], "coco_url": "",
                        "questions": qs, "answers": answers, "text_answers": texts,
                        "raw_answers": texts})
    path = os.path.join(out, f"MMR_{split}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, root

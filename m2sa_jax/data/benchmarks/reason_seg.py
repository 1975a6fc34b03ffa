"""ReasonSeg (LISA's ``reason_seg/ReasonSeg/{val,test}``): images with a same-named LabelMe
``.json`` of query texts and polygons (the package docstring gives the ground-truth rules)."""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any

import numpy as np

from m2sa_jax.data.benchmarks.common import with_eval_turns
from m2sa_jax.data.images import image_size
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import SEG_TOKEN, BadRecord, MaskRef, Sample


# ------------------------------------------------------------------------------ ReasonSeg

def _read_json_text(path: str) -> Any:
    """UTF-8, falling back to cp1252 as the public reader does for a few ReasonSeg files."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    return json.loads(text)


def _reason_seg_polygons(shapes: Any) -> list[tuple[np.ndarray, int]]:
    """Validated (points [1, n, 2] int32, value) per drawable shape, in file order."""
    if not isinstance(shapes, list):
        raise BadRecord("malformed_shapes", "'shapes' is not a list")
    out = []
    for k, shape in enumerate(shapes):
        label = shape.get("label") if isinstance(shape, dict) else None
        if not isinstance(label, str):
            raise BadRecord("malformed_shapes", f"shape {k} has no string 'label'")
        if label.lower() == "flag":
            continue
        try:
            points = np.asarray(shape["points"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise BadRecord("malformed_shapes", f"shape {k} points unreadable ({e})") from None
        if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0 or not np.isfinite(points).all():
            raise BadRecord("malformed_shapes", f"shape {k} points are not a list of [x, y]")
        value = 255 if "ignore" in label.lower() else 1
        out.append((points.astype(np.int32)[None], value))
    return out


def reason_seg_label_map(shapes: Any, height: int, width: int) -> np.ndarray:
    """LISA's ReasonSeg ground truth: uint8 [H, W], 1 = target, 255 = ignore, 0 = background."""
    import cv2  # LISA's drawing routines; only ReasonSeg needs OpenCV

    polys = _reason_seg_polygons(shapes)
    areas = []
    for points, _ in polys:
        canvas = np.zeros((height, width), np.uint8)
        cv2.polylines(canvas, points, True, 1, 1)
        cv2.fillPoly(canvas, points, 1)
        areas.append(int(canvas.sum()))
    label = np.zeros((height, width), np.uint8)  # [H, W]
    # Largest first, with ties broken exactly as upstream (reversed default argsort).
    for k in np.argsort(np.asarray(areas, np.int64))[::-1]:
        points, value = polys[int(k)]
        cv2.polylines(label, points, True, value, 1)
        cv2.fillPoly(label, points, value)
    return label


def _reason_seg_region(json_path: str, height: int, width: int, value: int) -> np.ndarray:
    return reason_seg_label_map(_read_json_text(json_path)["shapes"], height, width) == value


def reason_seg(split_dir: str, strict: bool = False) -> tuple[list[Sample], SkipCounter]:
    """ReasonSeg ``val`` or ``test`` (``<root>/reason_seg/ReasonSeg/<split>``), sorted by name.

    One sample per image: its first query text, stripped; a sentence (``is_sentence``) is the
    question as is, a phrase becomes ``"What is {text} in this image?"`` (the public
    evaluation's two prompts). One target per image: the union of target polygons, with the
    ignore polygons in ``extra["ignore_masks"]``. An image without target polygons stays
    (its ground truth is empty: an empty prediction scores 1.0).
    """
    skips = SkipCounter(strict=strict)
    samples = []
    images = sorted(glob.glob(os.path.join(split_dir, "*.jpg")))
    if not images:
        raise FileNotFoundError(f"{split_dir}: no *.jpg; expected LISA's reason_seg/ReasonSeg/<split> folder")
    split_name = os.path.basename(os.path.normpath(split_dir))
    for image_path in images:
        stem = os.path.splitext(os.path.basename(image_path))[0]
        record_id = f"reason_seg/{split_name}/{stem}"
        json_path = os.path.splitext(image_path)[0] + ".json"
        try:
            if not os.path.exists(json_path):
                raise BadRecord("missing_json", f"no {os.path.basename(json_path)} beside the image")
            try:
                anno = _read_json_text(json_path)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRecord("invalid_json", f"{json_path}: {e}") from None
            texts = anno.get("text") if isinstance(anno, dict) else None
            if isinstance(texts, str):
                texts = [texts]
            if not texts or not isinstance(texts[0], str) or not texts[0].strip():
                raise BadRecord("no_query", "'text' holds no query")
            height, width = image_size(image_path)  # as OpenCV shows it: EXIF-rotated
            _reason_seg_polygons(anno.get("shapes"))
            text = texts[0].strip()
            question = text if anno.get("is_sentence") else f"What is {text} in this image?"
            target = MaskRef(functools.partial(_reason_seg_region, json_path, height, width, 1),
                             height, width, "target", "object")
            ignore = MaskRef(functools.partial(_reason_seg_region, json_path, height, width, 255),
                             height, width, "ignore", "object")
        except BadRecord as e:
            skips.add(e.reason, record_id, f"{json_path}: {e}")
            continue
        sample = Sample(source="reason_seg", record_id=record_id, image_path=image_path,
                        questions=[question], answers=[SEG_TOKEN], masks=[[target]],
                        height=height, width=width,
                        extra={"ignore_masks": [[ignore]], "is_sentence": bool(anno.get("is_sentence"))})
        samples.append(with_eval_turns(sample))
    return samples, skips



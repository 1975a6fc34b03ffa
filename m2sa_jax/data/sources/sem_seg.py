"""Semantic and part segmentation sources: ADE20K, COCO-Stuff, Mapillary Vistas v2.0,
PACO-LVIS and PASCAL-Part, read as the public LISA/M²SA training code reads them.

Each image yields up to ``max_questions × max_per_question`` (3 × 3 in M²SA) targets: the
classes present in a label map, or the annotations of a COCO-style part file, grouped into
questions by :func:`~m2sa_jax.data.sources.common.build_sample`.

Label facts (from the public code):
- ADE20K: stored 0 is "other" → ignored; class id = stored − 1.
- COCO-Stuff: class id = stored value; 255 and every class whose name has a "-"
  (``wall-other``, ``floor-wood``…) are ignored.
- Mapillary: class names are ``labels[i]["readable"].lower()`` from config_v2.0.json; only
  255 is ignored.
- PACO-LVIS names drop the ``_(…)`` suffix; part categories are ``"obj:part"``.
  PASCAL-Part categories are all ``"obj:part"``. A part is phrased "obj part" or
  "the part of the obj" with probability ½ each.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from m2sa_jax.data.sources import common
from m2sa_jax.data.sources.class_names import ADE20K_CLASSES, COCO_STUFF_CLASSES
from m2sa_jax.data.types import BadRecord, Sample

IGNORE_LABEL = 255


class LabelMapSource:
    """Images with a per-pixel class-id PNG (ADE20K, COCO-Stuff, Mapillary)."""

    def __init__(self, name: str, images: Sequence[str], labels: Sequence[str], classes: Sequence[str],
                 *, shift: str = "none", ignore_ids: Sequence[int] = (), max_questions: int = 3,
                 max_per_question: int = 3, expand_questions: bool = True):
        self.name = name
        self.images = list(images)
        self.labels = list(labels)
        self.classes = list(classes)
        self.shift = shift
        self.ignore_ids = tuple(ignore_ids)
        self.max_questions = max_questions
        self.max_per_question = max_per_question
        self.expand_questions = expand_questions

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, rng: np.random.Generator) -> Sample:
        label_path = self.labels[index]
        try:
            stored = common.read_label(label_path)
        except OSError as e:
            raise BadRecord("unreadable_label", f"{label_path}: cannot read label ({e}); re-extract the {self.name} archive") from e
        if stored.ndim != 2:
            raise BadRecord("bad_label", f"{label_path}: label has shape {stored.shape}, expected [H, W] class ids")
        label = common.remap_label(stored, self.shift, self.ignore_ids)
        present = [int(v) for v in np.unique(label) if v != IGNORE_LABEL]
        if not present:
            raise BadRecord("no_classes", f"{label_path}: no labelled class in this image")
        unknown = [v for v in present if v >= len(self.classes)]
        if unknown:
            raise BadRecord("bad_label", f"{label_path}: class ids {unknown} beyond the {len(self.classes)} {self.name} classes")
        height, width = label.shape
        chosen = common.choose_targets(rng, present, self.max_questions * self.max_per_question)
        offset = 1 if self.shift == "ade20k" else 0
        targets = [(self.classes[c], common.label_mask(label_path, c + offset, height, width, self.classes[c]))
                   for c in chosen]
        return common.build_sample(
            rng, source=self.name, record_id=f"{self.name}:{os.path.basename(label_path)}",
            image_path=self.images[index], targets=targets, max_questions=self.max_questions,
            max_per_question=self.max_per_question, height=height, width=width,
            expand=self.expand_questions)


def ade20k(root: str, **kw) -> LabelMapSource:
    """``root/ade20k/images/training/*.jpg`` with ``root/ade20k/annotations/training/*.png``."""
    image_dir = os.path.join(root, "ade20k", "images", "training")
    stems = sorted(f[:-4] for f in os.listdir(image_dir) if f.endswith(".jpg"))
    images = [os.path.join(image_dir, s + ".jpg") for s in stems]
    labels = [os.path.join(root, "ade20k", "annotations", "training", s + ".png") for s in stems]
    return LabelMapSource("ade20k", images, labels, ADE20K_CLASSES, shift="ade20k", **kw)


def cocostuff(root: str, **kw) -> LabelMapSource:
    """``root/cocostuff/train2017/*.png`` labels for ``root/coco/train2017/*.jpg`` images."""
    labels = sorted(glob.glob(os.path.join(root, "cocostuff", "train2017", "*.png")))
    images = [os.path.join(root, "coco", "train2017", os.path.basename(p)[:-4] + ".jpg") for p in labels]
    ignore = [i for i, c in enumerate(COCO_STUFF_CLASSES) if "-" in c]
    return LabelMapSource("cocostuff", images, labels, COCO_STUFF_CLASSES, ignore_ids=ignore, **kw)


def mapillary(root: str, **kw) -> LabelMapSource:
    """``root/mapillary/config_v2.0.json``, ``training/v2.0/labels/*.png``, ``training/images/*.jpg``."""
    base = os.path.join(root, "mapillary")
    config_path = os.path.join(base, "config_v2.0.json")
    with open(config_path) as f:
        config = json.load(f)
    try:
        classes = [entry["readable"].lower() for entry in config["labels"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: expected {{'labels': [{{'readable': ...}}, ...]}} (Mapillary Vistas v2.0 config); got key error {e}") from e
    labels = sorted(glob.glob(os.path.join(base, "training", "v2.0", "labels", "*.png")))
    images = [os.path.join(base, "training", "images", os.path.basename(p)[:-4] + ".jpg") for p in labels]
    return LabelMapSource("mapillary", images, labels, classes, **kw)


class PartAnnotationSource:
    """COCO-format object/part instance annotations (PACO-LVIS, PASCAL-Part)."""

    def __init__(self, name: str, annotation_file: str, image_dir: str, names: dict[int, str | tuple[str, str]],
                 images: list[dict], anns_by_image: dict[int, list[dict]], *, max_questions: int = 3,
                 max_per_question: int = 3, expand_questions: bool = True):
        self.name = name
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.names = names
        self.images = images
        self.anns_by_image = anns_by_image
        self.max_questions = max_questions
        self.max_per_question = max_per_question
        self.expand_questions = expand_questions

    def __len__(self) -> int:
        return len(self.images)

    def phrase(self, category_id: int, rng: np.random.Generator) -> tuple[str, str]:
        """(name, kind): "obj part" or "the part of the obj" for parts."""
        name = self.names[category_id]
        if isinstance(name, tuple):
            obj, part = name
            return (f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"), "part"
        return name, "object"

    def sample(self, index: int, rng: np.random.Generator) -> Sample:
        info = self.images[index]
        anns = self.anns_by_image.get(info["id"], [])
        record_id = f"{self.name}:{info['id']}"
        if not anns:
            raise BadRecord("no_annotations", f"{self.annotation_file} image {info['id']}: no annotations")
        height, width = int(info["height"]), int(info["width"])
        chosen = common.choose_targets(rng, anns, self.max_questions * self.max_per_question)
        targets = []
        for ann in chosen:
            if ann["category_id"] not in self.names:
                raise BadRecord("bad_category", f"{self.annotation_file} annotation {ann.get('id')}: category {ann['category_id']} not in categories")
            text, kind = self.phrase(ann["category_id"], rng)
            targets.append((text, common.coco_mask([ann["segmentation"]], height, width, text, kind)))
        return common.build_sample(
            rng, source=self.name, record_id=record_id,
            image_path=os.path.join(self.image_dir, info["file_name"]), targets=targets,
            max_questions=self.max_questions, max_per_question=self.max_per_question,
            height=height, width=width, expand=self.expand_questions)


def _load_coco(annotation_file: str) -> tuple[dict, list[dict], dict[int, list[dict]]]:
    with open(annotation_file) as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{annotation_file}: missing '{key}'; expected a COCO-format annotation file")
    anns_by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    images = sorted(data["images"], key=lambda im: im["id"])
    return data, images, anns_by_image


def paco_lvis(root: str, **kw) -> PartAnnotationSource:
    """``root/vlpart/paco/annotations/paco_lvis_v1_train.json``; images under ``root/coco``."""
    path = os.path.join(root, "vlpart", "paco", "annotations", "paco_lvis_v1_train.json")
    data, images, anns = _load_coco(path)
    names: dict[int, str | tuple[str, str]] = {}
    for cat in data["categories"]:
        pieces = cat["name"].strip().split(":")
        if len(pieces) == 1:
            names[cat["id"]] = pieces[0].split("_(")[0]
        elif len(pieces) == 2:
            names[cat["id"]] = (pieces[0].split("_(")[0], pieces[1].split("_(")[0])
        else:
            raise ValueError(f"{path}: category {cat['id']} name {cat['name']!r} is neither 'obj' nor 'obj:part'")
    return PartAnnotationSource("paco_lvis", path, os.path.join(root, "coco"), names, images, anns, **kw)


def pascal_part(root: str, **kw) -> PartAnnotationSource:
    """``root/vlpart/pascal_part/train.json``; images in ``VOCdevkit/VOC2010/JPEGImages`` beside it."""
    base = os.path.join(root, "vlpart", "pascal_part")
    path = os.path.join(base, "train.json")
    data, images, anns = _load_coco(path)
    names: dict[int, str | tuple[str, str]] = {}
    for cat in data["categories"]:
        pieces = cat["name"].strip().split(":")
        if len(pieces) != 2:
            raise ValueError(f"{path}: category {cat['id']} name {cat['name']!r} is not 'obj:part'")
        names[cat["id"]] = (pieces[0], pieces[1])
    return PartAnnotationSource("pascal_part", path, os.path.join(base, "VOCdevkit", "VOC2010", "JPEGImages"),
                                names, images, anns, **kw)


BUILDERS = {"ade20k": ade20k, "cocostuff": cocostuff, "mapillary": mapillary,
            "paco_lvis": paco_lvis, "pascal_part": pascal_part}

# The public M²SA training default (its --sem_seg_data), in this order.
DEFAULT_SEM_SEG = ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary")


def sem_seg_sources(root: str, names: Sequence[str] = DEFAULT_SEM_SEG, **kw) -> list:
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown sem_seg datasets {unknown}; choose from {sorted(BUILDERS)}")
    return [BUILDERS[n](root, **kw) for n in names]

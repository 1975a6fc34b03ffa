"""What the segmentation sources share: grouping targets into questions, phrasing the
turns, and lazily decoded masks (module-level functions + partials, so Samples pickle
into worker processes)."""

from __future__ import annotations

import functools
from typing import Protocol, Sequence, TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from m2sa_jax.data import templates
from m2sa_jax.data.types import SEG_TOKEN, MaskRef, Sample

T = TypeVar("T")


class Source(Protocol):
    name: str

    def __len__(self) -> int: ...

    def sample(self, index: int, rng: np.random.Generator) -> Sample: ...


def choose_targets(rng: np.random.Generator, items: Sequence[T], limit: int) -> list[T]:
    """Up to ``limit`` distinct items, in random order when subsampled (as upstream)."""
    if len(items) >= limit:
        picked = rng.choice(len(items), size=limit, replace=False)
        return [items[int(i)] for i in picked]
    return list(items)


def allocate_to_questions(
    rng: np.random.Generator, items: Sequence[T], max_questions: int, max_per_question: int
) -> list[list[T]]:
    """Spread targets over at most ``max_questions`` questions of ≤ ``max_per_question``.

    Mirrors the public M²SA code: targets are visited in a random order; each goes to a
    random question that is still empty, or, once none is, to a random question that is
    not full. Every question gets at least one target.
    """
    num_questions = min(max_questions, len(items))
    counts = np.zeros(num_questions, np.int64)
    groups: list[list[T]] = [[] for _ in range(num_questions)]
    order = rng.permutation(len(items))
    for item_index in order:
        open_slots = np.flatnonzero(counts == 0)
        if open_slots.size == 0:
            open_slots = np.flatnonzero(counts < max_per_question)
        slot = int(rng.choice(open_slots))
        counts[slot] += 1
        groups[slot].append(items[int(item_index)])
    return groups


def phrase_turn(rng: np.random.Generator, names: Sequence[str], expand: bool = True,
                released_weights: bool = True) -> tuple[str, str]:
    """One (question, answer) for the targets ``names``: one [SEG] per name, in order.

    Question: a short (class-name) template filled with the enumerated, lower-cased names.
    Answer: one target → a plain answer template; several → with probability ½ one
    "X is [SEG]" clause per target joined, otherwise a plural template listing all [SEG]s
    (the three branches of the public M²SA code). ``released_weights``: draw questions with
    the released training's weights (see :func:`templates.short_questions`).
    """
    target = templates.join_targets(list(names))
    question = templates.strip_image_prefix(
        str(rng.choice(templates.short_questions(expand, released_weights))).format(class_name=target.lower())
    )
    separate = int(rng.integers(0, 2))
    if len(names) == 1:
        answer = str(rng.choice(templates.MMR_ANSWER_LIST)).format(seg=SEG_TOKEN)
    elif separate:
        clause = str(rng.choice(templates.SINGLE_ANSWER_LIST))
        parts = [clause.format(class_name=n, seg=SEG_TOKEN)[:-1] for n in names]
        answer = templates.join_targets(parts) + "."
    else:
        plural = str(rng.choice(templates.MULTI_ANSWER_LIST))
        answer = plural.format(class_name=target.lower(), seg=templates.seg_slots(len(names)))
    return question, answer


def build_sample(
    rng: np.random.Generator,
    *,
    source: str,
    record_id: str,
    image_path: str,
    targets: Sequence[tuple[str, MaskRef]],
    max_questions: int,
    max_per_question: int,
    height: int = 0,
    width: int = 0,
    expand: bool = True,
) -> Sample:
    """Group (name, mask) targets into questions and phrase each one."""
    groups = allocate_to_questions(rng, list(targets), max_questions, max_per_question)
    questions, answers, masks = [], [], []
    for group in groups:
        q, a = phrase_turn(rng, [name for name, _ in group], expand)
        questions.append(q)
        answers.append(a)
        masks.append([m for _, m in group])
    return Sample(source=source, record_id=record_id, image_path=image_path, questions=questions,
                  answers=answers, masks=masks, height=height, width=width)


def read_label(path: str) -> np.ndarray:
    """A label PNG as stored: integer class ids per pixel. # [H, W]"""
    with Image.open(path) as im:
        return np.array(im)


def _label_equals(path: str, stored_value: int) -> np.ndarray:
    return read_label(path) == stored_value


def remap_label(label: np.ndarray, shift: str, ignore_values: Sequence[int] = ()) -> np.ndarray:
    """Upstream label conventions. ``"ade20k"``: stored 0 ("other") and 255 → 255, others − 1."""
    label = label.astype(np.int64)
    if shift == "ade20k":
        label = np.where((label == 0) | (label == 255), 255, label - 1)
    for v in ignore_values:
        label = np.where(label == v, 255, label)
    return label


def label_mask(path: str, stored_value: int, height: int, width: int, label: str) -> MaskRef:
    """Pixels of a label PNG equal to ``stored_value`` (the value on disk, before any shift)."""
    return MaskRef(functools.partial(_label_equals, path, stored_value), height, width, label, "object")


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            return np.zeros((height, width), bool)
        if isinstance(segmentation[0], list):  # polygons
            rles = mask_utils.frPyObjects(segmentation, height, width)
        else:  # a list of RLE dicts
            rles = [_as_rle(s, height, width) for s in segmentation]
        decoded = mask_utils.decode(rles)  # [H, W, n]
    else:
        decoded = mask_utils.decode(_as_rle(segmentation, height, width))
    if decoded.ndim == 3:
        decoded = decoded.sum(axis=2)
    return decoded > 0


def _as_rle(segmentation: dict, height: int, width: int) -> dict:
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


def _union_of(segmentations: tuple, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), bool)
    for seg in segmentations:
        out |= _decode_segmentation(seg, height, width)
    return out


def coco_mask(segmentations: Sequence, height: int, width: int, label: str, kind: str = "object") -> MaskRef:
    """Union of COCO-style segmentations (polygons, RLE or uncompressed RLE)."""
    return MaskRef(functools.partial(_union_of, tuple(segmentations), height, width), height, width, label, kind)

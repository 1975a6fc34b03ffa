"""Benchmark readers: upstream on-disk formats → evaluation :class:`Sample` lists.

Every reader returns ``(samples, skips)``: samples with stable ``record_id`` s, and the
data package's :class:`~m2sa_jax.data.skips.SkipCounter` naming every record left out and
why (``strict=True`` raises on the first bad record instead). Each sample's questions are the
bare sentence (as every source stores them) and its ``extra`` holds the exact evaluation turns:

- ``extra["eval_questions"]``: the user turns without the ``<image>\\n`` prefix, e.g.
  ``" {question} Please output segmentation mask."`` (the public evaluation prompt);
- ``extra["eval_answers"]``: the teacher-forced assistant turns, e.g. ``"[SEG]."``;
- ``extra["ignore_masks"]`` (ReasonSeg only): per target, a :class:`MaskRef` of the pixels
  the metric must not count (``mask_stats(..., ignore=...)``), aligned with ``masks``.

Readers and the public code they follow (read for facts):

- MMR (val, test_mixed, test_obj_only, test_part_only): the MMR reader, every question with
  its own answer (``text_answers[i]`` with one [SEG] per target) — :func:`mmr`.
- ReasonSeg (LISA's ``reason_seg/ReasonSeg/{val,test}/*.jpg`` + same-named ``.json``):
  only the first query text of an image is evaluated; the ground truth is the polygon label
  map of LISA's ``get_mask_from_json`` — polygons sorted by area, largest first, each drawn
  (outline of width 1 then fill, points truncated to int) with 1 for targets and 255 for
  labels containing "ignore"; "flag" shapes dropped — target = (map == 1), ignore =
  (map == 255) — :func:`reason_seg`.
- RefCOCO / RefCOCO+ / RefCOCOg (REFER refs pickle + instances.json): one sample per image,
  every sentence of every ref of the split a question ``"What is {sent} in this image?"``
  (sentence stripped and lower-cased) with one [SEG] and that ref's mask — :func:`refcoco`.
- Multi-target referring (paper Table 4 / §A.10): per image of a REFER split, 4–6 of its COCO
  categories (seeded per image) in one question "Can you segment the a, b, and c?", answered
  "a [SEG], b [SEG] and c [SEG].", one mask per category = union of its instances —
  :func:`multi_target_referring` with ``protocol="paper"``. The public code's own variant
  (``protocol="released"``) instead chains the image's referring sentences in groups of 6, 5,
  4, 6, … as ``"What is s1, s2 and s3 in this image?"`` → ``"[SEG], [SEG] and [SEG]."``.
- RefCOCOm (part-level referring): the MMR code reads it in the CRIS layout that the
  RefCOCOm release follows — an annotation JSON list of ``{segment_id, img_name, cat,
  bbox, sentences: [{idx, sent_id, sent}], sentences_num}`` and one ``masks/<segment_id>.png``
  (0 / 255) per ref — one sample per ref, every sentence a question with the same mask
  — :func:`refcocom`. Releases in the REFER layout go through :func:`refcoco`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from m2sa_jax.data import templates
from m2sa_jax.data.conversation import validation_answer, validation_question
from m2sa_jax.data.images import image_size
from m2sa_jax.data.mmr import MMRDataset
from m2sa_jax.data.refer import Refer
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.sources.common import coco_mask
from m2sa_jax.data.types import SEG_TOKEN, BadRecord, MaskRef, Sample

MMR_SPLITS = {
    "val": "MMR_val.json",
    "test_mixed": "MMR_test_mixed.json",
    "test_obj_only": "MMR_test_obj_only.json",
    "test_part_only": "MMR_test_part_only.json",
}
REFER_SPLITS = {
    "refcoco": ("unc", ("val", "testA", "testB")),
    "refcoco+": ("unc", ("val", "testA", "testB")),
    "refcocog": ("umd", ("val", "test")),
}
RELEASED_GROUP_SIZES = (6, 5, 4)
PAPER_CATEGORY_RANGE = (4, 6)


def _with_eval_turns(sample: Sample, questions: Sequence[str] | None = None,
                     answers: Sequence[str] | None = None) -> Sample:
    sample.extra["eval_questions"] = list(questions) if questions is not None else [
        validation_question(q.strip()) for q in sample.questions]   # the public eval strips
    sample.extra["eval_answers"] = list(answers) if answers is not None else [
        validation_answer(a) for a in sample.answers]
    return sample


# ----------------------------------------------------------------------------------- MMR

def mmr(mmr_root: str, image_root: str, split: str = "val", strict: bool = False,
        **reader_kwargs) -> tuple[list[Sample], SkipCounter]:
    """An MMR split (``val``, ``test_mixed``, ``test_obj_only``, ``test_part_only``) in
    validation mode: every question of every record, each with its own teacher-forced answer.

    ``mmr_root`` holds the ``MMR_*.json`` files; ``image_root`` the COCO images the records'
    ``file_name`` s resolve under. The MMR reader decides object/part per mask
    (``MaskRef.kind``), which the metrics break down by; ``reader_kwargs`` go to it.
    """
    if split not in MMR_SPLITS:
        raise ValueError(f"MMR split {split!r} is not one of {sorted(MMR_SPLITS)}")
    dataset = MMRDataset(os.path.join(mmr_root, MMR_SPLITS[split]), image_root, prompt="raw",
                         strict=strict, **reader_kwargs)
    samples = [_with_eval_turns(dataset.sample(i, all_questions=True)) for i in range(len(dataset))]
    return samples, dataset.skips


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
        samples.append(_with_eval_turns(sample))
    return samples, skips


# ------------------------------------------------------------------------- REFER datasets

def _open_refer(data_root: str, dataset: str, split_by: str | None, image_dir: str | None):
    return Refer(data_root, dataset, split_by=split_by, image_dir=image_dir)


def refcoco(data_root: str, dataset: str = "refcoco", split: str = "val",
            split_by: str | None = None, image_dir: str | None = None,
            kind: str = "object", strict: bool = False) -> tuple[list[Sample], SkipCounter]:
    """RefCOCO / RefCOCO+ / RefCOCOg (and RefCOCOm in the REFER layout, ``kind="part"``).

    ``data_root`` is LISA's ``refer_seg`` folder (``<dataset>/refs(<split_by>).p`` +
    ``instances.json``; images under ``images/mscoco/images/train2014``).
    """
    refer = _open_refer(data_root, dataset, split_by, image_dir)
    skips = SkipCounter(strict=strict)
    samples = []
    split_refs = refer.ref_ids(split)
    wanted = set(split_refs)
    for image_id in refer.image_ids(split_refs):
        record_id = f"{dataset}({refer.split_by})/{split}/{image_id}"
        img = refer.imgs.get(image_id)
        if img is None:
            skips.add("missing_image_entry", record_id,
                      f"{refer.instances_file}: image {image_id} of the split's refs is not listed")
            continue
        questions, masks = [], []
        for ref in refer.img_to_refs[image_id]:
            if ref["ref_id"] not in wanted:
                continue
            for sent in refer.sentences(ref):
                sent = sent.strip().lower()
                mask = refer.mask(ref["ann_id"], sent)
                questions.append(f"What is {sent} in this image?")
                masks.append([dataclasses.replace(mask, kind=kind)])
        if not questions:
            skips.add("no_sentences", record_id,
                      f"{refer.refs_file}: the split's refs of image {image_id} have no sentence")
            continue
        samples.append(_with_eval_turns(Sample(
            source=dataset, record_id=record_id, image_path=refer.image_path(image_id),
            questions=questions, answers=[SEG_TOKEN] * len(questions), masks=masks,
            height=int(img["height"]), width=int(img["width"]))))
    return samples, skips


def refcocom(annotation_json: str, mask_dir: str, image_dir: str,
             kind: str | None = None, strict: bool = False) -> tuple[list[Sample], SkipCounter]:
    """RefCOCOm in the CRIS layout the MMR evaluation reads (see the module docstring).

    The ground truth is the PNG's pixels equal to 255 (the public code reads it as
    grey / 255 and truncates to int, so anything below 255 is background). ``kind``:
    "part" or "object" for every mask; by default "part" when the file name says "part"
    and "object" otherwise (RefCOCOm ships its part-only and object-and-part sets apart).
    """
    if kind is None:
        kind = "part" if "part" in os.path.basename(annotation_json).lower() else "object"
    with open(annotation_json) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{annotation_json}: expected a JSON list of refs (CRIS layout)")
    name = os.path.splitext(os.path.basename(annotation_json))[0]
    skips = SkipCounter(strict=strict)
    samples = []
    seen = set()
    for k, rec in enumerate(records):
        segment_id = rec.get("segment_id") if isinstance(rec, dict) else None
        record_id = f"refcocom/{name}/{segment_id if segment_id is not None else f'#{k}'}"
        try:
            if segment_id is None or not isinstance(rec.get("img_name"), str):
                raise BadRecord("malformed_record", "needs 'segment_id' and 'img_name'")
            if segment_id in seen:
                raise BadRecord("duplicate_record", f"segment_id {segment_id} appears twice")
            sents = [s.get("sent") for s in rec.get("sentences") or [] if isinstance(s, dict)]
            sents = [s.strip().lower() for s in sents if isinstance(s, str) and s.strip()]
            if not sents:
                raise BadRecord("no_sentences", "no sentence")
            mask_path = os.path.join(mask_dir, f"{segment_id}.png")
            image_path = os.path.join(image_dir, rec["img_name"])
            if not os.path.exists(mask_path):
                raise BadRecord("missing_mask", f"no {mask_path}")
            if not os.path.exists(image_path):
                raise BadRecord("missing_image", f"no {image_path}")
            with Image.open(mask_path) as m:
                mw, mh = m.size
            with Image.open(image_path) as im:
                iw, ih = im.size
            if (mh, mw) != (ih, iw):
                raise BadRecord("mask_size_mismatch", f"mask {mh}x{mw} but image {ih}x{iw}")
        except BadRecord as e:
            skips.add(e.reason, record_id, f"{annotation_json} record {k} ({record_id}): {e}")
            continue
        seen.add(segment_id)
        mask = MaskRef(functools.partial(_png_equals_255, mask_path), ih, iw, rec.get("cat_name", ""), kind)
        samples.append(_with_eval_turns(Sample(
            source="refcocom", record_id=record_id, image_path=image_path,
            questions=[f"What is {s} in this image?" for s in sents],
            answers=[SEG_TOKEN] * len(sents), masks=[[mask] for _ in sents], height=ih, width=iw)))
    return samples, skips


def _png_equals_255(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) == 255


# ------------------------------------------------------------- multi-target referring

def multi_target_referring(data_root: str, dataset: str = "refcoco", split: str = "val",
                           protocol: str = "paper", seed: int = 0, split_by: str | None = None,
                           image_dir: str | None = None, strict: bool = False
                           ) -> tuple[list[Sample], SkipCounter]:
    """Several targets of one image in one question (paper Table 4 / §A.10).

    ``protocol="paper"``: for each image of the REFER split, ``n`` ~ U{4, 5, 6} (at most the
    number of categories the image has; images with fewer than 4 are skipped) distinct COCO
    categories drawn with ``np.random.default_rng([seed, image_id])`` — so a sample does not
    depend on which other images are read — asked as ``"Can you segment the a, b, and c?"``
    and answered ``"a [SEG], b [SEG] and c [SEG]."``; each mask is the union of every
    instance of that category in ``instances.json`` (crowd regions included).

    ``protocol="released"``: the public code's ``multi<dataset>`` evaluation — the image's
    referring sentences (stripped, lower-cased, refs in file order) chained in groups of
    6, 5, 4, 6, … (the last group takes what is left), each group one question
    ``"What is a, b and c in this image?"`` with ``"[SEG], [SEG] and [SEG]."``.
    """
    if protocol not in ("paper", "released"):
        raise ValueError(f"multi_target_referring: protocol {protocol!r} is not 'paper' or 'released'")
    refer = _open_refer(data_root, dataset, split_by, image_dir)
    skips = SkipCounter(strict=strict)
    samples = []
    split_refs = refer.ref_ids(split)
    wanted = set(split_refs)
    anns_by_image: dict[int, list[dict]] = {}
    if protocol == "paper":
        for ann in refer.anns.values():
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id in refer.image_ids(split_refs):
        record_id = f"multi-{dataset}({refer.split_by})/{split}/{protocol}/{image_id}"
        img = refer.imgs[image_id]
        h, w = int(img["height"]), int(img["width"])
        if protocol == "paper":
            by_cat: dict[int, list] = {}
            for ann in anns_by_image.get(image_id, []):
                by_cat.setdefault(ann["category_id"], []).append(ann["segmentation"])
            cats = sorted(c for c in by_cat if c in refer.cats)
            low, high = PAPER_CATEGORY_RANGE
            if len(cats) < low:
                skips.add("too_few_categories", record_id,
                          f"{refer.instances_file}: image {image_id} has {len(cats)} categories, "
                          f"the protocol asks for {low}-{high}")
                continue
            rng = np.random.default_rng([seed, int(image_id)])
            n = min(int(rng.integers(low, high + 1)), len(cats))
            picked = [cats[int(i)] for i in rng.choice(len(cats), size=n, replace=False)]
            names = [refer.cats[c] for c in picked]
            masks = [[coco_mask(by_cat[c], h, w, refer.cats[c], "object") for c in picked]]
            question = templates.strip_image_prefix(templates.MULTI_CLASS_QUESTION_TEMPLATE.format(
                class_names=templates.join_class_names(names)))
            answer = templates.join_targets([f"{name} {SEG_TOKEN}" for name in names])
            sample = Sample(source=f"multi-{dataset}", record_id=record_id,
                            image_path=refer.image_path(image_id), questions=[question],
                            answers=[answer], masks=masks, height=h, width=w,
                            extra={"category_ids": picked})
            samples.append(_with_eval_turns(sample, [question], [answer + "."]))
            continue
        sents, masks = [], []
        for ref in refer.img_to_refs[image_id]:
            if ref["ref_id"] not in wanted:
                continue
            for sent in refer.sentences(ref):
                sents.append(sent.strip().lower())
                masks.append(refer.mask(ref["ann_id"], sents[-1]))
        if not sents:
            skips.add("no_sentences", record_id,
                      f"{refer.refs_file}: the split's refs of image {image_id} have no sentence")
            continue
        questions, answers, grouped = [], [], []
        start, g = 0, 0
        while start < len(sents):
            size = RELEASED_GROUP_SIZES[g % len(RELEASED_GROUP_SIZES)]
            chunk = slice(start, start + size)
            questions.append(f"What is {templates.join_targets(sents[chunk])} in this image?")
            answers.append(templates.seg_slots(len(sents[chunk])))
            grouped.append(masks[chunk])
            start, g = start + size, g + 1
        # Upstream appends the final "." only to answers with several [SEG]s.
        eval_answers = [a + "." if len(m) > 1 else a for a, m in zip(answers, grouped)]
        sample = Sample(source=f"multi-{dataset}", record_id=record_id,
                        image_path=refer.image_path(image_id), questions=questions,
                        answers=answers, masks=grouped, height=h, width=w)
        samples.append(_with_eval_turns(sample, [validation_question(q) for q in questions],
                                        eval_answers))
    return samples, skips


def all_refer_splits(data_root: str, datasets: Iterable[str] = tuple(REFER_SPLITS),
                     reader: Callable[..., tuple[list[Sample], SkipCounter]] = refcoco,
                     **kwargs) -> dict[str, tuple[list[Sample], SkipCounter]]:
    """``{"refcoco/val": (samples, skips), ...}`` over the standard splits of each dataset."""
    out = {}
    for ds in datasets:
        split_by, splits = REFER_SPLITS[ds]
        for split in splits:
            out[f"{ds}/{split}"] = reader(data_root, ds, split, split_by=split_by, **kwargs)
    return out

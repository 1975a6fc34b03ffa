"""Referring benchmarks in the REFER layout (RefCOCO / RefCOCO+ / RefCOCOg), the multi-target
referring protocol built on them (paper Table 4), and RefCOCOm in the CRIS layout."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from m2sa_jax.data import templates
from m2sa_jax.data.benchmarks.common import (PAPER_CATEGORY_RANGE, REFER_SPLITS,
                                             RELEASED_GROUP_SIZES, with_eval_turns)
from m2sa_jax.data.conversation import validation_question
from m2sa_jax.data.refer import Refer
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.sources.common import coco_mask
from m2sa_jax.data.types import SEG_TOKEN, BadRecord, MaskRef, Sample


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
        samples.append(with_eval_turns(Sample(
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
        samples.append(with_eval_turns(Sample(
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
            samples.append(with_eval_turns(sample, [question], [answer + "."]))
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
        samples.append(with_eval_turns(sample, [validation_question(q) for q in questions],
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

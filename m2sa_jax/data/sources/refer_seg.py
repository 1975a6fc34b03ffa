"""Referring segmentation for training (RefCLEF, RefCOCO, RefCOCO+, RefCOCOg train splits).

Per image, as the public M²SA code does: all sentences of all train refs of the image are
pooled, up to ``max_questions × max_per_question`` are drawn without replacement, and they
are grouped into questions, each sentence standing for one target ([SEG]) with its ref's mask.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from m2sa_jax.data.refer import Refer
from m2sa_jax.data.sources import common
from m2sa_jax.data.types import BadRecord, Sample

# The public M²SA training default (its --refer_seg_data), in this order.
DEFAULT_REFER_SEG = ("refclef", "refcoco", "refcoco+", "refcocog")


class ReferSegSource:
    def __init__(self, refer: Refer, *, split: str = "train", max_questions: int = 3,
                 max_per_question: int = 3, expand_questions: bool = True):
        self.refer = refer
        self.name = refer.dataset
        self.split = split
        self.image_ids = refer.image_ids(refer.ref_ids(split))
        self.max_questions = max_questions
        self.max_per_question = max_per_question
        self.expand_questions = expand_questions

    def __len__(self) -> int:
        return len(self.image_ids)

    def sample(self, index: int, rng: np.random.Generator) -> Sample:
        image_id = self.image_ids[index]
        refs = [r for r in self.refer.img_to_refs.get(image_id, []) if r["split"] == self.split]
        pool = [(sent, ref["ann_id"]) for ref in refs for sent in self.refer.sentences(ref)]
        record_id = f"{self.name}:{image_id}"
        if not pool:
            raise BadRecord("no_sentences", f"{self.refer.refs_file} image {image_id}: no {self.split} sentences")
        img = self.refer.imgs[image_id]
        chosen = common.choose_targets(rng, pool, self.max_questions * self.max_per_question)
        targets = [(sent, self.refer.mask(ann_id, sent)) for sent, ann_id in chosen]
        return common.build_sample(
            rng, source=self.name, record_id=record_id, image_path=self.refer.image_path(image_id),
            targets=targets, max_questions=self.max_questions, max_per_question=self.max_per_question,
            height=int(img["height"]), width=int(img["width"]), expand=self.expand_questions)


def refer_seg_sources(root: str, names: Sequence[str] = DEFAULT_REFER_SEG, **kw) -> list[ReferSegSource]:
    """REFER sets under ``root/refer_seg`` (refcocog split by umd, the others by unc)."""
    data_root = os.path.join(root, "refer_seg")
    return [ReferSegSource(Refer(data_root, n), **kw) for n in names]

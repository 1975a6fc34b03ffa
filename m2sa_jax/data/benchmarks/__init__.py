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

from m2sa_jax.data.benchmarks.common import (MMR_SPLITS, PAPER_CATEGORY_RANGE, REFER_SPLITS,
                                             RELEASED_GROUP_SIZES, mmr, with_eval_turns)
from m2sa_jax.data.benchmarks.reason_seg import reason_seg, reason_seg_label_map
from m2sa_jax.data.benchmarks.refer import (all_refer_splits, multi_target_referring, refcoco,
                                            refcocom)

__all__ = ["MMR_SPLITS", "REFER_SPLITS", "RELEASED_GROUP_SIZES", "PAPER_CATEGORY_RANGE",
           "with_eval_turns", "mmr", "reason_seg", "reason_seg_label_map", "refcoco", "refcocom",
           "multi_target_referring", "all_refer_splits"]

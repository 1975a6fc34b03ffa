"""End-to-end evaluation: generate each answer, segment its [SEG]s, score against the targets.

The teacher-forced protocol (:mod:`m2sa_jax.evaluation.teacher_forced`) feeds the ground-truth
answer; here the model writes its own (greedy, :class:`~m2sa_jax.inference.predictor.
M2SAPredictor`'s batched generate-then-segment: each image encoded once, all [SEG]s of a batch
in one mask-decoder call).
An answer need not have as many [SEG]s as the question has targets. The k-th mask is scored
against the k-th target; with fewer masks the remaining targets get an empty prediction (a miss:
IoU 0, its pixels join the cIoU union; 1.0 if that target is empty too); with more, the extra
masks are counted and reported but match no target. How often each happens is part of the
result (``exact``, ``fewer``, ``more``, ``missing_masks``, ``extra_masks``).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from m2sa_jax.data.types import BadRecord, Sample
from m2sa_jax.inference.overlay import overlay
from m2sa_jax.inference.predictor import read_image
from m2sa_jax.evaluation.results import ResultsFile, restore_or_start, save_state
from m2sa_jax.evaluation.metrics import SegmentationMetrics

COUNTERS = ("exact", "fewer", "more", "missing_masks", "extra_masks")


def score_question(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None):
    """Per-target intersection and union of one answer.

    gt: bool [n, H, W] targets in order; pred: bool [k, H, W] the answer's masks in [SEG]
    order; ignore: bool [n, H, W] pixels not counted, or None. Returns (intersection [n],
    union [n], missing = max(n - k, 0), extra = max(k - n, 0)).
    """
    n, k = len(gt), len(pred)
    paired = np.zeros(gt.shape, bool)                   # [n, H, W]: empty where no mask came
    paired[:min(n, k)] = pred[:min(n, k)]
    counted = np.ones(gt.shape, bool) if ignore is None else ~ignore
    inter = (paired & gt & counted).reshape(n, -1).sum(1)
    union = ((paired | gt) & counted).reshape(n, -1).sum(1)
    return inter.astype(np.int64), union.astype(np.int64), max(n - k, 0), max(k - n, 0)


def _prepare(predictor, sample: Sample):
    """(rgb, gt per question, ignore per question) or BadRecord."""
    try:
        rgb = read_image(sample.image_path, predictor.max_image_pixels)
    except (ValueError, OSError) as e:
        raise BadRecord("unreadable_image", f"{sample.record_id}: {e}") from None
    h, w = rgb.shape[:2]
    gts, ignores = [], []
    ignore_refs = sample.extra.get("ignore_masks")
    for i, refs in enumerate(sample.masks):
        masks = [np.asarray(r.decode(), bool) for r in refs]
        if any(m.shape != (h, w) for m in masks):
            raise BadRecord("mask_size_mismatch", f"{sample.record_id} answer {i}: a mask's size "
                            f"differs from the image's {h}x{w}")
        gts.append(np.stack(masks) if masks else np.zeros((0, h, w), bool))
        ignores.append(None if ignore_refs is None else
                       np.stack([np.asarray(r.decode(), bool) for r in ignore_refs[i]]))
    for i, q in enumerate(sample.questions):
        try:
            predictor.prompt_ids(q)
        except ValueError as e:
            raise BadRecord("too_long", f"{sample.record_id} question {i}: {e}") from None
    return rgb, gts, ignores


def evaluate_generate(predictor, samples: Sequence[Sample], *, split: str,
                      metrics: SegmentationMetrics | None = None, skips=None,
                      progress: bool = True, results: ResultsFile | None = None,
                      save_every: int = 10, overlay_dir: str | None = None, overlays: int = 0):
    """Generate-then-segment over the samples (bare questions; the predictor adds the evaluation
    prompt). Returns (metrics, skips, stats, counters); resumable like
    ``teacher_forced.evaluate``."""
    metrics, skips, stats, counters = restore_or_start(results, metrics, skips)
    for key in COUNTERS:
        counters.setdefault(key, 0)
    done = metrics.done_records(split) | set(getattr(skips, "ids", ()))
    todo = [s for s in samples if s.record_id not in done]
    start, seconds0, drawn = time.perf_counter(), stats["seconds"], 0
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"generate {split}",
               unit="img", disable=not progress, dynamic_ncols=True)
    group = max(1, predictor.image_batch)
    for first in range(0, len(todo), group):
        prepared = []
        for sample in todo[first:first + group]:
            try:
                prepared.append((sample, *_prepare(predictor, sample)))
            except BadRecord as e:
                skips.add(e.reason, sample.record_id, str(e))
        if not prepared:
            bar.update(len(todo[first:first + group]))
            continue
        pairs = [(rgb, q) for sample, rgb, _, _ in prepared for q in sample.questions]
        answers = iter(predictor.segment_batch(pairs))
        inters, unions, record_ids, kinds = [], [], [], []
        for sample, rgb, gts, ignores in prepared:
            for i, (gt, ign) in enumerate(zip(gts, ignores)):
                res = next(answers)
                inter, union, missing, extra = score_question(gt, res.masks, ign)
                counters["exact" if not (missing or extra) else "fewer" if missing else "more"] += 1
                counters["missing_masks"] += missing
                counters["extra_masks"] += extra
                inters.append(inter)
                unions.append(union)
                record_ids += [sample.record_id] * len(gt)
                kinds += [r.kind for r in sample.masks[i]]
                stats["questions"] += 1
                stats["masks"] += len(gt)
                if overlay_dir and drawn < overlays:
                    _overlay(overlay_dir, drawn, sample, i, rgb, res, gt)
                    drawn += 1
            stats["images"] += 1
        metrics.update(split, np.concatenate(inters), np.concatenate(unions), record_ids, kinds)
        stats["batches"] += 1
        bar.update(len(todo[first:first + group]))
        if stats["batches"] % max(save_every, 1) == 0:
            stats["seconds"] = seconds0 + time.perf_counter() - start
            save_state(results, metrics, skips, stats, counters)
    bar.close()
    stats["seconds"] = seconds0 + time.perf_counter() - start
    stats["samples_per_s"] = stats["questions"] / max(stats["seconds"], 1e-9)
    save_state(results, metrics, skips, stats, counters)
    return metrics, skips, stats, counters


def _overlay(out_dir, index, sample, question, rgb, result, gt) -> None:
    """Generated masks (with the answer) | ground truth, side by side."""
    os.makedirs(out_dir, exist_ok=True)
    left = overlay(rgb, result.masks, result.labels, title=result.answer[:80] or "(empty answer)")
    right = overlay(rgb, gt, [r.label for r in sample.masks[question]], title="ground truth")
    canvas = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)),
                       (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    safe = "".join(ch if ch.isalnum() else "_" for ch in sample.record_id)[:60]
    canvas.save(os.path.join(out_dir, f"{index:03d}_{safe}_q{question}.png"))

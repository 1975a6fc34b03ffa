"""Teacher-forced evaluation (the paper's protocol, SPEC §5): the ground-truth answer with its
[SEG]s goes in, one forward reads every mask out, gIoU/cIoU accumulate per granularity.

Batches have fixed shapes (images, conversations, token bucket, targets, mask canvas) so the
jitted forward compiles once; each image is encoded once for all of its questions; every
record is counted once (the accumulator refuses repeats, and a resumed run skips the records
already in its results).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from m2sa_jax.data.pipeline import BatchShapes, Example, collate, iter_examples
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.evaluation.metrics import SegmentationMetrics
from m2sa_jax.models.m2sa import M2SA


def pack(examples: Iterable[Example], shapes: BatchShapes, skips: SkipCounter):
    """Greedy packing into (examples, batch) pairs; examples that can never fit are counted."""
    pending: list[Example] = []
    used = 0
    for ex in examples:
        why = shapes.fits(ex)
        if why is not None:
            skips.add("does_not_fit_batch", ex.record_id, f"{ex.record_id}: {why}")
            continue
        if pending and (len(pending) == shapes.images
                        or used + len(ex.conversations) > shapes.conversations):
            yield pending
            pending, used = [], 0
        pending.append(ex)
        used += len(ex.conversations)
    if pending:
        yield pending


def make_forward(model: M2SA):
    return jax.jit(lambda variables, batch: model.apply(variables, batch,
                                                        method=M2SA.forward_batch))


def evaluate(forward: Callable, variables, samples: Iterable, tokenizer, shapes: BatchShapes, *,
             split: str, sam_size: int, clip_size: int, metrics: SegmentationMetrics | None = None,
             skips: SkipCounter | None = None, overlay_dir: str | None = None,
             overlays: int = 0, progress: bool = True, total: int | None = None):
    """Runs teacher-forced evaluation; returns (metrics, skips, stats)."""
    from tqdm import tqdm

    metrics = metrics if metrics is not None else SegmentationMetrics()
    skips = skips if skips is not None else SkipCounter()
    done = metrics.done_records(split)
    todo = (s for s in samples if s.record_id not in done)
    examples = iter_examples(todo, tokenizer, skips, sam_size=sam_size, clip_size=clip_size)
    stats = dict(images=0, questions=0, masks=0, seconds=0.0)
    drawn = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"eval {split}", unit="img", disable=not progress)
    for group in pack(examples, shapes, skips):
        batch = collate(group, shapes, tokenizer.pad_token_id)
        out = forward(variables, batch)
        q, n, mh, mw = batch["gt_masks"].shape
        record_ids, kinds = [], []
        owners = []
        for ex in group:
            for k, _ in enumerate(ex.conversations):
                owners.append((ex, k))
        for c in range(q):
            ex, k = owners[c] if c < len(owners) else (None, None)
            for j in range(n):
                if ex is not None and j < len(ex.kinds[k]):
                    record_ids.append(ex.record_id)
                    kinds.append(ex.kinds[k][j])
                else:
                    record_ids.append("")
                    kinds.append("object")
        sizes = batch["original_hw"][np.repeat(batch["conv_image_index"], n)]
        valid = batch["target_valid"].reshape(-1) & np.repeat(batch["conv_valid"], n)
        metrics.update_masks(split, out["mask_logits"], batch["gt_masks"].reshape(q * n, mh, mw),
                             record_ids, kinds, valid=valid, sizes=sizes)
        stats["images"] += len(group)
        stats["questions"] += len(owners)
        stats["masks"] += int(valid.sum())
        if overlay_dir and drawn < overlays:
            drawn += _overlays(overlay_dir, group, np.asarray(out["mask_logits"]), n,
                               overlays - drawn)
        bar.update(len(group))
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    stats["samples_per_s"] = stats["questions"] / max(stats["seconds"], 1e-9)
    return metrics, skips, stats


def _overlays(out_dir: str, group: Sequence[Example], mask_logits: np.ndarray, n: int,
              budget: int) -> int:
    """Prediction | ground truth side by side for the first questions of a batch."""
    from PIL import Image

    from m2sa_jax.overlay import overlay

    os.makedirs(out_dir, exist_ok=True)
    drawn, c = 0, 0
    for ex in group:
        base = _image_of(ex)
        h, w = ex.original_hw
        for k in range(len(ex.conversations)):
            if drawn >= budget:
                return drawn
            pred = mask_logits[c * n: c * n + len(ex.kinds[k]), :h, :w] > 0
            left = overlay(base, pred, ex.labels[k], title="prediction")
            right = overlay(base, ex.masks[k], ex.labels[k], title="ground truth")
            canvas = Image.new("RGB", (left.width + right.width + 8,
                                       max(left.height, right.height)), (255, 255, 255))
            canvas.paste(left, (0, 0))
            canvas.paste(right, (left.width + 8, 0))
            safe = "".join(ch if ch.isalnum() else "_" for ch in ex.record_id)[:60]
            canvas.save(os.path.join(out_dir, f"{drawn:03d}_{safe}_q{k}.png"))
            drawn += 1
            c += 1
    return drawn


def _image_of(ex: Example) -> np.ndarray:
    """Undo the SAM normalisation of the resized image (exact up to rounding) for display."""
    from m2sa_jax.data.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD

    h, w = ex.resized_hw
    x = ex.sam_image[:h, :w] * SAM_PIXEL_STD + SAM_PIXEL_MEAN
    img = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((ex.original_hw[1], ex.original_hw[0]),
                                                  Image.BILINEAR))

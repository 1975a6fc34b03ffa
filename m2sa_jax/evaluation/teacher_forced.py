"""Teacher-forced evaluation (the paper's protocol, SPEC §5): the ground-truth answer with its
[SEG]s goes in, one forward reads every mask out, gIoU/cIoU accumulate per granularity.

Batches have fixed shapes (images, conversations, token bucket, targets, mask canvas) so the
jitted forward compiles once per token bucket; each image is encoded once for all of its
questions; the batch's leading axes are split over the local devices (data parallel, parameters
replicated). Every record is counted once: the accumulator refuses repeats, records are dealt to
hosts by :func:`host_records`, and a resumed run skips the records already in its
:class:`~m2sa_jax.evaluation.results.ResultsFile`.

:func:`split_evaluator` is the training loop's end-of-run evaluation hook.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from m2sa_jax import sharding
from m2sa_jax.data.mmr import MMRDataset, mmr_split_path, training_split
from m2sa_jax.data.pipeline import BatchShapes, Example, collate, iter_examples
from m2sa_jax.data.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import BadRecord, Sample
from m2sa_jax.evaluation.instances import InstanceSeparation, pairwise_iou
from m2sa_jax.evaluation.metrics import SegmentationMetrics
from m2sa_jax.evaluation.report import print_table
from m2sa_jax.evaluation.results import ResultsFile, restore_or_start, save_state
from m2sa_jax.inference.overlay import overlay
from m2sa_jax.models.m2sa import M2SA


def eval_sample(sample: Sample) -> Sample:
    """The sample with the benchmark reader's exact evaluation turns as its questions/answers
    (``extra["eval_questions"]`` / ``["eval_answers"]``); unchanged when it has none."""
    questions, answers = sample.extra.get("eval_questions"), sample.extra.get("eval_answers")
    if questions is None or answers is None:
        return sample
    return dataclasses.replace(sample, questions=list(questions), answers=list(answers))


def host_records(samples: Sequence[Sample], host_index: int, host_count: int) -> list[Sample]:
    """This host's share: every ``host_count``-th record from ``host_index`` (all hosts read the
    same list in the same order, so each record lands on exactly one host)."""
    if host_count < 1 or not 0 <= host_index < host_count:
        raise ValueError(f"host_index {host_index} / host_count {host_count}: need "
                         f"0 <= host_index < host_count")
    return [s for k, s in enumerate(samples) if k % host_count == host_index]


def pack(examples: Iterable[Example], shapes: BatchShapes, skips: SkipCounter):
    """Greedy packing into lists of examples that fit one batch; examples that can never fit
    are counted."""
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


def make_forward(model: M2SA, max_traces: int | None = None):
    """The jitted teacher-forced forward on a collated batch. ``max_traces``: fail (chex) if it
    is traced more often, i.e. if batches ever recompile."""
    def forward(variables, batch):
        return model.apply(variables, batch, method=M2SA.forward_batch)

    if max_traces is not None:
        import chex

        forward = chex.assert_max_traces(forward, n=max_traces)
    return jax.jit(forward)


def data_mesh():
    """A data-only mesh over the local devices (evaluation is data parallel)."""
    return sharding.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.local_devices())


def place_batch(batch: dict, mesh) -> dict:
    """The batch's leading axes split over the mesh's data axis (replicated if indivisible)."""
    if mesh is None:
        return batch
    return jax.device_put(batch, sharding.batch_sharding(batch, mesh))


def replicate(variables, mesh):
    if mesh is None:
        return variables
    return jax.device_put(variables, sharding.replicated(mesh))


def _ignore_batch(group, n, shape, ignores) -> np.ndarray | None:
    """[Q·N, Hm, Wm] pixels the metric must not count (ReasonSeg), or None if no record has any."""
    if not any(ex.record_id in ignores for ex in group):
        return None
    out = np.zeros(shape, bool)
    c = 0
    for ex in group:
        h, w = ex.original_hw
        refs = ignores.pop(ex.record_id, None)
        for k in range(len(ex.conversations)):
            for j, ref in enumerate(refs[k] if refs else ()):
                out[c * n + j, :h, :w] = np.asarray(ref.decode(), bool)
            c += 1
    return out


def evaluate(forward: Callable, variables, samples: Iterable[Sample], tokenizer,
             shapes: BatchShapes, *, split: str, sam_size: int, clip_size: int,
             metrics: SegmentationMetrics | None = None, skips: SkipCounter | None = None,
             overlay_dir: str | None = None, overlays: int = 0, progress: bool = True,
             total: int | None = None, mesh=None, results: ResultsFile | None = None,
             save_every: int = 10, read_threads: int = 0):
    """Runs teacher-forced evaluation; returns (metrics, skips, stats), with
    ``stats["instance_separation"]`` the :class:`~m2sa_jax.evaluation.instances.InstanceSeparation`
    result of the records scored (this host's).

    With ``results``, the run continues from that file (records already scored or skipped are
    not read again) and saves into it every ``save_every`` batches and at the end. ``mesh``:
    shard each batch over it (``variables`` should be replicated on it, see :func:`replicate`).
    """
    metrics, skips, stats, extra = restore_or_start(results, metrics, skips)
    instances = (InstanceSeparation.from_state_dict(extra["instance_separation"])
                 if "instance_separation" in extra else InstanceSeparation())
    done = metrics.done_records(split) | set(getattr(skips, "ids", ()))
    ignores: dict[str, list] = {}

    def todo():
        for s in samples:
            if s.record_id in done:
                continue
            if s.extra.get("ignore_masks") is not None:
                ignores[s.record_id] = s.extra["ignore_masks"]
            yield eval_sample(s)

    examples = iter_examples(todo(), tokenizer, skips, num_workers=read_threads,
                             sam_size=sam_size, clip_size=clip_size)
    drawn = 0
    start = time.perf_counter()
    seconds0 = stats["seconds"]
    bar = tqdm(total=total, initial=len(done) if total else 0, desc=f"eval {split}",
               unit="img", disable=not progress, dynamic_ncols=True)
    for group in pack(examples, shapes, skips):
        batch = collate(group, shapes, tokenizer.pad_token_id)
        out = forward(variables, place_batch(batch, mesh))
        q, n, mh, mw = batch["gt_masks"].shape
        record_ids, kinds = [], []
        owners = [(ex, k) for ex in group for k in range(len(ex.conversations))]
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
        ignore = _ignore_batch(group, n, (q * n, mh, mw), ignores)
        metrics.update_masks(split, out["mask_logits"], batch["gt_masks"].reshape(q * n, mh, mw),
                             record_ids, kinds, valid=valid, sizes=sizes, ignore=ignore)
        if ignore is None:      # (ReasonSeg's ignore regions: one target per question anyway)
            iou = pairwise_iou(out["mask_logits"].reshape(q, n, mh, mw), batch["gt_masks"],
                               batch["original_hw"][batch["conv_image_index"]])
            for c, (ex, k) in enumerate(owners):
                instances.update(iou[c], ex.labels[k], ex.kinds[k])
        stats["images"] += len(group)
        stats["questions"] += len(owners)
        stats["masks"] += int(valid.sum())
        stats["batches"] += 1
        if overlay_dir and drawn < overlays:
            drawn += _overlays(overlay_dir, group, np.asarray(out["mask_logits"]), n,
                               overlays - drawn)
        bar.update(len(group))
        if stats["batches"] % max(save_every, 1) == 0:
            stats["seconds"] = seconds0 + time.perf_counter() - start
            save_state(results, metrics, skips, stats,
                       {"instance_separation": instances.state_dict()})
    bar.close()
    stats["seconds"] = seconds0 + time.perf_counter() - start
    stats["samples_per_s"] = stats["questions"] / max(stats["seconds"], 1e-9)
    stats["instance_separation"] = instances.result()
    save_state(results, metrics, skips, stats, {"instance_separation": instances.state_dict()})
    return metrics, skips, stats


def _overlays(out_dir: str, group: Sequence[Example], mask_logits: np.ndarray, n: int,
              budget: int) -> int:
    """Prediction | ground truth side by side for the first questions of a batch."""
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
    h, w = ex.resized_hw
    x = ex.sam_image[:h, :w] * SAM_PIXEL_STD + SAM_PIXEL_MEAN
    img = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((ex.original_hw[1], ex.original_hw[0]),
                                                  Image.BILINEAR))


def held_out_samples(cfg, root: str, images: str) -> list[Sample]:
    """Every question of the run's held-out split (``eval.split``) of its MMR-format data, in
    ``data.mmr_format`` (the synthetic data is JSON); bad records are left out (the eager JSON
    reader counts them in its own skips)."""
    allow = bool(cfg.data.get("allow_no_target"))
    fmt = "json" if cfg.data.kind == "synthetic" else cfg.data.get("mmr_format") or "json"
    if fmt == "json":
        dataset = MMRDataset(mmr_split_path(root, cfg.eval.split), images, prompt="val",
                             allow_no_target=allow)
        return [dataset.sample(i, all_questions=True) for i in range(len(dataset))]
    dataset = training_split(root, images, cfg.eval.split, fmt=fmt, prompt="val",
                             allow_no_target=allow)
    samples = []
    for i in range(len(dataset)):
        try:
            samples.append(dataset.sample(i, all_questions=True))
        except BadRecord as e:
            print(f"held-out split: skipped {e}")
    return samples


def split_evaluator(cfg) -> Callable:
    """The training loop's evaluation hook: teacher-forced gIoU/cIoU of the run's model on its
    held-out split (``eval.split`` of the run's MMR-format data), overall and per granularity,
    printed as a table, with overlays when given a folder. ``train(cfg, workdir,
    evaluator=split_evaluator(cfg))``."""

    def evaluate_split(label, model, params, built, overlay_dir, progress):
        samples = held_out_samples(cfg, built.root, built.images)
        most = max((len(s.questions) for s in samples), default=1)
        ipb = cfg.eval.images_per_batch
        shapes = BatchShapes(images=ipb, conversations=ipb * most,
                             token_buckets=tuple(cfg.data.token_buckets),
                             max_targets=cfg.data.max_targets, mask_hw=tuple(cfg.data.mask_hw))
        config = built.config
        metrics, skips, stats = evaluate(
            make_forward(model), {"params": params}, samples, built.tokenizer, shapes,
            split=cfg.eval.split, sam_size=config.sam.img_size,
            clip_size=config.llava.vision.image_size, overlay_dir=overlay_dir,
            overlays=cfg.eval.overlays, progress=progress, total=len(samples))
        result = metrics.result()[cfg.eval.split]
        instances = stats.pop("instance_separation")
        print_table(result, title=f"{label} model, {cfg.eval.split} split (teacher-forced)",
                    instances=instances)
        if skips.total:
            print(f"skipped records: {dict(skips.counts)}")
        if overlay_dir:
            print(f"overlays: {os.path.abspath(overlay_dir)}")
        return dict(metrics=result, instance_separation=instances, stats=stats,
                    skipped=dict(skips.counts))

    return evaluate_split

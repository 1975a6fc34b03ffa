"""``eval.py``: gIoU / cIoU of any model on MMR or a referring benchmark, under either protocol.

:func:`run` is the whole evaluation: the model (any source the resolver takes), the benchmark
(the readers of :mod:`m2sa_jax.data.benchmarks`), this host's share of its records, the
protocol (teacher-forced in :mod:`.teacher_forced`, generate-then-segment in
:mod:`.generate_eval`), the resumable results file, the table and the metrics JSON.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax

from m2sa_jax.checkpoints.resolve import describe_kinds, resolve
from m2sa_jax.data import benchmarks, mixed, synthetic
from m2sa_jax.data.pipeline import BatchShapes
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import Sample
from m2sa_jax.evaluation import generate_eval
from m2sa_jax.evaluation.report import print_summary
from m2sa_jax.evaluation.results import ResultsFile
from m2sa_jax.evaluation.teacher_forced import (data_mesh, evaluate, host_records, make_forward,
                                                replicate)
from m2sa_jax.inference.predictor import M2SAPredictor
from m2sa_jax.models.m2sa import M2SA
from m2sa_jax.quantization import quantize_model

DATASETS = ("mmr", "reasonseg", "refcoco", "refcoco+", "refcocog", "multi_refcoco",
            "multi_refcoco+", "multi_refcocog", "refcocom")


def load_model(cfg):
    """The model of ``eval.checkpoint`` (a :class:`~m2sa_jax.checkpoints.resolve.LoadedModel`:
    config, params, tokenizer, description, quantization) — any model source
    (:func:`m2sa_jax.checkpoints.resolve.resolve`: a converted directory, a LISA/M²SA PyTorch
    folder, a training workdir or ``WORKDIR@STEP``, a Hugging Face id in the local cache). With
    no checkpoint given, a synthetic config evaluates its own training workdir (``workdir``).
    ``eval.dtype`` and ``eval.quantize`` (``"int8"`` / ``"int4"``; ``eval.quantize_vision``)
    choose how it is held."""
    path = cfg.eval.checkpoint or (cfg.workdir if cfg.data.kind == "synthetic" else "")
    if not path:
        raise ValueError("no model to evaluate: pass --config.eval.checkpoint=SOURCE ("
                         + describe_kinds() + ")")
    return resolve(path, vision_tower=cfg.eval.vision_tower or None,
                   dtype=cfg.eval.dtype or "float32", quantize=cfg.eval.quantize or None,
                   quantize_vision=bool(cfg.eval.quantize_vision))


def load_samples(cfg) -> tuple[list[Sample], SkipCounter]:
    """The benchmark ``eval.dataset`` / ``eval.split`` through the readers of
    :mod:`m2sa_jax.data.benchmarks`."""
    e, name, split = cfg.eval, cfg.eval.dataset, cfg.eval.split
    if name not in DATASETS:
        raise ValueError(f"eval.dataset={name!r} is not one of {DATASETS}")

    def need(key):
        if not e.get(key):
            raise ValueError(f"eval.dataset={name} needs --config.eval.{key}=PATH")
        return e[key]

    if name == "mmr":
        root, images, fmt = e.get("mmr_root"), e.get("image_root"), "json"
        if not root and cfg.data.kind == "synthetic":
            root, _ = synthetic.prepare(cfg.data)
            images = images or os.path.join(root, "images")
        elif not root:                  # the training data's MMR (mixture: under data.root)
            root, data_images = mixed.mmr_roots(cfg.data)
            images, fmt = images or data_images, cfg.data.get("mmr_format") or "json"
        if not root:
            raise ValueError("eval.dataset=mmr needs --config.eval.mmr_root=DIR (the MMR_*.json "
                             "files) and --config.eval.image_root=DIR (the COCO images), or a "
                             "config whose data.root (mixture) or data.mmr_root says where MMR is")
        if fmt == "json":
            images = images or need("image_root")
        return benchmarks.mmr(root, images, split, fmt=fmt,
                              allow_no_target=bool(cfg.data.get("allow_no_target")))
    if name == "reasonseg":
        return benchmarks.reason_seg(os.path.join(need("reasonseg_root"), split))
    if name == "refcocom":
        return benchmarks.refcocom(need("refcocom_json"), need("refcocom_masks"),
                                   need("refcocom_images"))
    dataset = name.removeprefix("multi_")
    split_by = benchmarks.REFER_SPLITS[dataset][0]
    image_dir = e.get("refer_image_dir") or None
    if name.startswith("multi_"):
        return benchmarks.multi_target_referring(
            need("refer_root"), dataset, split, protocol=e.get("multi_target_protocol", "paper"),
            seed=int(e.get("seed", 0)), split_by=split_by, image_dir=image_dir)
    return benchmarks.refcoco(need("refer_root"), dataset, split, split_by=split_by,
                              image_dir=image_dir)


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def eval_shapes(cfg, samples: Sequence[Sample], devices: int) -> BatchShapes:
    """Static batch shapes: images and conversations per batch in multiples of the device count,
    the mask canvas the largest image rounded up to 64 px."""
    e = cfg.eval
    images = _round_up(int(e.images_per_batch), devices)
    most = max((len(s.questions) for s in samples), default=1)
    convs = _round_up(int(e.get("conversations_per_batch") or images * most), devices)
    targets = int(e.get("max_targets") or 0) or max(
        [cfg.data.max_targets] + [len(m) for s in samples for m in s.masks])
    h = max((s.height for s in samples), default=64)
    w = max((s.width for s in samples), default=64)
    buckets = tuple(e.get("token_buckets") or cfg.data.token_buckets)
    return BatchShapes(images=images, conversations=convs, token_buckets=buckets,
                       max_targets=targets, mask_hw=(_round_up(h, 64), _round_up(w, 64)))


def run(cfg, workdir: str, *, host_index: int | None = None, host_count: int | None = None,
        progress: bool = True) -> dict:
    """The evaluation of ``eval.py``: returns the summary it also writes as JSON."""
    e = cfg.eval
    protocol = e.protocol
    if protocol not in ("teacher_forced", "generate"):
        raise ValueError(f"eval.protocol={protocol!r}: expected teacher_forced or generate")
    host_index = jax.process_index() if host_index is None else host_index
    host_count = jax.process_count() if host_count is None else host_count
    os.makedirs(workdir, exist_ok=True)
    model = load_model(cfg)
    config, params, tokenizer, source = model.config, model.params, model.tokenizer, \
        model.description
    samples, reader_skips = load_samples(cfg)
    all_records = len(samples)
    samples = host_records(samples, host_index, host_count)
    tag = f"{e.dataset.replace('+', 'plus')}_{e.split}_{protocol}"
    host_tag = f"_host{host_index}of{host_count}" if host_count > 1 else ""
    results = ResultsFile(os.path.join(workdir, f"results_{tag}{host_tag}.json"),
                          key=dict(dataset=e.dataset, split=e.split, protocol=protocol,
                                   checkpoint=source, host=[host_index, host_count]))
    overlay_dir = os.path.join(workdir, f"overlays_{tag}") if e.get("overlays") else None
    print(f"evaluating {source} on {e.dataset} {e.split} ({protocol}): {len(samples)} of "
          f"{all_records} records on host {host_index}/{host_count}")
    extra = {}
    if protocol == "teacher_forced":
        mesh = data_mesh()
        shapes = eval_shapes(cfg, samples, mesh.size)
        forward = make_forward(quantize_model(M2SA(config), model.quantization))
        metrics, skips, stats = evaluate(
            forward, replicate({"params": params}, mesh), samples, tokenizer, shapes,
            split=e.split, sam_size=config.sam.img_size,
            clip_size=config.llava.vision.image_size, overlay_dir=overlay_dir,
            overlays=int(e.get("overlays") or 0), progress=progress, total=len(samples),
            mesh=mesh, results=results, save_every=int(e.get("save_every") or 10),
            read_threads=int(e.get("read_threads") or 0))
    else:
        predictor = M2SAPredictor(config, params, tokenizer, quantization=model.quantization,
                                  max_new_tokens=int(e.get("max_new_tokens") or 64),
                                  image_batch=int(e.images_per_batch))
        metrics, skips, stats, extra = generate_eval.evaluate_generate(
            predictor, samples, split=e.split, progress=progress, results=results,
            save_every=int(e.get("save_every") or 10), overlay_dir=overlay_dir,
            overlays=int(e.get("overlays") or 0))
    if host_count > 1 and jax.process_count() > 1:
        metrics = metrics.all_hosts()
    result = metrics.result().get(e.split, {})
    skipped = dict(reader_skips.counts)
    for reason, n in skips.counts.items():
        skipped[reason] = skipped.get(reason, 0) + n
    examples = {r: [list(x) for x in reader_skips.examples.get(r, []) + skips.examples.get(r, [])][:5]
                for r in skipped}
    summary = dict(dataset=e.dataset, split=e.split, protocol=protocol, checkpoint=source,
                   host=dict(index=host_index, count=host_count), metrics=result,
                   counts=dict(images=stats["images"], questions=stats["questions"],
                               masks=stats["masks"]),
                   skipped=skipped, skipped_examples=examples,
                   samples_per_s=stats["questions"] / max(stats["seconds"], 1e-9),
                   seconds=stats["seconds"], **({"generate": extra} if extra else {}),
                   **({"instance_separation": stats["instance_separation"]}
                      if "instance_separation" in stats else {}))
    print_summary(summary)
    path = os.path.join(workdir, f"metrics_{tag}{host_tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    summary["metrics_file"] = path
    print(f"metrics: {path}")
    return summary

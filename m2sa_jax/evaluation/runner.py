"""Teacher-forced evaluation (the paper's protocol, SPEC §5): the ground-truth answer with its
[SEG]s goes in, one forward reads every mask out, gIoU/cIoU accumulate per granularity.

Batches have fixed shapes (images, conversations, token bucket, targets, mask canvas) so the
jitted forward compiles once per token bucket; each image is encoded once for all of its
questions; the batch's leading axes are split over the local devices (data parallel, parameters
replicated). Every record is counted once: the accumulator refuses repeats, records are dealt to
hosts by :func:`host_records`, and a resumed run skips the records already in its
:class:`ResultsFile` (the accumulator and the skip list, saved atomically every few batches).

:func:`run` is the whole evaluation behind ``eval.py``: checkpoint, benchmark, protocol
(teacher-forced here, generate-then-segment in :mod:`m2sa_jax.evaluation.generate_eval`),
results file, table and metrics JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from m2sa_jax.checkpoints.resolve import describe_kinds, resolve
from m2sa_jax.data.pipeline import BatchShapes, Example, collate, iter_examples
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import Sample
from m2sa_jax.evaluation.instances import InstanceSeparation, pairwise_iou
from m2sa_jax.evaluation.metrics import SegmentationMetrics
from m2sa_jax.evaluation.report import print_summary
from m2sa_jax.models.m2sa import M2SA

RESULTS_VERSION = 1
DATASETS = ("mmr", "reasonseg", "refcoco", "refcoco+", "refcocog", "multi_refcoco",
            "multi_refcoco+", "multi_refcocog", "refcocom")


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


@dataclasses.dataclass
class RecordingSkips(SkipCounter):
    """A SkipCounter that also keeps every skipped record id (so a resumed run skips them
    without counting them again)."""

    ids: list = dataclasses.field(default_factory=list)

    def add(self, reason: str, record_id: str, message: str) -> None:
        super().add(reason, record_id, message)
        with self._lock:
            self.ids.append(record_id)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "ids": list(self.ids),
                "examples": {k: [list(e) for e in v] for k, v in self.examples.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RecordingSkips":
        s = cls()
        s.counts.update(state["counts"])
        s.ids = list(state["ids"])
        for k, v in state["examples"].items():
            s.examples[k] = [tuple(e) for e in v]
        return s


class ResultsFile:
    """The state of an evaluation in progress, one JSON file replaced atomically (write to a
    temporary file, fsync, rename): a run killed at any moment leaves the last complete save.

    ``key`` names the run (dataset, split, protocol, checkpoint); resuming from a file written
    for another key is refused.
    """

    def __init__(self, path: str, key: dict):
        self.path = os.path.abspath(path)
        self.key = dict(key)

    def load(self) -> dict | None:
        if not os.path.isfile(self.path):
            return None
        with open(self.path) as f:
            state = json.load(f)
        if state.get("version") != RESULTS_VERSION or state.get("key") != self.key:
            raise ValueError(
                f"{self.path}: results of another evaluation (key {state.get('key')}, this run "
                f"is {self.key}); delete the file or evaluate into another --workdir")
        return state

    def save(self, state: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(state, version=RESULTS_VERSION, key=self.key), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


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
    from m2sa_jax.sharding import make_mesh

    return make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.local_devices())


def place_batch(batch: dict, mesh) -> dict:
    """The batch's leading axes split over the mesh's data axis (replicated if indivisible)."""
    if mesh is None:
        return batch
    from m2sa_jax.sharding import batch_sharding

    return jax.device_put(batch, batch_sharding(batch, mesh))


def replicate(variables, mesh):
    if mesh is None:
        return variables
    from m2sa_jax.sharding import replicated

    return jax.device_put(variables, replicated(mesh))


def _empty_stats() -> dict:
    return dict(images=0, questions=0, masks=0, seconds=0.0, batches=0)


def restore_or_start(results: ResultsFile | None, metrics, skips):
    """(metrics, skips, stats, extra) from the results file if it holds a run, else fresh."""
    state = results.load() if results is not None else None
    if state is None:
        return (metrics if metrics is not None else SegmentationMetrics(),
                skips if skips is not None else RecordingSkips(), _empty_stats(), {})
    return (SegmentationMetrics.from_state_dict(state["metrics"]),
            RecordingSkips.from_state_dict(state["skips"]), dict(state["stats"]),
            dict(state.get("extra", {})))


def save_state(results: ResultsFile | None, metrics, skips, stats, extra=None) -> None:
    if results is None:
        return
    results.save({"metrics": metrics.state_dict(), "stats": stats, "extra": extra or {},
                  "skips": skips.state_dict() if isinstance(skips, RecordingSkips) else
                  RecordingSkips(counts=skips.counts).state_dict()})


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
    from tqdm import tqdm

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


# ------------------------------------------------------------------------ eval.py's run


def load_model(cfg):
    """(M2SAConfig, params, tokenizer, description) of ``eval.checkpoint`` — any model source
    (:func:`m2sa_jax.checkpoints.resolve.resolve`: a converted directory, a LISA/M²SA PyTorch
    folder, a training workdir or ``WORKDIR@STEP``, a Hugging Face id in the local cache). With
    no checkpoint given, a synthetic config evaluates its own training workdir (``workdir``)."""
    path = cfg.eval.checkpoint or (cfg.workdir if cfg.data.kind == "synthetic" else "")
    if not path:
        raise ValueError("no model to evaluate: pass --config.eval.checkpoint=SOURCE ("
                         + describe_kinds() + ")")
    model = resolve(path, vision_tower=cfg.eval.get("vision_tower") or None,
                    dtype=cfg.eval.get("dtype") or "float32")
    return model.config, model.params, model.tokenizer, model.description


def load_samples(cfg) -> tuple[list[Sample], SkipCounter]:
    """The benchmark ``eval.dataset`` / ``eval.split`` through the readers of
    :mod:`m2sa_jax.data.benchmarks`."""
    from m2sa_jax.data import benchmarks

    e, name, split = cfg.eval, cfg.eval.dataset, cfg.eval.split
    if name not in DATASETS:
        raise ValueError(f"eval.dataset={name!r} is not one of {DATASETS}")

    def need(key):
        if not e.get(key):
            raise ValueError(f"eval.dataset={name} needs --config.eval.{key}=PATH")
        return e[key]

    if name == "mmr":
        root, images = e.get("mmr_root"), e.get("image_root")
        if not root and cfg.data.kind == "synthetic":
            from m2sa_jax.training import setup

            root, _ = setup.synthetic_data(cfg)
            images = images or os.path.join(root, "images")
        if not root:
            raise ValueError("eval.dataset=mmr needs --config.eval.mmr_root=DIR (the MMR_*.json "
                             "files) and --config.eval.image_root=DIR (the COCO images)")
        return benchmarks.mmr(root, images or need("image_root"), split)
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
    config, params, tokenizer, source = load_model(cfg)
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
        forward = make_forward(M2SA(config))
        metrics, skips, stats = evaluate(
            forward, replicate({"params": params}, mesh), samples, tokenizer, shapes,
            split=e.split, sam_size=config.sam.img_size,
            clip_size=config.llava.vision.image_size, overlay_dir=overlay_dir,
            overlays=int(e.get("overlays") or 0), progress=progress, total=len(samples),
            mesh=mesh, results=results, save_every=int(e.get("save_every") or 10),
            read_threads=int(e.get("read_threads") or 0))
    else:
        from m2sa_jax.evaluation import generate_eval
        from m2sa_jax.pipeline import M2SAPredictor

        predictor = M2SAPredictor(config, params, tokenizer,
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


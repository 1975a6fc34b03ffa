"""eval.py and the evaluators: command line on fixture MMR files (converted tiny M²SA) and
on the synthetic val split (a tiny trained workdir), teacher-forced metrics against a direct
per-question computation, no recompilation across batches, resume after a kill, 2-host
coverage, and the generate protocol's miss / extra accounting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import m2sa_jax
from checkpoints_convert.__main__ import main as convert_main
from m2sa_jax import config_file
from m2sa_jax.data import benchmarks
from m2sa_jax.data.pipeline import BatchShapes, collate, prepare_example
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import MaskRef
from m2sa_jax.evaluation import generate_eval, run
from m2sa_jax.evaluation import teacher_forced as tf
from m2sa_jax.evaluation.results import ResultsFile
from m2sa_jax.evaluation.metrics import SegmentationMetrics, iou_from_counts
from m2sa_jax.inference.predictor import SegmentResult
from m2sa_jax.checkpoints import runs
from m2sa_jax.training import loop
from tests.support.m2sa_helpers import write_tiny_m2sa_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(ROOT, "configs", "synthetic.py")
SIZES = [(48, 64), (64, 40), (56, 56), (40, 72), (64, 64)]


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def _ann(image_id, name, mask):
    return {"bbox": [0, 0, 1, 1], "segmentation": _rle(mask), "image_id": image_id,
            "category_name": name, "category_id": 1, "sorted_category_id": 1}


def write_mmr_fixture(root, split="val"):
    """MMR_<split>.json (SPEC §6 layout) with 5 records, 1–3 questions of 1–3 targets each
    (objects and parts), one record whose answer has fewer {seg} than masks, one whose image
    is missing; JPEG images under root/coco."""
    rng = np.random.default_rng(0)
    coco = os.path.join(root, "coco")
    os.makedirs(coco, exist_ok=True)
    records = []
    names = ["dog", "dog:ear", "car_(automobile)", "car_(automobile):wheel", "cup:handle"]
    for k, (h, w) in enumerate(SIZES):
        file_name = f"{k + 1:012d}.jpg"
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(coco, file_name), quality=95)
        questions, answers, texts = [], [], []
        for q in range(1 + k % 3):
            n = 1 + (k + q) % 3
            masks = [rng.random((h, w)) < 0.4 for _ in range(n)]
            if k == 2 and q == 0:
                masks[0][:] = False                         # an empty target
            picked = [names[(k + q + j) % len(names)] for j in range(n)]
            questions.append(f"Which part is number {q} of picture {k}?")
            answers.append([_ann(k + 1, nm, m) for nm, m in zip(picked, masks)])
            texts.append(" and ".join(f"the {nm.split(':')[-1]} {{seg}}" for nm in picked))
        records.append({"file_name": file_name, "height": h, "width": w, "image_id": k + 1,
                        "not_exhaustive_category_ids": [], "neg_category_ids": [],
                        "coco_url": "http://example/x.jpg", "questions": questions,
                        "answers": answers, "text_answers": texts,
                        "raw_answers": [t.replace("{seg}", "") for t in texts]})
    bad = json.loads(json.dumps(records[0]))
    bad["image_id"], bad["text_answers"] = 90, ["only one {seg}"] * len(bad["questions"])
    bad["answers"] = [a + a for a in bad["answers"]]
    missing = json.loads(json.dumps(records[1]))
    missing["image_id"], missing["file_name"] = 91, "000000000404.jpg"
    with open(os.path.join(root, benchmarks.MMR_SPLITS[split]), "w") as f:
        json.dump(records + [bad, missing], f)
    return coco


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    src, dst = tmp / "hf", tmp / "converted"
    write_tiny_m2sa_folder(str(src), "m2sa", sam_depth=2, global_attn=(1,), img_size=128)
    assert convert_main(["m2sa", "--src", str(src), "--dst", str(dst)]) == 0
    coco = write_mmr_fixture(str(tmp))

    predictor = m2sa_jax.load(str(dst))
    samples, reader_skips = benchmarks.mmr(str(tmp), coco, "val")
    return dict(tmp=tmp, dst=dst, coco=coco, predictor=predictor, samples=samples,
                reader_skips=reader_skips)


def _cfg(fixture, **eval_overrides):
    cfg = config_file.load(SYNTHETIC)
    cfg.data.kind = "mmr"
    cfg.eval.checkpoint = str(fixture["dst"])
    cfg.eval.mmr_root = str(fixture["tmp"])
    cfg.eval.image_root = fixture["coco"]
    cfg.eval.images_per_batch = 2
    cfg.eval.overlays = 0
    cfg.eval.read_threads = 0
    cfg.eval.token_buckets = (192,)
    cfg.eval.update(eval_overrides)
    return cfg


def _direct_metrics(fixture) -> SegmentationMetrics:
    """Each question alone (a batch of one image and one question) through the predictor's
    teacher-forced forward, IoU counted in NumPy on the image's own extent."""
    pred = fixture["predictor"]
    tok = pred.tokenizer
    inter, union, ids, kinds = [], [], [], []
    for s in fixture["samples"]:
        ex = prepare_example(tf.eval_sample(s), tok, sam_size=pred.config.sam.img_size,
                             clip_size=pred.config.llava.vision.image_size)
        h, w = ex.original_hw
        for k in range(len(ex.conversations)):
            one = dataclass_replace_one(ex, k)
            n = len(ex.masks[k])
            batch = collate([one], BatchShapes(images=1, conversations=1, token_buckets=(192,),
                                               max_targets=3, mask_hw=(64, 72)), tok.pad_token_id)
            logits = np.asarray(pred.teacher_forced(batch)["mask_logits"])[:n, :h, :w]
            p, g = logits > 0, ex.masks[k]
            inter += list((p & g).reshape(n, -1).sum(1))
            union += list((p | g).reshape(n, -1).sum(1))
            ids += [s.record_id] * n
            kinds += ex.kinds[k]
    m = SegmentationMetrics()
    m.update("val", np.array(inter), np.array(union), ids, kinds)
    return m, np.array(inter), np.array(union)


def dataclass_replace_one(ex, k):
    return dataclasses.replace(ex, conversations=[ex.conversations[k]], masks=[ex.masks[k]],
                               labels=[ex.labels[k]], kinds=[ex.kinds[k]],
                               questions=[ex.questions[k]])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.torch
def test_eval_cli_on_fixture_mmr_equals_direct_computation(fixture):
    out = fixture["tmp"] / "cli_out"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--config",
           os.path.join(ROOT, "configs", "synthetic.py"), "--config.data.kind=mmr",
           f"--config.eval.checkpoint={fixture['dst']}", "--config.eval.dataset=mmr",
           "--config.eval.split=val", f"--config.eval.mmr_root={fixture['tmp']}",
           f"--config.eval.image_root={fixture['coco']}", "--config.eval.images_per_batch=2",
           "--config.eval.overlays=1", "--config.eval.token_buckets=(192,)",
           f"--workdir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert "gIoU" in proc.stdout and "cIoU" in proc.stdout
    summary = json.loads((out / "metrics_mmr_val_teacher_forced.json").read_text())
    assert summary["skipped"] == {"seg_count": 1, "missing_image": 1}
    samples = fixture["samples"]
    assert summary["counts"] == {"images": len(samples),
                                 "questions": sum(len(s.questions) for s in samples),
                                 "masks": sum(s.num_targets for s in samples)}
    assert summary["samples_per_s"] > 0
    assert len(os.listdir(out / "overlays_mmr_val_teacher_forced")) == 1

    direct, inter, union = _direct_metrics(fixture)
    want = direct.result()["val"]
    got = summary["metrics"]
    for group in ("all", "object", "part"):
        for key in ("masks", "intersection", "union", "records"):
            assert got[group][key] == want[group][key], (group, key)
        assert got[group]["giou"] == pytest.approx(want[group]["giou"], abs=1e-12)
        assert got[group]["ciou"] == pytest.approx(want[group]["ciou"], abs=1e-12)
    assert got["all"]["giou"] == pytest.approx(iou_from_counts(inter, union).mean(), abs=1e-12)
    assert got["all"]["ciou"] == pytest.approx(inter.sum() / union.sum(), abs=1e-12)
    assert 0 < got["all"]["ciou"] < 1


def _same_results(a: SegmentationMetrics, b: SegmentationMetrics) -> None:
    """Equal pixel counts, masks and records; gIoU / cIoU equal up to the order of summation."""
    ra, rb = a.result(), b.result()
    assert ra.keys() == rb.keys()
    for split in ra:
        assert ra[split].keys() == rb[split].keys()
        for group, x in ra[split].items():
            y = rb[split][group]
            for key in x:
                if isinstance(x[key], float):
                    assert x[key] == pytest.approx(y[key], rel=1e-12), (group, key)
                else:
                    assert x[key] == y[key], (group, key)
    assert a.done_records("val") == b.done_records("val")


@pytest.mark.slow
@pytest.mark.torch
def test_batches_compile_once_and_resume_and_hosts_match(fixture, tmp_path):
    pred = fixture["predictor"]
    samples = fixture["samples"]
    cfg = _cfg(fixture)
    shapes = run.eval_shapes(cfg, samples, jax.local_device_count())
    kw = dict(split="val", sam_size=pred.config.sam.img_size,
              clip_size=pred.config.llava.vision.image_size, progress=False)
    mesh = tf.data_mesh()
    variables = tf.replicate({"params": pred.params}, mesh)
    forward = tf.make_forward(pred.model, max_traces=1)    # a retrace would raise
    full, skips, stats = tf.evaluate(forward, variables, samples, pred.tokenizer, shapes,
                                         mesh=mesh, **kw)
    assert stats["batches"] >= 3 and not skips.counts
    # Different token lengths and image sizes went through one compiled forward.
    assert forward._cache_size() == 1

    # Killed after two records, resumed: the same totals, each record once.
    results = ResultsFile(str(tmp_path / "results.json"), key={"run": "test"})

    def killed():
        yield from samples[:3]
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        tf.evaluate(forward, variables, killed(), pred.tokenizer, shapes, mesh=mesh,
                    results=results, save_every=1, **kw)
    partial = SegmentationMetrics.from_state_dict(results.load()["metrics"])
    assert 0 < len(partial.done_records("val")) < len(samples)
    resumed, _, rstats = tf.evaluate(forward, variables, samples, pred.tokenizer, shapes,
                                     mesh=mesh, results=results, save_every=1, **kw)
    _same_results(resumed, full)
    assert (rstats["images"], rstats["questions"], rstats["masks"]) == (
        stats["images"], stats["questions"], stats["masks"])
    assert rstats["instance_separation"] == stats["instance_separation"]   # kept across the kill
    with pytest.raises(ValueError, match="another evaluation"):
        ResultsFile(results.path, key={"run": "other"}).load()

    # Two simulated hosts: disjoint shares covering every record, merged = one host.
    shares = [tf.host_records(samples, i, 2) for i in range(2)]
    ids = [s.record_id for share in shares for s in share]
    assert sorted(ids) == sorted(s.record_id for s in samples) and len(set(ids)) == len(ids)
    parts = [tf.evaluate(forward, variables, share, pred.tokenizer, shapes, mesh=mesh,
                             **kw)[0] for share in shares]
    merged = SegmentationMetrics.merged(parts)
    _same_results(merged, full)
    with pytest.raises(ValueError, match="exactly one host"):
        SegmentationMetrics.merged([parts[0], parts[0]])

    # ReasonSeg-style ignore regions: a record whose targets are ignored everywhere scores
    # union 0 (IoU 1.0) on each of its masks and drops out of the cIoU sums.

    first = samples[0]
    h, w = first.height, first.width
    everywhere = MaskRef(lambda: np.ones((h, w), bool), h, w, "ignore")
    ignored = dataclasses.replace(first, extra=dict(
        first.extra, ignore_masks=[[everywhere] * len(m) for m in first.masks]))
    alone = tf.evaluate(forward, variables, samples[:1], pred.tokenizer, shapes, mesh=mesh,
                            **kw)[0].result()["val"]["all"]
    got = tf.evaluate(forward, variables, [ignored] + samples[1:], pred.tokenizer, shapes,
                          mesh=mesh, **kw)[0].result()["val"]["all"]
    want = full.result()["val"]["all"]
    assert got["intersection"] == want["intersection"] - alone["intersection"]
    assert got["union"] == want["union"] - alone["union"]
    assert got["empty_union_masks"] == want["empty_union_masks"] + first.num_targets - \
        alone["empty_union_masks"]


def test_generate_protocol_counts_misses_and_extras():
    gt = np.zeros((3, 4, 5), bool)
    gt[0, :2] = True                  # 10 px
    gt[1, 2:, :2] = True              # 4 px
    gt[2, 3, 4] = True                # 1 px
    pred = np.zeros((1, 4, 5), bool)
    pred[0, :1] = True                # 5 px inside target 0
    inter, union, missing, extra = generate_eval.score_question(gt, pred)
    np.testing.assert_array_equal(inter, [5, 0, 0])
    np.testing.assert_array_equal(union, [10, 4, 1])      # misses: the target's pixels alone
    assert (missing, extra) == (2, 0)
    more = np.concatenate([pred, np.ones((2, 4, 5), bool), np.ones((1, 4, 5), bool)])
    inter, union, missing, extra = generate_eval.score_question(gt, more)
    np.testing.assert_array_equal(inter, [5, 4, 1])
    np.testing.assert_array_equal(union, [10, 20, 20])
    assert (missing, extra) == (0, 1)
    ignore = np.zeros_like(gt)
    ignore[:, 0] = True
    inter, union, _, _ = generate_eval.score_question(gt, pred, ignore)
    np.testing.assert_array_equal(inter, [0, 0, 0])
    np.testing.assert_array_equal(union, [5, 4, 1])
    empty = np.zeros((1, 4, 5), bool)
    _, union, missing, _ = generate_eval.score_question(empty, pred[:0])
    assert union[0] == 0 and missing == 1 and iou_from_counts([0], union)[0] == 1.0


class _ScriptedPredictor:
    """Stands in for the generator only: answers with a fixed number of masks per question, so
    the accounting around it (scoring, counters, metrics, resume state) is what is tested."""

    image_batch = 2
    max_image_pixels = 10 ** 8

    def __init__(self, masks_per_question):
        self.plan = list(masks_per_question)

    def prompt_ids(self, question):
        return [1]

    def segment_batch(self, pairs):
        out = []
        for rgb, q in pairs:
            k = self.plan.pop(0)
            h, w = rgb.shape[:2]
            out.append(SegmentResult(q, " ".join(["x [SEG]"] * k), np.ones((k, h, w), bool),
                                     ["x"] * k))
        return out


@pytest.mark.torch
def test_generate_eval_accounting_on_fixture_records(fixture, tmp_path):
    samples = fixture["samples"]
    targets = [len(m) for s in samples for m in s.masks]
    plan = [max(n - 1, 0) if i % 3 == 0 else n + 2 if i % 3 == 1 else n
            for i, n in enumerate(targets)]
    results = ResultsFile(str(tmp_path / "gen.json"), key={"run": "gen"})
    metrics, skips, stats, counters = generate_eval.evaluate_generate(
        _ScriptedPredictor(plan), samples, split="val", progress=False, results=results)
    fewer = sum(p < n for p, n in zip(plan, targets))
    more = sum(p > n for p, n in zip(plan, targets))
    assert counters == {"exact": len(plan) - fewer - more, "fewer": fewer, "more": more,
                        "missing_masks": sum(max(n - p, 0) for p, n in zip(plan, targets)),
                        "extra_masks": sum(max(p - n, 0) for p, n in zip(plan, targets)),
                        "misses": sum(p == 0 < n for p, n in zip(plan, targets)),
                        "no_target_questions": 0, "false_positives": 0}
    assert counters["misses"] > 0
    assert stats["questions"] == len(plan) and stats["masks"] == sum(targets)
    # Full-image predictions: IoU = |gt| / |image|, misses 0 (1 for an empty target).
    want = []
    q = 0
    for s in samples:
        for refs in s.masks:
            for j, ref in enumerate(refs):
                g = ref.decode()
                hit = j < plan[q]
                u = g.size if hit else g.sum()
                want.append(1.0 if u == 0 else (g.sum() if hit else 0) / (u + 1e-5))
            q += 1
    assert metrics.result()["val"]["all"]["giou"] == pytest.approx(np.mean(want), abs=1e-12)
    # Nothing left to do on a rerun: the counters come back from the results file unchanged.
    _, _, _, again = generate_eval.evaluate_generate(
        _ScriptedPredictor([]), samples, split="val", progress=False, results=results)
    assert again == counters


def test_generate_counts_misses_and_false_positives(fixture, tmp_path):
    """A question with targets answered without [SEG] is a miss; a question without a target
    answered with masks a false positive; both land in the counters (the metrics JSON's
    ``generate``), and a no-target question adds nothing to gIoU / cIoU."""
    first = fixture["samples"][0]
    none = dataclasses.replace(first, record_id="no target", masks=[[], []],
                               questions=["Is there a giraffe?", "Is there a zebra?"],
                               answers=["No.", "No."], extra={})
    targeted = dataclasses.replace(first, questions=first.questions[:1], masks=first.masks[:1],
                                   answers=first.answers[:1])
    n = len(targeted.masks[0])
    results = ResultsFile(str(tmp_path / "none.json"), key={"run": "no target"})
    metrics, _, stats, counters = generate_eval.evaluate_generate(
        _ScriptedPredictor([0, 0, 2]), [targeted, none], split="val", progress=False,
        results=results)
    assert counters == {"exact": 1, "fewer": 1, "more": 1, "missing_masks": n,
                        "extra_masks": 2, "misses": 1, "no_target_questions": 2,
                        "false_positives": 1}
    assert stats["questions"] == 3 and stats["masks"] == n
    assert metrics.result()["val"]["all"]["masks"] == n and metrics.result()["val"]["all"]["giou"] == 0
    # resumed, the maskless record is done too: nothing is asked again, nothing counted twice
    _, _, _, again = generate_eval.evaluate_generate(
        _ScriptedPredictor([]), [targeted, none], split="val", progress=False, results=results)
    assert again == counters


TINY_RUN = {"data.train_images": 2, "data.val_images": 3, "data.images_per_batch": 2,
            "data.max_questions": 1, "model.llm.num_hidden_layers": 1,
            "model.clip.num_hidden_layers": 1, "model.sam.encoder_depth": 2,
            "model.sam.global_attn_indexes": (1,), "model.sam.img_size": 128,
            "eval.images_per_batch": 3, "eval.overlays": 0}


def _save_run_checkpoint(cfg, step: int) -> None:
    """A training workdir as train() leaves it (orbax state + data position), from the freshly
    initialised state: the run's own checkpoint code, without compiling a train step."""

    built = loop.build(cfg)
    state, *_, lora_cfg = loop.init_state(cfg, built.config, built.params, tf.data_mesh())
    runs.describe_run(cfg.workdir, built.config, lora_cfg, built.tokenizer_folder,
                      experiment=cfg.to_dict())
    stream = loop._train_stream(cfg, built.config, built.tokenizer, built.root, built.images,
                                SkipCounter())
    ckpts = runs.RunCheckpoints(os.path.join(cfg.workdir, "checkpoints"), async_save=False)
    ckpts.save(step, state, stream.get_state(), force=True)
    ckpts.close()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eval_cli_on_synthetic_val_of_a_training_workdir(tmp_path):
    settings = dict(TINY_RUN, **{"data.root": str(tmp_path / "data"),
                                 "workdir": str(tmp_path / "run")})
    cfg = config_file.load(SYNTHETIC)
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    _save_run_checkpoint(cfg, step=3)

    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--config",
           os.path.join(ROOT, "configs", "synthetic.py")]
    cmd += [f"--config.{k}={v}" for k, v in settings.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    summary = json.loads((tmp_path / "run" / "eval" /
                          "metrics_mmr_val_teacher_forced.json").read_text())
    assert summary["checkpoint"].endswith("step 3")
    assert summary["counts"]["images"] == 3 and summary["metrics"]["all"]["masks"] > 0
    assert summary["skipped"] == {}

    # No checkpoint anywhere: a message that says what was tried and what to do.
    cfg.workdir = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="does not exist. Tried:") as e:
        run.load_model(cfg)
    assert "training workdir" in str(e.value) and "converted" in str(e.value)
    # A workdir whose run has not saved a step yet: told to wait or train, not to convert.
    os.makedirs(tmp_path / "starting" / "checkpoints")
    cfg.workdir = str(tmp_path / "starting")
    with pytest.raises(FileNotFoundError, match="no finished checkpoint yet") as e:
        run.load_model(cfg)
    assert "checkpoints_convert" not in str(e.value)


@pytest.mark.torch
def test_generate_protocol_with_the_real_model(fixture):
    """The real generate-then-segment path (no stand-in): the converted model writes its own
    answers; the accumulated metrics and counters equal scoring each question's own
    ``predictor.segment`` answer one at a time."""

    pred = m2sa_jax.load(str(fixture["dst"]), max_new_tokens=6)
    # and a question without a target (zero masks), as a no-target dataset gives it
    first = fixture["samples"][0]
    none = dataclasses.replace(first, record_id="no target", questions=["Is there a giraffe?"],
                               answers=["There is no giraffe in the image."], masks=[[]],
                               extra={})
    samples = fixture["samples"] + [none]
    metrics, skips, stats, counters = generate_eval.evaluate_generate(
        pred, samples, split="val", progress=False)
    inter, union, ids, kinds = [], [], [], []
    want = dict.fromkeys(generate_eval.COUNTERS, 0)
    for s in samples:
        for i, q in enumerate(s.questions):
            h, w = s.height, s.width
            gt = np.stack([np.asarray(r.decode(), bool) for r in s.masks[i]] or
                          [np.zeros((h, w), bool)])[:len(s.masks[i])]
            r = pred.segment(s.image_path, q)
            assert r.masks.shape == (r.answer.count("[SEG]"), h, w)
            assert r.no_target == (r.masks.shape[0] == 0)
            a, u, missing, extra = generate_eval.score_question(gt, r.masks)
            want["exact" if not (missing or extra) else "fewer" if missing else "more"] += 1
            want["missing_masks"] += missing
            want["extra_masks"] += extra
            want["misses"] += int(len(gt) > 0 and r.no_target)
            want["no_target_questions"] += int(len(gt) == 0)
            want["false_positives"] += int(len(gt) == 0 and not r.no_target)
            inter += list(a)
            union += list(u)
            ids += [s.record_id] * len(gt)
            kinds += [m.kind for m in s.masks[i]]
    direct = SegmentationMetrics()
    direct.update("val", np.array(inter), np.array(union), ids, kinds)
    assert counters == want and counters["no_target_questions"] == 1
    assert stats["questions"] == sum(len(s.questions) for s in samples)
    got, exp = metrics.result()["val"]["all"], direct.result()["val"]["all"]
    assert (got["intersection"], got["union"], got["masks"]) == (
        exp["intersection"], exp["union"], exp["masks"])
    assert got["giou"] == pytest.approx(exp["giou"], abs=1e-12)

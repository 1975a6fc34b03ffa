"""Instance separation (m2sa_jax/evaluation/instances.py): hand-made cases, the IoU agreeing with
the benchmark's per-mask IoU, and the accumulator's bookkeeping."""

import numpy as np
import pytest

from m2sa_jax.evaluation import instances
from m2sa_jax.evaluation.instances import InstanceSeparation, pairwise_iou, separation
from m2sa_jax.evaluation.metrics import iou_from_counts, mask_stats


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# Two lamp shades (left and right, 4×4 each) and a pole in one 10×20 image.
H, W = 10, 20
LEFT, RIGHT, POLE = _box(H, W, 0, 4, 0, 4), _box(H, W, 0, 4, 12, 16), _box(H, W, 5, 9, 1, 2)
LABELS = ["lamp:shade", "lamp:shade", "lamp:pole"]
KINDS = ["part", "part", "part"]


def _question(*preds):
    pred = np.stack(preds)[None]                                   # [1, 3, H, W]
    gt = np.stack([LEFT, RIGHT, POLE])[None]
    return pairwise_iou(pred, gt)[0]


def test_pairwise_iou_by_hand():
    both = LEFT | RIGHT
    iou = _question(LEFT, both, np.zeros((H, W), bool))
    assert iou[0, 0] == pytest.approx(16 / (16 + 1e-5))           # exact
    assert iou[0, 1] == 0.0                                        # disjoint
    assert iou[1, 0] == pytest.approx(16 / (32 + 1e-5))            # covers both shades
    assert iou[1, 1] == pytest.approx(16 / (32 + 1e-5))
    assert iou[2, 2] == 0.0 and iou[2, 0] == 0.0                   # empty prediction
    empty = pairwise_iou(np.zeros((1, 1, 4, 4), bool), np.zeros((1, 1, 4, 4), bool))
    assert empty[0, 0, 0] == 1.0                                   # nothing to find, nothing found


def test_correct_swapped_and_merged_masks():
    counted, sep = separation(_question(LEFT, RIGHT, POLE), LABELS)
    assert counted.tolist() == [True, True, False]                 # the pole has no other instance
    assert sep.tolist() == [True, True, False]
    _, sep = separation(_question(RIGHT, LEFT, POLE), LABELS)
    assert sep.tolist() == [False, False, False]                   # instances swapped
    both = LEFT | RIGHT
    _, sep = separation(_question(both, both, POLE), LABELS)
    assert sep.tolist() == [False, False, False]                   # "both lamps": a tie chooses none
    # Mostly the own shade plus a sliver of the other: still closer to its own target.
    _, sep = separation(_question(LEFT | _box(H, W, 0, 1, 12, 14), RIGHT, POLE), LABELS)
    assert sep.tolist() == [True, True, False]


def test_groups_from_category_names():
    assert instances.instance_groups(["cup", "lamp", "cup", "cup:handle"]) == [0, -1, 0, -1]
    assert instances.instance_groups(["a:x", "b", "a:x", "b"]) == [0, 1, 0, 1]
    assert instances.instance_groups([]) == []
    counted, sep = separation(np.eye(4) + 0.1, ["a", "b", "c", "d"])
    assert not counted.any() and not sep.any()


def test_padded_slots_and_canvas_outside_the_image_are_ignored():
    # The question has 2 targets in 3 slots on a 12×24 canvas; the image is 10×20. A prediction
    # spilling into the padding must not change the IoU.
    canvas = np.zeros((1, 3, 12, 24), bool)
    gt = canvas.copy()
    gt[0, 0, :H, :W], gt[0, 1, :H, :W] = LEFT, RIGHT
    pred = gt.copy()
    pred[0, 0, 10:, :] = True
    pred[0, 1, :, 20:] = True
    iou = pairwise_iou(pred, gt, sizes=np.array([[H, W]]))[0]
    assert iou[0, 0] == iou[1, 1] == pytest.approx(16 / (16 + 1e-5))
    counted, sep = separation(iou, LABELS[:2])
    assert counted.tolist() == sep.tolist() == [True, True]


@pytest.mark.parametrize("seed", range(5))
def test_diagonal_is_the_benchmark_iou_and_logits_equal_booleans(seed):
    rng = np.random.default_rng(seed)
    q, n, h, w = 3, 4, 9, 11
    logits = rng.normal(size=(q, n, h, w)).astype(np.float32)
    gt = rng.random((q, n, h, w)) < 0.3
    sizes = rng.integers(1, [h + 1, w + 1], size=(q, 2))
    iou = pairwise_iou(logits, gt, sizes)
    assert np.array_equal(iou, pairwise_iou(logits > 0, gt, sizes))
    stats = mask_stats(logits.reshape(q * n, h, w), gt.reshape(q * n, h, w),
                       sizes=np.repeat(sizes, n, axis=0))
    want = iou_from_counts(stats["intersection"], stats["union"]).reshape(q, n)
    assert np.array_equal(np.einsum("qjj->qj", iou), want)
    for c in range(q):                                             # off the diagonal, by NumPy
        hh, ww = sizes[c]
        p, g = logits[c, :, :hh, :ww] > 0, gt[c, :, :hh, :ww]
        for j in range(n):
            for k in range(n):
                u = (p[j] | g[k]).sum()
                expect = 1.0 if u == 0 else (p[j] & g[k]).sum() / (u + 1e-5)
                assert iou[c, j, k] == pytest.approx(expect, rel=1e-12)


def test_accumulator_by_granularity_merge_and_state():
    acc = InstanceSeparation()
    acc.update(_question(LEFT, RIGHT, POLE), LABELS, KINDS)        # 2 counted, 2 separated
    both = LEFT | RIGHT
    acc.update(_question(both, both, POLE), LABELS, KINDS)         # 2 counted, 0 separated
    objects = pairwise_iou(np.stack([LEFT, LEFT])[None], np.stack([LEFT, RIGHT])[None])[0]
    acc.update(objects, ["lamp", "lamp"], ["object", "object"])    # 2 counted, 1 separated
    acc.update(np.eye(2), ["cup", "lamp"], ["object", "object"])   # nothing counted
    r = acc.result()
    assert r["all"] == {"rate": 0.5, "masks": 6, "separated": 3, "questions": 3}
    assert r["part"] == {"rate": 0.5, "masks": 4, "separated": 2, "questions": 2}
    assert r["object"] == {"rate": 0.5, "masks": 2, "separated": 1, "questions": 1}

    again = InstanceSeparation.from_state_dict(acc.state_dict())
    assert again.result() == r
    merged = InstanceSeparation().merge(acc).merge(again)
    assert merged.result()["all"] == {"rate": 0.5, "masks": 12, "separated": 6, "questions": 6}
    assert InstanceSeparation().result() == {}
    with pytest.raises(ValueError, match="version"):
        InstanceSeparation.from_state_dict({"version": 7})
    with pytest.raises(ValueError, match="2 labels but 1 kinds"):
        acc.update(np.eye(2), ["a", "a"], ["object"])

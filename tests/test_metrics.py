"""gIoU / cIoU: hand-computed cases, padding, the accumulator, and a NumPy cross-check."""

import json

import numpy as np
import pytest

from m2sa_jax.evaluation.metrics import (SegmentationMetrics, iou_from_counts,
                                         mask_stats)


def _counts(pred, gt, **kw):
    s = mask_stats(pred, gt, **kw)
    return np.asarray(s["intersection"]), np.asarray(s["union"])


def test_empty_ground_truth():
    gt = np.zeros((2, 4, 5), bool)
    pred = np.full((2, 4, 5), -3.0, np.float32)
    pred[1, 0, :3] = 2.0                          # 3 false-positive pixels on mask 1
    inter, union = _counts(pred, gt)
    np.testing.assert_array_equal(inter, [0, 0])
    np.testing.assert_array_equal(union, [0, 3])
    np.testing.assert_array_equal(iou_from_counts(inter, union), [1.0, 0.0])


def test_several_masks_per_image_by_hand():
    gt = np.zeros((3, 4, 4), bool)
    pred = np.full((3, 4, 4), -1.0, np.float32)
    gt[0, :2, :2] = True                          # 4 px
    pred[0, :2, :] = 1.0                          # 8 px, 4 shared → 4 / 8
    gt[1, 3, :] = True                            # 4 px, nothing predicted → 0 / 4
    gt[2, 1:3, 1:3] = True                        # perfect
    pred[2, 1:3, 1:3] = 0.5
    pred[2, 0, 0] = 0.0                           # logit exactly 0 is background
    inter, union = _counts(pred, gt)
    np.testing.assert_array_equal(inter, [4, 0, 4])
    np.testing.assert_array_equal(union, [8, 4, 4])
    np.testing.assert_allclose(iou_from_counts(inter, union),
                               [4 / (8 + 1e-5), 0.0, 4 / (4 + 1e-5)], rtol=0, atol=1e-15)

    m = SegmentationMetrics()
    m.update("val", inter, union, record_ids=["img1", "img1", "img2"],
             kinds=["object", "part", "part"])
    r = m.result()["val"]
    assert r["all"]["giou"] == pytest.approx((0.5 / (1 + 1.25e-6) + 0 + 1 / (1 + 2.5e-6)) / 3,
                                             abs=1e-12)
    assert r["all"]["ciou"] == pytest.approx(8 / 16, abs=1e-15)
    assert (r["all"]["masks"], r["all"]["records"]) == (3, 2)
    assert (r["object"]["masks"], r["object"]["records"]) == (1, 1)
    assert (r["part"]["masks"], r["part"]["records"]) == (2, 2)
    assert r["part"]["ciou"] == pytest.approx(4 / 8, abs=1e-15)
    assert r["object"]["giou"] == pytest.approx(4 / (8 + 1e-5), abs=1e-15)


def test_boolean_predictions_equal_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 9, 7)).astype(np.float32)
    gt = rng.random((4, 9, 7)) < 0.4
    a = _counts(logits, gt)
    b = _counts(logits > 0, gt)
    c = _counts((logits > 0).astype(np.uint8), gt.astype(np.uint8))
    for x, y in ((a, b), (a, c)):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])


def test_padding_is_ignored():
    rng = np.random.default_rng(1)
    sizes = [(5, 7), (3, 3), (6, 2)]
    real_pred = [rng.normal(size=s).astype(np.float32) for s in sizes]
    real_gt = [rng.random(s) < 0.5 for s in sizes]
    # Padded canvas full of confident garbage, plus two padding entries.
    pred = rng.normal(size=(5, 8, 8)).astype(np.float32) + 5
    gt = np.ones((5, 8, 8), bool)
    for k, (h, w) in enumerate(sizes):
        pred[k, :h, :w] = real_pred[k]
        gt[k, :h, :w] = real_gt[k]
    valid = np.array([True, True, True, False, False])
    padded_sizes = np.array(sizes + [(8, 8), (8, 8)])
    inter, union = _counts(pred, gt, valid=valid, sizes=padded_sizes)
    for k in range(3):
        i1, u1 = _counts(real_pred[k][None], real_gt[k][None])
        assert (inter[k], union[k]) == (i1[0], u1[0])
    np.testing.assert_array_equal(inter[3:], 0)
    np.testing.assert_array_equal(union[3:], 0)

    padded = SegmentationMetrics()
    padded.update("s", inter, union, ["a", "a", "b", "pad", "pad"], ["object"] * 5, valid=valid)
    # Unpadded run: record "a" (two masks, padded only to a common shape with neutral
    # values) and record "b" fed separately.
    unpadded = SegmentationMetrics()
    ia, ua = _counts(np.stack([np.pad(real_pred[0], ((0, 1), (0, 0))),
                               np.pad(real_pred[1], ((0, 3), (0, 4)), constant_values=-1)]),
                     np.stack([np.pad(real_gt[0], ((0, 1), (0, 0))),
                               np.pad(real_gt[1], ((0, 3), (0, 4)))]))
    unpadded.update("s", ia, ua, ["a", "a"], ["object", "object"])
    ib, ub = _counts(real_pred[2][None], real_gt[2][None])
    unpadded.update("s", ib, ub, ["b"], ["object"])
    assert padded.result() == unpadded.result()
    assert padded.result()["s"]["all"]["masks"] == 3
    direct = SegmentationMetrics()
    direct.update_masks("s", pred, gt, ["a", "a", "b", "pad", "pad"], ["object"] * 5,
                        valid=valid, sizes=padded_sizes)
    assert direct.result() == padded.result()


def test_ignore_region_excluded_from_both():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, 0, :] = True                            # 4 target px
    pred = np.full((1, 4, 4), -1.0, np.float32)
    pred[0, :2, :] = 1.0                          # 8 predicted px
    ignore = np.zeros((1, 4, 4), bool)
    ignore[0, 1, :2] = True                       # 2 predicted-only px ignored
    ignore[0, 0, 3] = True                        # 1 shared px ignored
    inter, union = _counts(pred, gt, ignore=ignore)
    assert (inter[0], union[0]) == (3, 5)


def test_accumulator_merge_resume_and_serialisation():
    rng = np.random.default_rng(2)
    batches = []
    for b in range(6):
        n = int(rng.integers(1, 5))
        inter = rng.integers(0, 50, n)
        union = inter + rng.integers(0, 50, n)
        kinds = list(rng.choice(["object", "part"], n))
        batches.append((inter, union, [f"r{b}"] * n, kinds))
    whole = SegmentationMetrics()
    for i, u, r, k in batches:
        whole.update("test_mixed", i, u, r, k)
    host0, host1 = SegmentationMetrics(), SegmentationMetrics()
    for j, (i, u, r, k) in enumerate(batches):
        (host0 if j % 2 else host1).update("test_mixed", i, u, r, k)
    merged = SegmentationMetrics.merged([host0, host1])
    _assert_results_close(merged.result(), whole.result())

    # Resume: stop after 3 batches, serialise, reload, skip done records, finish.
    first = SegmentationMetrics()
    for i, u, r, k in batches[:3]:
        first.update("test_mixed", i, u, r, k)
    resumed = SegmentationMetrics.from_json(json.loads(json.dumps(first.to_json())))
    for i, u, r, k in batches:
        if r[0] not in resumed.done_records("test_mixed"):
            resumed.update("test_mixed", i, u, r, k)
    _assert_results_close(resumed.result(), whole.result())
    assert resumed.all_hosts().result() == resumed.result()

    with pytest.raises(ValueError, match="already counted"):
        resumed.update("test_mixed", *batches[0])
    with pytest.raises(ValueError, match="in both accumulators"):
        SegmentationMetrics.merged([host0, whole])
    with pytest.raises(ValueError, match="granularity"):
        SegmentationMetrics().update("val", [1], [2], ["x"], ["stuff"])
    with pytest.raises(ValueError, match="length"):
        SegmentationMetrics().update("val", [1, 2], [2, 2], ["x"], ["part"])


def test_per_split_counts():
    m = SegmentationMetrics()
    m.update("val", [1, 2], [2, 2], ["a", "a"], ["object", "object"])
    m.update("test_part_only", [0], [0], ["b"], ["part"])
    r = m.result()
    assert m.splits() == ["test_part_only", "val"]
    assert r["val"]["all"]["records"] == 1 and r["val"]["all"]["masks"] == 2
    assert "part" not in r["val"]
    assert r["test_part_only"]["part"]["giou"] == 1.0
    assert r["test_part_only"]["part"]["empty_union_masks"] == 1
    assert np.isnan(r["test_part_only"]["part"]["ciou"])


def _assert_results_close(a, b):
    assert a.keys() == b.keys()
    for split in a:
        assert a[split].keys() == b[split].keys()
        for g in a[split]:
            for key, val in a[split][g].items():
                assert val == pytest.approx(b[split][g][key], rel=1e-12, abs=0), (split, g, key)


def _histogram_reference(pred_bin, gt_u8):
    """Independent NumPy version of the public code's per-mask counting: ignore (255) pixels
    are copied into the prediction, then both maps are histogrammed into the {0, 1} bins."""
    out = pred_bin.astype(np.int64).ravel().copy()
    tgt = gt_u8.astype(np.int64).ravel()
    out[tgt == 255] = 255
    inter_px = out[out == tgt]
    a_i = np.bincount(inter_px[inter_px <= 1], minlength=2)[:2]
    a_o = np.bincount(out[out <= 1], minlength=2)[:2]
    a_t = np.bincount(tgt[tgt <= 1], minlength=2)[:2]
    return a_i[1], (a_o + a_t - a_i)[1]


@pytest.mark.parametrize("seed", range(40))
def test_property_against_numpy_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n, H, W = int(rng.integers(1, 7)), int(rng.integers(1, 24)), int(rng.integers(1, 24))
    sizes = np.stack([rng.integers(1, H + 1, n), rng.integers(1, W + 1, n)], 1)
    valid = rng.random(n) < 0.8
    logits = rng.normal(size=(n, H, W)).astype(np.float32) + rng.normal(size=(n, 1, 1))
    density = rng.random((n, 1, 1))
    gt = rng.random((n, H, W)) < density * (rng.random((n, 1, 1)) < 0.85)   # some empty GT
    logits[rng.random(n) < 0.15] = -1.0                                       # some empty preds
    ignore = (rng.random((n, H, W)) < 0.1) & (rng.random((n, 1, 1)) < 0.5)
    kinds = list(rng.choice(["object", "part"], n))
    records = [f"img{k // 2}" for k in range(n)]

    s = mask_stats(logits, gt, valid=valid, sizes=sizes, ignore=ignore)
    got = SegmentationMetrics()
    got.update("val", s["intersection"], s["union"], records, kinds, valid=s["valid"])

    ref_i, ref_u, ref_iou, ref_kind = [], [], [], []
    for k in range(n):
        h, w = sizes[k]
        g = gt[k, :h, :w].astype(np.uint8)
        g[ignore[k, :h, :w]] = 255
        i, u = _histogram_reference(logits[k, :h, :w] > 0, g)
        assert (int(s["intersection"][k]), int(s["union"][k])) == ((i, u) if valid[k] else (0, 0))
        if not valid[k]:
            continue
        ref_i.append(i)
        ref_u.append(u)
        ref_iou.append(i / (u + 1e-5) + (1.0 if u == 0 else 0.0))
        ref_kind.append(kinds[k])
    res = got.result()
    if not ref_i:
        assert res == {}
        return
    all_ = res["val"]["all"]
    assert all_["masks"] == len(ref_i)
    assert all_["giou"] == pytest.approx(np.mean(ref_iou), rel=1e-12, abs=1e-15)
    if sum(ref_u):
        assert all_["ciou"] == pytest.approx(sum(ref_i) / sum(ref_u), rel=1e-12)
        # The public code's final division: ΣI / (ΣU + 1e-10).
        assert all_["ciou"] == pytest.approx(sum(ref_i) / (sum(ref_u) + 1e-10), rel=1e-9)
    # The public code's gIoU divides the IoU sum by (mask count + 1e-5).
    released = np.sum(ref_iou) / (len(ref_iou) + 1e-5)
    assert all_["giou"] * len(ref_iou) / (len(ref_iou) + 1e-5) == pytest.approx(released,
                                                                                rel=1e-12)
    for g in ("object", "part"):
        sel = [v for v, kd in zip(ref_iou, ref_kind) if kd == g]
        if sel:
            assert res["val"][g]["giou"] == pytest.approx(np.mean(sel), rel=1e-12, abs=1e-15)
        else:
            assert g not in res["val"]

"""Benchmark readers on fixture files written in each upstream on-disk format."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2sa_jax.data.types import BadRecord
from m2sa_jax.data import benchmarks
from m2sa_jax.evaluation.metrics import SegmentationMetrics, mask_stats


def _jpeg(path, h, w, exif_orientation=None):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8))
    if exif_orientation is None:
        im.save(path, quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, quality=90, exif=exif)


def _rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# --------------------------------------------------------------------------- ReasonSeg

def _write_reason_seg(tmp_path):
    d = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    d.mkdir(parents=True)

    def item(stem, anno, h=30, w=40, encoding="utf-8", orientation=None):
        _jpeg(str(d / f"{stem}.jpg"), h, w, orientation)
        if anno is not None:
            (d / f"{stem}.json").write_bytes(json.dumps(anno, ensure_ascii=False).encode(encoding))

    item("a_sentence", {
        "text": ["  the thing you sit on to rest  ", "second query is not evaluated"],
        "is_sentence": True,
        "shapes": [
            {"label": "target", "points": _rect(2.9, 2.2, 20.7, 15.0), "shape_type": "polygon"},
            {"label": "ignore", "points": _rect(5, 5, 8, 8), "shape_type": "polygon"},
            {"label": "target", "points": _rect(30, 20, 35, 25), "shape_type": "polygon"},
            {"label": "Ignore_1", "points": _rect(25, 0, 39, 10), "shape_type": "polygon"},
            {"label": "target", "points": _rect(27, 2, 29, 4), "shape_type": "polygon"},
            {"label": "flag", "points": _rect(0, 0, 39, 29), "shape_type": "polygon"},
        ]})
    item("b_phrase_cp1252", {"text": ["café chair"], "is_sentence": False,
                             "shapes": [{"label": "target", "points": _rect(0, 0, 3, 3)}]},
         encoding="cp1252")
    item("c_no_target", {"text": ["nothing here"], "is_sentence": True,
                         "shapes": [{"label": "ignore", "points": _rect(0, 0, 5, 5)}]})
    item("d_rotated", {"text": ["rotated"], "is_sentence": True,
                       "shapes": [{"label": "target", "points": _rect(1, 1, 10, 30)}]},
         h=20, w=36, orientation=6)
    item("e_missing_json", None)
    item("f_bad_points", {"text": ["x"], "is_sentence": True,
                          "shapes": [{"label": "target", "points": [[1, 2, 3]]}]})
    item("g_no_text", {"text": [], "is_sentence": True, "shapes": []})
    (d / "h_bad_json.json").write_text("{not json")
    _jpeg(str(d / "h_bad_json.jpg"), 10, 10)
    return d


def test_reason_seg_reader(tmp_path):
    import cv2

    d = _write_reason_seg(tmp_path)
    samples, skips = benchmarks.reason_seg(str(d))
    ids = [s.record_id for s in samples]
    assert ids == ["reason_seg/val/a_sentence", "reason_seg/val/b_phrase_cp1252",
                   "reason_seg/val/c_no_target", "reason_seg/val/d_rotated"]
    assert skips.counts == {"missing_json": 1, "malformed_shapes": 1, "no_query": 1, "invalid_json": 1}
    rid, message = skips.examples["malformed_shapes"][0]
    assert rid == "reason_seg/val/f_bad_points" and "f_bad_points.json" in message
    assert "4 records skipped" in skips.summary()
    with pytest.raises(BadRecord, match="e_missing_json"):
        benchmarks.reason_seg(str(d), strict=True)

    a, b, c, rot = samples
    assert a.questions == ["the thing you sit on to rest"] and a.answers == ["[SEG]"]
    assert a.extra["eval_questions"] == [" the thing you sit on to rest Please output segmentation mask."]
    assert a.extra["eval_answers"] == ["[SEG]."]
    assert b.questions == ["What is café chair in this image?"]
    assert b.extra["eval_questions"] == [" What is café chair in this image? Please output segmentation mask."]

    # Expected map by hand: polygons painted largest first, borders included, points truncated.
    expect = np.zeros((30, 40), np.uint8)
    expect[2:16, 2:21] = 1             # big target (area 266), points 2.9 → 2, 20.7 → 20
    expect[0:11, 25:40] = 255          # "Ignore_1" (area 165)
    expect[20:26, 30:36] = 1           # small target (36)
    expect[5:9, 5:9] = 255             # ignore inside the big target (16)
    expect[2:5, 27:30] = 1             # target inside Ignore_1 (9): painted last, wins
    target = a.masks[0][0].decode()
    ignore = a.extra["ignore_masks"][0][0].decode()
    np.testing.assert_array_equal(target, expect == 1)
    np.testing.assert_array_equal(ignore, expect == 255)
    assert (a.height, a.width) == (30, 40) and target.shape == (30, 40)

    assert c.masks[0][0].decode().sum() == 0 and c.extra["ignore_masks"][0][0].decode().sum() == 36
    # EXIF orientation 6: OpenCV (the public loader) returns the image turned, 36 × 20.
    assert (rot.height, rot.width) == cv2.imread(rot.image_path).shape[:2] == (36, 20)
    assert rot.masks[0][0].decode().shape == (36, 20)

    # Metric with the ignore region: predicting the GT exactly (ignore pixels set to anything)
    # is a perfect score; ignore pixels never count.
    pred = np.where(expect == 255, 1.0, np.where(target, 1.0, -1.0))[None].astype(np.float32)
    s = mask_stats(pred, target[None], ignore=ignore[None])
    assert int(s["intersection"][0]) == int(s["union"][0]) == int(target.sum())


def test_reason_seg_label_map_matches_public_drawing():
    """The label map equals a direct transcription of the public drawing steps on random
    overlapping polygons (outline then fill, int32 points, largest area first)."""
    import cv2

    rng = np.random.default_rng(3)
    for _ in range(20):
        shapes = []
        for _ in range(int(rng.integers(1, 6))):
            n = int(rng.integers(3, 7))
            pts = rng.uniform(-3, 45, (n, 2)).tolist()
            shapes.append({"label": str(rng.choice(["target", "ignore", "flag", "Target"])),
                           "points": pts})
        got = benchmarks.reason_seg_label_map(shapes, 32, 41)
        drawn, areas = [], []
        for sh in shapes:
            if sh["label"].lower() == "flag":
                continue
            tmp = np.zeros((32, 41), np.uint8)
            cv2.polylines(tmp, np.array([sh["points"]], dtype=np.int32), True, 1, 1)
            cv2.fillPoly(tmp, np.array([sh["points"]], dtype=np.int32), 1)
            areas.append(tmp.sum())
            drawn.append(sh)
        want = np.zeros((32, 41), np.uint8)
        for k in list(np.argsort(areas)[::-1].astype(np.int32)):
            sh = drawn[k]
            v = 255 if "ignore" in sh["label"].lower() else 1
            cv2.polylines(want, np.array([sh["points"]], dtype=np.int32), True, v, 1)
            cv2.fillPoly(want, np.array([sh["points"]], dtype=np.int32), v)
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------ REFER layout

def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def _write_refer(tmp_path, dataset="refcoco", split_by="unc"):
    """A refs(unc).p pickle + instances.json in the REFER layout, three images."""
    root = tmp_path / "refer_seg"
    (root / dataset).mkdir(parents=True)
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(7)
    H, W = 24, 32
    images, anns, masks = [], [], {}
    cats = [{"id": c, "name": n, "supercategory": "x"} for c, n in
            [(1, "person"), (3, "car"), (18, "dog"), (44, "bottle"), (62, "chair"), (72, "tv")]]
    ann_id = 100
    layout = {1: [1, 1, 3, 18, 44, 62], 2: [1, 3, 18], 3: [1, 3, 18, 44, 62, 72, 72]}
    for image_id, cat_list in layout.items():
        fn = f"COCO_train2014_{image_id:012d}.jpg"
        _jpeg(str(img_dir / fn), H, W)
        images.append({"id": image_id, "file_name": fn, "height": H, "width": W})
        for cat in cat_list:
            m = np.zeros((H, W), bool)
            y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
            m[y:y + int(rng.integers(2, 7)), x:x + int(rng.integers(2, 7))] = True
            ann_id += 1
            masks[ann_id] = m
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat,
                         "segmentation": _rle(m), "area": int(m.sum()), "iscrowd": 0,
                         "bbox": [0, 0, 1, 1]})
    # One polygon annotation (pycocotools rasterises it; compared through pycocotools below).
    ann_id += 1
    anns.append({"id": ann_id, "image_id": 2, "category_id": 62, "iscrowd": 0, "bbox": [0, 0, 1, 1],
                 "segmentation": [[1.0, 1.0, 9.0, 1.0, 9.0, 7.0, 1.0, 7.0]], "area": 48})
    poly_ann = ann_id
    with open(root / dataset / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)

    def ref(ref_id, ann, image_id, split, sents):
        return {"ref_id": ref_id, "ann_id": ann, "image_id": image_id, "split": split,
                "category_id": next(a["category_id"] for a in anns if a["id"] == ann),
                "sent_ids": list(range(len(sents))), "file_name": "x.jpg",
                "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": i}
                              for i, s in enumerate(sents)]}

    refs = [
        ref(1, 101, 1, "val", ["Man on the LEFT ", "left guy"]),
        ref(2, 103, 1, "val", ["red car"]),
        ref(3, 104, 1, "testA", ["dog"]),
        ref(4, poly_ann, 2, "val", ["  empty chair"]),
        ref(5, 108, 3, "val", [f"thing {k}" for k in range(4)]),
        ref(6, 109, 3, "val", [f"other {k}" for k in range(3)]),
        ref(7, 110, 3, "train", ["not in val"]),
    ]
    with open(root / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root, masks, poly_ann, anns


def _decode_ann(seg, h, w):
    if isinstance(seg, list):
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).any(2)
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def test_refcoco_reader(tmp_path):
    root, masks, poly_ann, anns = _write_refer(tmp_path)
    samples, skips = benchmarks.refcoco(str(root), "refcoco", "val")
    assert skips.total == 0
    assert [s.record_id for s in samples] == ["refcoco(unc)/val/1", "refcoco(unc)/val/2",
                                              "refcoco(unc)/val/3"]
    s1 = samples[0]
    assert s1.questions == ["What is man on the left in this image?",
                            "What is left guy in this image?", "What is red car in this image?"]
    assert s1.answers == ["[SEG]"] * 3
    assert s1.extra["eval_questions"][0] == " What is man on the left in this image? Please output segmentation mask."
    assert s1.extra["eval_answers"] == ["[SEG]."] * 3
    np.testing.assert_array_equal(s1.masks[0][0].decode(), masks[101])
    np.testing.assert_array_equal(s1.masks[2][0].decode(), masks[103])
    assert all(m[0].kind == "object" for m in s1.masks)
    assert os.path.exists(s1.image_path) and (s1.height, s1.width) == (24, 32)
    poly = next(a for a in anns if a["id"] == poly_ann)
    expect = mask_utils.decode(mask_utils.frPyObjects(poly["segmentation"], 24, 32)).sum(2) > 0
    np.testing.assert_array_equal(samples[1].masks[0][0].decode(), expect)
    assert samples[2].num_targets == 7

    test_a, _ = benchmarks.refcoco(str(root), "refcoco", "testA")
    assert [s.questions for s in test_a] == [["What is dog in this image?"]]


def test_multi_target_paper_protocol(tmp_path):
    root, masks, _, anns = _write_refer(tmp_path)
    samples, skips = benchmarks.multi_target_referring(str(root), "refcoco", "val", seed=0)
    # Image 2 has exactly 4 categories (its polygon chair is the 4th): kept.
    assert skips.total == 0
    by_id = {s.record_id.rsplit("/", 1)[1]: s for s in samples}
    cats = {1: "person", 3: "car", 18: "dog", 44: "bottle", 62: "chair", 72: "tv"}
    for image_id, s in by_id.items():
        image_id = int(image_id)
        picked = s.extra["category_ids"]
        present = {a["category_id"] for a in anns if a["image_id"] == image_id}
        assert 4 <= len(picked) <= min(6, len(present)) and len(set(picked)) == len(picked)
        names = [cats[c] for c in picked]
        assert len(s.questions) == 1 and len(s.masks[0]) == len(picked)
        if len(names) == 4:
            listed = f"{names[0]}, {names[1]}, {names[2]}, and {names[3]}"
        else:
            listed = ", ".join(names[:-1]) + ", and " + names[-1]
        assert s.questions[0] == f"Can you segment the {listed}?"
        assert s.extra["eval_questions"] == s.questions
        assert s.answers[0] == ", ".join(f"{n} [SEG]" for n in names[:-1]) + f" and {names[-1]} [SEG]"
        assert s.extra["eval_answers"] == [s.answers[0] + "."]
        for cat, ref in zip(picked, s.masks[0]):
            union = np.zeros((24, 32), bool)
            for a in anns:
                if a["image_id"] == image_id and a["category_id"] == cat:
                    union |= _decode_ann(a["segmentation"], 24, 32)
            np.testing.assert_array_equal(ref.decode(), union)
            assert ref.label == cats[cat]
    assert set(by_id) == {"1", "2", "3"}
    # Seeded per image: same seed → same picks, whatever else is read; another seed differs
    # somewhere.
    again, _ = benchmarks.multi_target_referring(str(root), "refcoco", "val", seed=0)
    assert [s.extra["category_ids"] for s in again] == [s.extra["category_ids"] for s in samples]
    other = [benchmarks.multi_target_referring(str(root), "refcoco", "val", seed=k)[0]
             for k in range(1, 6)]
    assert any([s.extra["category_ids"] for s in o] != [s.extra["category_ids"] for s in samples]
               for o in other)


def test_multi_target_paper_protocol_skips_small_images(tmp_path):
    root, *_ = _write_refer(tmp_path)
    inst = root / "refcoco" / "instances.json"
    data = json.loads(inst.read_text())
    data["annotations"] = [a for a in data["annotations"]
                           if not (a["image_id"] == 2 and a["category_id"] == 62)]
    inst.write_text(json.dumps(data))
    refs = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    refs = [r for r in refs if r["image_id"] != 2] + [dict(refs[3], ann_id=106)]
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    samples, skips = benchmarks.multi_target_referring(str(root), "refcoco", "val")
    assert skips.counts == {"too_few_categories": 1}
    assert skips.examples["too_few_categories"][0][0] == "multi-refcoco(unc)/val/paper/2"
    assert len(samples) == 2


def test_multi_target_released_protocol(tmp_path):
    root, masks, _, _ = _write_refer(tmp_path)
    samples, skips = benchmarks.multi_target_referring(str(root), "refcoco", "val", protocol="released")
    assert skips.total == 0
    s1, s2, s3 = samples
    assert s1.questions == ["What is man on the left, left guy and red car in this image?"]
    assert s1.extra["eval_answers"] == ["[SEG], [SEG] and [SEG]."]
    assert s2.questions == ["What is empty chair in this image?"]
    assert s2.extra["eval_answers"] == ["[SEG]"]           # upstream: no "." for one [SEG]
    # Image 3: seven sentences → groups of 6 then 1.
    assert [len(m) for m in s3.masks] == [6, 1]
    assert s3.questions[0] == ("What is thing 0, thing 1, thing 2, thing 3, other 0 and other 1"
                               " in this image?")
    assert s3.questions[1] == "What is other 2 in this image?"
    assert s3.extra["eval_questions"][1] == " What is other 2 in this image? Please output segmentation mask."
    assert s3.extra["eval_answers"] == ["[SEG], [SEG], [SEG], [SEG], [SEG] and [SEG].", "[SEG]"]
    np.testing.assert_array_equal(s3.masks[0][0].decode(), masks[108])
    np.testing.assert_array_equal(s3.masks[1][0].decode(), masks[109])
    with pytest.raises(ValueError, match="protocol"):
        benchmarks.multi_target_referring(str(root), "refcoco", "val", protocol="other")


# ---------------------------------------------------------------------- RefCOCOm (CRIS)

def test_refcocom_reader(tmp_path):
    ann_dir = tmp_path / "RefCOCOm" / "annotations"
    mask_dir = tmp_path / "RefCOCOm" / "masks"
    img_dir = tmp_path / "train2014"
    for d in (ann_dir, mask_dir, img_dir):
        d.mkdir(parents=True)
    _jpeg(str(img_dir / "COCO_train2014_000000000001.jpg"), 20, 30)
    _jpeg(str(img_dir / "COCO_train2014_000000000002.jpg"), 10, 10)
    gt = np.zeros((20, 30), np.uint8)
    gt[3:9, 4:20] = 255
    gt[10:12, 0:5] = 128                                   # not 255 → background upstream
    Image.fromarray(gt).save(mask_dir / "11.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(mask_dir / "12.png")
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(mask_dir / "13.png")
    Image.fromarray(gt).save(mask_dir / "16.png")

    def rec(segment_id, img, sents):
        return {"bbox": [4, 3, 20, 9], "cat": 0, "segment_id": segment_id, "img_name": img,
                "sentences": [{"idx": i, "sent_id": 500 + i, "sent": s} for i, s in enumerate(sents)],
                "sentences_num": len(sents)}

    records = [
        rec(11, "COCO_train2014_000000000001.jpg", ["Left ear of the dog ", "ear"]),
        rec(12, "COCO_train2014_000000000001.jpg", ["empty part"]),
        rec(11, "COCO_train2014_000000000001.jpg", ["duplicate"]),
        rec(13, "COCO_train2014_000000000002.jpg", ["wrong size"]),
        rec(14, "COCO_train2014_000000000001.jpg", ["no mask file"]),
        rec(15, "COCO_train2014_000000000001.jpg", []),
        rec(16, "missing.jpg", ["x"]),
    ]
    path = ann_dir / "val_part.json"
    path.write_text(json.dumps(records))
    samples, skips = benchmarks.refcocom(str(path), str(mask_dir), str(img_dir))
    assert [s.record_id for s in samples] == ["refcocom/val_part/11", "refcocom/val_part/12"]
    assert skips.counts == {"duplicate_record": 1, "mask_size_mismatch": 1, "missing_mask": 1,
                            "no_sentences": 1, "missing_image": 1}
    s = samples[0]
    assert s.questions == ["What is left ear of the dog in this image?", "What is ear in this image?"]
    assert s.extra["eval_answers"] == ["[SEG].", "[SEG]."]
    m = s.masks[0][0]
    assert m.kind == "part" and (m.height, m.width) == (20, 30)
    np.testing.assert_array_equal(m.decode(), gt == 255)
    np.testing.assert_array_equal(s.masks[1][0].decode(), gt == 255)
    assert samples[1].masks[0][0].decode().sum() == 0

    obj_path = ann_dir / "val_object.json"
    obj_path.write_text(json.dumps(records[:1]))
    obj, _ = benchmarks.refcocom(str(obj_path), str(mask_dir), str(img_dir))
    assert obj[0].masks[0][0].kind == "object"

    # Per-granularity breakdown through the metrics with these samples.
    m_acc = SegmentationMetrics()
    for smp in samples + obj:
        gts = np.stack([ms[0].decode() for ms in smp.masks])
        st = mask_stats(gts.astype(np.float32) * 2 - 1, gts)
        m_acc.update("refcocom_val", st["intersection"], st["union"],
                     [smp.record_id] * len(smp.masks), [ms[0].kind for ms in smp.masks])
    r = m_acc.result()["refcocom_val"]
    assert r["part"]["masks"] == 3 and r["object"]["masks"] == 2 and r["all"]["giou"] == pytest.approx(
        1.0, abs=1e-6)


# --------------------------------------------------------------------------------- MMR

def _mmr_record(image_id, file_name, h, w, qa):
    """One MMR record (SPEC §6 layout); qa = [(question, text_answer, [(name, mask)])]."""
    answers = [[{"bbox": [0, 0, 1, 1], "segmentation": _rle(m), "image_id": image_id,
                 "category_name": name, "category_id": 7, "sorted_category_id": 3}
                for name, m in targets] for _, _, targets in qa]
    return {"file_name": file_name, "height": h, "width": w, "image_id": image_id,
            "not_exhaustive_category_ids": [], "neg_category_ids": [],
            "coco_url": f"http://example/{file_name}", "questions": [q for q, _, _ in qa],
            "answers": answers, "text_answers": [t for _, t, _ in qa],
            "raw_answers": [t.replace("{seg}", "") for _, t, _ in qa]}


@pytest.mark.parametrize("split", ["val", "test_mixed", "test_obj_only", "test_part_only"])
def test_mmr_splits_validation_mode(tmp_path, split):
    images = tmp_path / "coco"
    images.mkdir()
    rng = np.random.default_rng(5)
    H, W = 16, 20

    def m():
        return rng.random((H, W)) < 0.3

    _jpeg(str(images / "000000000001.jpg"), H, W)
    _jpeg(str(images / "000000000002.jpg"), H, W)
    masks = {k: m() for k in range(6)}
    records = [
        _mmr_record(1, "000000000001.jpg", H, W, [
            ("  Which parts hold the drink? ", "the mug's handle {seg} and the cup's handle {seg}",
             [("mug:handle", masks[0]), ("cup:handle", masks[1])]),
            ("What carries people?", "the car {seg}", [("car_(automobile)", masks[2])]),
            ("What do you sit on?", "the chair {seg}", [("chair", masks[3])]),
            ("Where is the light?", "the lamp {seg} with its shade {seg}",
             [("lamp", masks[4]), ("lamp:shade", masks[5])]),
        ]),
        _mmr_record(2, "000000000002.jpg", H, W, [
            ("Bad count?", "one {seg}", [("dog", masks[0]), ("dog:ear", masks[1])]),
        ]),
        _mmr_record(3, "000000000404.jpg", H, W, [("Missing image?", "x {seg}", [("dog", masks[0])])]),
    ]
    name = benchmarks.MMR_SPLITS[split]
    (tmp_path / name).write_text(json.dumps(records))
    samples, skips = benchmarks.mmr(str(tmp_path), str(images), split)
    assert skips.counts == {"seg_count": 1, "missing_image": 1}
    assert len(samples) == 1
    s = samples[0]
    assert s.record_id == f"{name} record 0 (image_id 1)"
    assert [q.strip() for q in s.questions] == [                             # all, in order
        "Which parts hold the drink?", "What carries people?", "What do you sit on?",
        "Where is the light?"]
    assert s.answers[0] == "the mug's handle [SEG] and the cup's handle [SEG]"
    assert s.extra["eval_questions"][0] == " Which parts hold the drink? Please output segmentation mask."
    assert s.extra["eval_answers"] == ["the mug's handle [SEG] and the cup's handle [SEG].",
                                       "the car [SEG].", "the chair [SEG].",
                                       "the lamp [SEG] with its shade [SEG]."]
    assert [[r.kind for r in ms] for ms in s.masks] == [["part", "part"], ["object"], ["object"],
                                                          ["object", "part"]]
    flat = [r for ms in s.masks for r in ms]
    for k, ref in enumerate(flat):
        np.testing.assert_array_equal(ref.decode(), masks[k])
    # Every answer has as many [SEG] as masks (what teacher forcing relies on).
    assert [a.count("[SEG]") for a in s.answers] == [len(ms) for ms in s.masks]
    with pytest.raises(BadRecord):
        benchmarks.mmr(str(tmp_path), str(images), split, strict=True)
    with pytest.raises(ValueError, match="MMR split"):
        benchmarks.mmr(str(tmp_path), str(images), "train")

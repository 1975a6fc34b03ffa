"""MMR reader on fixture files written in the exact MMR layout: masks, pairing, bad records."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2sa_jax.data import mmr
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import BadRecord

H, W = 24, 32


def rle_string(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def rle_list(m):
    """Uncompressed RLE: column-major run lengths starting with a run of zeros."""
    flat = m.astype(np.uint8).flatten(order="F")
    runs, value, n = [], 0, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            runs.append(n)
            value, n = v, 1
    runs.append(n)
    return {"size": [m.shape[0], m.shape[1]], "counts": runs}


def box_mask(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def ann(seg, name, image_id=1):
    return {"bbox": [0.0, 0.0, 1.0, 1.0], "segmentation": seg, "image_id": image_id,
            "category_name": name, "category_id": 7, "sorted_category_id": 3}


def record(image_id, file_name, questions, answers, text_answers, h=H, w=W):
    return {"file_name": file_name, "height": h, "width": w, "image_id": image_id,
            "not_exhaustive_category_ids": [], "neg_category_ids": [], "coco_url": "http://x",
            "questions": questions, "annotations": [a for group in answers for a in group],
            "answers": answers, "text_answers": text_answers, "raw_answers": list(text_answers)}


def write_image(root, name, h=H, w=W):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


MASKS = [box_mask(0, 5, 0, 5), box_mask(5, 10, 5, 12), box_mask(10, 20, 0, 30), box_mask(2, 4, 20, 30),
         box_mask(15, 24, 25, 32)]


def good_record(image_id=1, file_name="train2017/a.png"):
    """Five questions; question i's answer and masks are labelled i."""
    questions = [f"question {i}?" for i in range(5)]
    answers = [[ann(rle_string(MASKS[0]), "cup")],
               [ann([rle_string(MASKS[1]), rle_string(MASKS[3])], "car_(automobile):wheel")],  # 3rd axis
               [ann(rle_list(MASKS[2]), "table")],                                              # list form
               [ann(rle_string(MASKS[3]), "mug:handle"), ann(rle_string(MASKS[4]), "mug")],
               [ann(rle_string(MASKS[4]), "lamp:shade")]]
    texts = ["answer 0 {seg}", "answer 1 {seg}", "answer 2 {seg}", "answer 3 {seg} and {seg}",
             "answer 4 {seg}"]
    return record(image_id, file_name, questions, answers, texts)


@pytest.fixture
def good_file(tmp_path):
    root = tmp_path / "images"
    write_image(str(root), "train2017/a.png")
    path = tmp_path / "MMR_train.json"
    path.write_text(json.dumps([good_record()]))
    return str(path), str(root)


def test_masks_labels_and_kinds(good_file):
    ds = mmr.MMRDataset(*good_file, prompt="raw")
    assert len(ds) == 1 and ds.skips.total == 0
    s = ds.sample(0, all_questions=True)
    assert s.image_path.endswith("train2017/a.png") and (s.height, s.width) == (H, W)
    assert s.answers[3] == "answer 3 [SEG] and [SEG]"
    np.testing.assert_array_equal(s.masks[0][0].decode(), MASKS[0])
    np.testing.assert_array_equal(s.masks[1][0].decode(), MASKS[1] | MASKS[3])   # summed over axis 2
    np.testing.assert_array_equal(s.masks[2][0].decode(), MASKS[2])               # uncompressed counts
    assert [m.kind for m in s.masks[3]] == ["part", "object"]
    assert s.masks[1][0].kind == "part" and s.masks[1][0].label == "car_(automobile):wheel"
    assert mmr.category_kind("person") == "object"


def test_each_question_keeps_its_own_answer_and_masks(good_file):
    ds = mmr.MMRDataset(*good_file, prompt="raw", max_questions=3)
    rng = np.random.default_rng(0)
    for _ in range(10):
        s = ds.sample(0, rng)
        assert len(s.questions) == 3
        for q, a, m in zip(s.questions, s.answers, s.masks):
            i = int(q.split()[1].rstrip("?"))
            assert a.startswith(f"answer {i} ")
            assert a.count("[SEG]") == len(m)
            np.testing.assert_array_equal(m[0].decode(), ds.records[0].masks[i][0].decode())


def test_released_pairing_mispairs(good_file):
    ds = mmr.MMRDataset(*good_file, prompt="raw", max_questions=3, released_pairing=True)
    rng = np.random.default_rng(0)
    mismatched = 0
    for _ in range(10):
        s = ds.sample(0, rng)
        assert [a.split()[1] for a in s.answers] == ["0", "1", "2"]     # always the first N answers
        mismatched += sum(q.split()[1].rstrip("?") != a.split()[1] for q, a in zip(s.questions, s.answers))
    assert mismatched > 0


def test_prompts_for_training_and_validation(good_file):
    val = mmr.MMRDataset(*good_file, prompt="val").sample(0, all_questions=True)
    assert val.questions[0] == " question 0? Please output segmentation mask."
    assert val.answers[0] == "answer 0 [SEG]."
    train = mmr.MMRDataset(*good_file, prompt="train").sample(0, np.random.default_rng(1))
    assert all("question" in q and "mask" in q for q in train.questions)
    assert not train.answers[0].endswith(".")


def bad_files(tmp_path):
    """One JSON with a good record and one record per bad case; returns (path, root, expected)."""
    root = tmp_path / "images"
    for name in ("ok.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png", "h.png"):
        write_image(str(root), name)
    outside = tmp_path / "outside.png"
    write_image(str(tmp_path), "outside.png")
    os.symlink(outside, root / "link.png")
    m = rle_string(MASKS[0])
    one = [[ann(m, "cup")]]
    records = [
        record(1, "ok.png", ["q?"], one, ["{seg}"]),                                       # kept
        record(2, "missing.png", ["q?"], one, ["{seg}"]),                                  # missing_image
        record(3, "b.png", ["q?"], [[ann({"size": [H, W], "counts": "5220"}, "cup")]], ["{seg}"]),
        record(4, "c.png", ["q?"], [[ann({"size": [H + 1, W], "counts": m["counts"]}, "cup")]], ["{seg}"]),
        record(5, "d.png", ["q?"], one, ["{seg} and {seg}"]),                              # seg_count
        record(6, "e.png", [], [], []),                                                    # empty_questions
        record(1, "f.png", ["q?"], one, ["{seg}"]),                                        # duplicate id
        record(8, "g.png", ["q @@BAD@@?"], one, ["{seg}"]),                                # invalid_utf8
        record(9, "../outside.png", ["q?"], one, ["{seg}"]),                               # unsafe_path
        record(10, str(outside), ["q?"], one, ["{seg}"]),                                  # unsafe_path
        record(11, "link.png", ["q?"], one, ["{seg}"]),                                    # unsafe_path
        record(12, "h.png", ["q?"], [[{"bbox": [0, 0, 1, 1]}]], ["{seg}"]),               # malformed_record
    ]
    raw = json.dumps(records).encode("utf-8").replace(b"@@BAD@@", b"\xff\xfe")
    path = tmp_path / "MMR_val.json"
    path.write_bytes(raw)
    expected = {"missing_image": [1], "malformed_rle": [2], "rle_size_mismatch": [3], "seg_count": [4],
                "empty_questions": [5], "duplicate_image": [6], "invalid_utf8": [7],
                "unsafe_path": [8, 9, 10], "malformed_record": [11]}
    return str(path), str(root), expected


def test_bad_records_are_skipped_counted_and_named(tmp_path):
    path, root, expected = bad_files(tmp_path)
    ds = mmr.MMRDataset(path, root, prompt="raw")
    assert [r.image_id for r in ds.records] == [1]
    assert dict(ds.skips.counts) == {k: len(v) for k, v in expected.items()}
    for reason, indices in expected.items():
        named = [rid for rid, _ in ds.skips.examples[reason]]
        assert named == [f"MMR_val.json record {i} (image_id {[2, 3, 4, 5, 6, 1, 8, 9, 10, 11, 12][i - 1]})"
                         for i in indices]
    summary = ds.skips.summary()
    assert "11 records skipped" in summary and "unsafe_path: 3" in summary


def test_strict_mode_raises_with_file_and_record(tmp_path):
    path, root, _ = bad_files(tmp_path)
    with pytest.raises(BadRecord) as e:
        mmr.MMRDataset(path, root, strict=True)
    assert e.value.reason == "missing_image"
    assert path in str(e.value) and "record 1 (image_id 2)" in str(e.value)


def test_lazy_decode_rejects_malformed_rle():
    with pytest.raises(BadRecord) as e:
        mmr.decode_segmentation({"size": [H, W], "counts": "5220"}, H, W)
    assert e.value.reason == "malformed_rle"
    with pytest.raises(BadRecord):
        mmr.decode_segmentation({"size": [H, W], "counts": [1, 2, 3]}, H, W)


def test_validate_masks_and_shared_counter(good_file):
    skips = SkipCounter()
    ds = mmr.MMRDataset(*good_file, validate_masks=True, skips=skips)
    assert len(ds) == 1 and ds.skips is skips and skips.summary() == "no records skipped"


def test_unparseable_file_names_the_file(tmp_path):
    path = tmp_path / "MMR_test_mixed.json"
    path.write_text('[{"file_name": ')
    with pytest.raises(ValueError, match="MMR_test_mixed.json"):
        mmr.MMRDataset(str(path), str(tmp_path))

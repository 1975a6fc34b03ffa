"""Sem-seg and VQA sources on fixture files written in their upstream on-disk formats."""

import json
import os
import pickle
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2sa_jax.data import templates
from m2sa_jax.data.sources import common, sem_seg
from m2sa_jax.data.sources.class_names import ADE20K_CLASSES, COCO_STUFF_CLASSES
from m2sa_jax.data.sources.vqa import VQASource
from m2sa_jax.data.types import SEG_TOKEN, BadRecord

H, W = 12, 16


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _jpg(path, h=H, w=W):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _blocks(values):
    """A label map with one vertical band per value. # [H, W]"""
    label = np.zeros((H, W), np.uint8)
    for i, v in enumerate(values):
        label[:, i * (W // len(values)):(i + 1) * (W // len(values))] = v
    return label


def _check_consistent(sample):
    """One [SEG] per mask, every answer; masks are boolean at the image size."""
    assert len(sample.questions) == len(sample.answers) == len(sample.masks)
    for answer, masks in zip(sample.answers, sample.masks):
        assert answer.count(SEG_TOKEN) == len(masks) >= 1
        for m in masks:
            arr = m.decode()
            assert arr.dtype == bool and arr.shape == (m.height, m.width)


def _labels(sample):
    return [m.label for ms in sample.masks for m in ms]


def test_ade20k_shift_and_masks(tmp_path):
    root = str(tmp_path)
    stored = _blocks([0, 1, 5, 13])  # 0 is "other": ignored; 1 → wall, 5 → tree, 13 → person
    _jpg(f"{root}/ade20k/images/training/ADE_train_00000001.jpg")
    _png(f"{root}/ade20k/annotations/training/ADE_train_00000001.png", stored)
    _jpg(f"{root}/ade20k/images/training/ADE_train_00000002.jpg")
    _png(f"{root}/ade20k/annotations/training/ADE_train_00000002.png", np.zeros((H, W)))
    src = sem_seg.ade20k(root)
    assert len(src) == 2
    s = src.sample(0, np.random.default_rng(0))
    _check_consistent(s)
    assert sorted(_labels(s)) == sorted([ADE20K_CLASSES[0], ADE20K_CLASSES[4], ADE20K_CLASSES[12]])
    by_label = {m.label: m.decode() for ms in s.masks for m in ms}
    np.testing.assert_array_equal(by_label["wall"], stored == 1)
    np.testing.assert_array_equal(by_label["person"], stored == 13)
    assert s.image_path.endswith("ade20k/images/training/ADE_train_00000001.jpg")
    with pytest.raises(BadRecord) as e:
        src.sample(1, np.random.default_rng(0))
    assert e.value.reason == "no_classes" and "ADE_train_00000002.png" in str(e.value)


def test_cocostuff_ignores_dash_classes_and_255(tmp_path):
    root = str(tmp_path)
    wall_other = COCO_STUFF_CLASSES.index("wall-other")
    grass = COCO_STUFF_CLASSES.index("grass")
    stored = _blocks([0, wall_other, grass, 255])
    _png(f"{root}/cocostuff/train2017/000000000009.png", stored)
    src = sem_seg.cocostuff(root)
    s = src.sample(0, np.random.default_rng(1))
    _check_consistent(s)
    assert sorted(_labels(s)) == ["grass", "person"]
    assert s.image_path.endswith("coco/train2017/000000000009.jpg")
    assert {m.label: m.decode() for ms in s.masks for m in ms}["grass"].sum() == (stored == grass).sum()


def test_mapillary_config_names(tmp_path):
    root = str(tmp_path)
    config = {"labels": [{"name": "animal--bird", "readable": "Bird", "color": [1, 2, 3]},
                         {"name": "construction--flat--road", "readable": "Road", "color": [4, 5, 6]},
                         {"name": "object--traffic-light", "readable": "Traffic Light", "color": [7, 8, 9]}],
              "version": "2.0"}
    os.makedirs(f"{root}/mapillary")
    with open(f"{root}/mapillary/config_v2.0.json", "w") as f:
        json.dump(config, f)
    _png(f"{root}/mapillary/training/v2.0/labels/abc.png", _blocks([1, 2, 255, 255]))
    src = sem_seg.mapillary(root)
    s = src.sample(0, np.random.default_rng(2))
    _check_consistent(s)
    assert sorted(_labels(s)) == ["road", "traffic light"]
    assert s.image_path.endswith("mapillary/training/images/abc.jpg")


def _coco_file(path, categories, anns, file_name):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"images": [{"id": 7, "file_name": file_name, "height": H, "width": W}],
                   "annotations": anns, "categories": categories}, f)


def test_paco_lvis_names_and_part_phrasing(tmp_path):
    root = str(tmp_path)
    rle = mask_utils.encode(np.asfortranarray(_blocks([1, 0]) > 0))
    rle["counts"] = rle["counts"].decode()
    polygon = [[1.0, 1.0, 8.0, 1.0, 8.0, 6.0, 1.0, 6.0]]
    cats = [{"id": 1, "name": "trash_can_(container)"}, {"id": 2, "name": "mug:handle_(mug)"}]
    anns = [{"id": 10, "image_id": 7, "category_id": 1, "segmentation": polygon, "area": 35.0, "bbox": [1, 1, 7, 5], "iscrowd": 0},
            {"id": 11, "image_id": 7, "category_id": 2, "segmentation": rle, "area": 96.0, "bbox": [0, 0, 8, 12], "iscrowd": 0}]
    _coco_file(f"{root}/vlpart/paco/annotations/paco_lvis_v1_train.json", cats, anns, "train2017/000000000007.jpg")
    src = sem_seg.paco_lvis(root)
    assert src.names == {1: "trash_can", 2: ("mug", "handle")}
    seen_phrasings = set()
    for seed in range(12):
        s = src.sample(0, np.random.default_rng(seed))
        _check_consistent(s)
        labels = _labels(s)
        assert "trash_can" in labels
        part = [lab for lab in labels if lab != "trash_can"][0]
        assert part in ("mug handle", "the handle of the mug")
        seen_phrasings.add(part)
        kinds = {m.label: m.kind for ms in s.masks for m in ms}
        assert kinds["trash_can"] == "object" and kinds[part] == "part"
        masks = {m.label: m.decode() for ms in s.masks for m in ms}
        np.testing.assert_array_equal(masks[part], _blocks([1, 0]) > 0)
        assert masks["trash_can"].sum() == mask_utils.area(mask_utils.frPyObjects(polygon, H, W))[0]
    assert seen_phrasings == {"mug handle", "the handle of the mug"}
    assert s.image_path.endswith("coco/train2017/000000000007.jpg")


def test_pascal_part(tmp_path):
    root = str(tmp_path)
    cats = [{"id": 3, "name": "dog:head"}]
    anns = [{"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]], "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}]
    _coco_file(f"{root}/vlpart/pascal_part/train.json", cats, anns, "2008_000002.jpg")
    s = sem_seg.pascal_part(root).sample(0, np.random.default_rng(0))
    _check_consistent(s)
    assert _labels(s)[0] in ("dog head", "the head of the dog")
    assert s.image_path.endswith("vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg")


def test_grouping_limits_determinism_and_phrasing(tmp_path):
    root = str(tmp_path)
    label = np.arange(1, 13, dtype=np.uint8).repeat(W).reshape(H, W)  # 12 ADE classes, one per row
    _png(f"{root}/ade20k/annotations/training/a.png", label)
    _jpg(f"{root}/ade20k/images/training/a.jpg")
    src = sem_seg.ade20k(root)
    questions = set(templates.strip_image_prefix(q) for q in templates.short_questions())
    question_re = [re.compile(re.escape(q).replace(re.escape("{class_name}"), "(.+)")) for q in questions]
    for seed in range(20):
        s = src.sample(0, np.random.default_rng(seed))
        _check_consistent(s)
        assert len(s.questions) == 3 and all(1 <= len(m) <= 3 for m in s.masks)
        assert s.num_targets == 9 and len(set(_labels(s))) == 9
        for q, masks in zip(s.questions, s.masks):
            names = templates.join_targets([m.label for m in masks]).lower()
            assert any(r.fullmatch(q) and r.fullmatch(q).group(1) == names for r in question_re), q
        again = src.sample(0, np.random.default_rng(seed))
        assert (again.questions, again.answers, _labels(again)) == (s.questions, s.answers, _labels(s))
    restored = pickle.loads(pickle.dumps(s))  # Samples travel to worker processes
    np.testing.assert_array_equal(restored.masks[0][0].decode(), s.masks[0][0].decode())


def test_answer_forms():
    rng = np.random.default_rng(0)
    forms = set()
    for _ in range(200):
        q, a = common.phrase_turn(rng, ["cat", "dog", "tree"])
        assert a.count(SEG_TOKEN) == 3
        forms.add("clauses" if " is [SEG]" in a or a.count(".") > 1 else "plural")
        q1, a1 = common.phrase_turn(rng, ["cat"])
        assert a1 in [t.format(seg=SEG_TOKEN) for t in templates.MMR_ANSWER_LIST] and "cat" in q1
    assert forms == {"clauses", "plural"}


def test_vqa_llava_instruct(tmp_path):
    root = str(tmp_path)
    items = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "2", "image": "2.jpg", "conversations": [
            {"from": "gpt", "value": "preamble"}, {"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "3", "image": "3.jpg", "conversations": [
            {"from": "human", "value": "<image>\nA"}, {"from": "human", "value": "B"}]},
    ]
    os.makedirs(f"{root}/llava_dataset")
    with open(f"{root}/llava_dataset/llava_instruct_150k.json", "w") as f:
        json.dump(items, f)
    src = VQASource(root)
    s = src.sample(0, np.random.default_rng(0))
    assert s.questions == ["What are the colors of the bus in the image?", "What feature can be seen on the back of the bus?"]
    assert s.answers[1] == "The back of the bus features an advertisement."
    assert s.masks == [[], []] and s.num_targets == 0
    assert s.image_path.endswith("coco/train2017/000000033471.jpg")
    s2 = src.sample(1, np.random.default_rng(0))
    assert s2.questions == ["Hi?"] and s2.answers == ["Hello."]
    with pytest.raises(BadRecord) as e:
        src.sample(2, np.random.default_rng(0))
    assert e.value.reason == "bad_turns" and "llava_instruct_150k.json record vqa:3" in str(e.value)


def test_question_weights_of_the_released_training():
    released = templates.short_questions(released_weights=True)
    assert len(released) == 4 + 2 * 14 and len(templates.short_questions()) == 18
    rng = np.random.default_rng(0)
    originals = {templates.strip_image_prefix(q).format(class_name="cat") for q in templates.SHORT_QUESTION_LIST}
    for weights, expected in ((True, 4 / 32), (False, 4 / 18)):
        n = 4000
        hits = sum(common.phrase_turn(rng, ["cat"], released_weights=weights)[0] in originals for _ in range(n))
        assert abs(hits / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (weights, hits / n)

"""The synthetic MMR dataset: deterministic bytes, exact MMR layout, readable by our own reader."""

import hashlib
import json
import os

import numpy as np

from m2sa_jax.data import mmr, synthetic

RECORD_KEYS = {"file_name", "height", "width", "image_id", "not_exhaustive_category_ids",
               "neg_category_ids", "coco_url", "questions", "annotations", "answers", "text_answers",
               "raw_answers"}
ANN_KEYS = {"bbox", "segmentation", "image_id", "category_name", "category_id", "sorted_category_id"}


def digest(folder):
    h = hashlib.sha256()
    for base, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(base, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    synthetic.main(["--out", str(tmp_path / "a"), "--train", "6", "--val", "2", "--seed", "3"])
    synthetic.generate(str(tmp_path / "b"), 6, 2, seed=3)
    synthetic.generate(str(tmp_path / "c"), 6, 2, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_layout_and_round_trip_through_the_reader(tmp_path):
    paths = synthetic.generate(str(tmp_path), 12, 4, seed=0, size=160)
    root = str(tmp_path / "images")
    train = json.load(open(paths["train"]))
    val = json.load(open(paths["val"]))
    ids = [r["image_id"] for r in train + val]
    assert len(set(ids)) == len(ids) == 16
    n_part = n_object = n_multi = n_third_axis = 0
    for rec in train:
        assert set(rec) == RECORD_KEYS
        assert len(rec["questions"]) == len(rec["answers"]) == len(rec["text_answers"]) >= 3
        for text, anns in zip(rec["text_answers"], rec["answers"]):
            assert text.count("{seg}") == len(anns) >= 1
            n_multi += len(anns) > 1
            for a in anns:
                assert set(a) == ANN_KEYS and a["image_id"] == rec["image_id"]
                n_part += ":" in a["category_name"]
                n_object += ":" not in a["category_name"]
                n_third_axis += isinstance(a["segmentation"], list)
    assert n_part and n_object and n_multi and n_third_axis

    ds = mmr.MMRDataset(paths["train"], root, prompt="raw", validate_masks=True)
    assert len(ds) == 12 and ds.skips.total == 0
    for i in range(len(ds)):
        s = ds.sample(i, all_questions=True)
        for answer, refs in zip(s.answers, s.masks):
            assert answer.count("[SEG]") == len(refs)
            for ref in refs:
                m = ref.decode()
                assert m.shape == (160, 160) and m.sum() >= 30       # every target visible
    assert len(mmr.MMRDataset(paths["val"], root).records) == 4


def test_instances_are_numbered_left_to_right(tmp_path):
    paths = synthetic.generate(str(tmp_path), 20, 0, seed=1)
    ds = mmr.MMRDataset(paths["train"], str(tmp_path / "images"), prompt="raw")
    checked = 0
    for i in range(len(ds)):
        s = ds.sample(i, all_questions=True)
        for answer, refs in zip(s.answers, s.masks):
            names = [w for w in answer.replace("'s", "").split() if "_" in w]
            objects = [(n, r) for n, r in zip(names, refs) if r.kind == "object"]
            by_kind = {}
            for name, ref in objects:
                by_kind.setdefault(name.split("_")[0], []).append((int(name.split("_")[1]), ref))
            for items in by_kind.values():
                if len(items) > 1:
                    centres = []
                    for number, ref in sorted(items, key=lambda t: t[0]):
                        xs = np.nonzero(ref.decode())[1]
                        centres.append((xs.min() + xs.max()) / 2)
                    assert centres == sorted(centres)
                    checked += 1
    assert checked > 0

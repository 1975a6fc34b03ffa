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


def test_instances_are_named_by_their_third_of_the_picture(tmp_path):
    """A kind with several instances in an image names each by the third of the picture it
    stands in, the position word last, right before the instance's [SEG] ("the shade of the
    lamp on the left", "the lamp on the right"); targets of one answer sharing a category name
    are different objects (what the instance-separation metric relies on), named by different
    thirds in left-to-right order."""
    paths = synthetic.generate(str(tmp_path), 30, 0, seed=1)
    ds = mmr.MMRDataset(paths["train"], str(tmp_path / "images"), prompt="raw")
    groups = explicit = 0
    for i in range(len(ds)):
        s = ds.sample(i, all_questions=True)
        for question, answer, refs in zip(s.questions, s.answers, s.masks):
            phrases = answer.split("[SEG]")[:len(refs)]        # the words naming each target
            for label in {r.label for r in refs}:
                same = [j for j, r in enumerate(refs) if r.label == label]
                if len(same) < 2:
                    continue
                groups += 1
                masks = [refs[j].decode() for j in same]
                assert np.sum(masks, axis=0).max() == 1       # different objects: disjoint
                kind = label.split(':')[0]
                named = [[w for w in synthetic.POSITIONS
                          if phrases[j].rstrip().endswith(f"{kind} {'in' if w == 'middle' else 'on'} the {w}")]
                         for j in same]
                assert all(len(n) == 1 for n in named), (answer, label)
                centres = [np.nonzero(m)[1].mean() for m in masks]
                by_x = [named[k][0] for k in np.argsort(centres)]
                assert by_x == [p for p in synthetic.POSITIONS if p in by_x] and \
                    len(set(by_x)) == len(by_x), (answer, label)
            for w in synthetic.POSITIONS:                     # "the cap of the bottle on the right"
                for kind in synthetic.KINDS:
                    if f"the {kind} {'in' if w == 'middle' else 'on'} the {w}" in question:
                        explicit += 1
                        assert f"the {kind} {'in' if w == 'middle' else 'on'} the {w} [SEG]" in answer
    assert groups > 10 and explicit > 5


def test_layout_puts_each_object_in_a_third_of_its_own():
    rng = np.random.default_rng(0)
    for size in (96, 160, 256):
        for _ in range(200):
            kinds = [str(k) for k in rng.choice(list(synthetic.KINDS), 3)]
            boxes = synthetic._layout(rng, size, kinds)
            thirds = [synthetic.position(x0 + w / 2, size) for _, x0, _, w, _ in boxes]
            assert sorted(thirds) == sorted(synthetic.POSITIONS)
            assert all(0 <= x0 and x0 + w <= size and 0 <= y0 and y0 + h <= size
                       for _, x0, y0, w, h in boxes)

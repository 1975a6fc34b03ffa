"""REFER reader and the refer_seg source on a refs(unc).p pickle + instances.json fixture."""

import json
import os
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from m2sa_jax.data.refer import Refer, UnsafePickleError, load_plain_pickle
from m2sa_jax.data.sources.refer_seg import ReferSegSource, refer_seg_sources
from m2sa_jax.data.types import SEG_TOKEN

H, W = 20, 30


def _rle_string(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _write_refcoco(data_root, dataset="refcoco", split_by="unc"):
    """Two images, three refs (two train on image 1, one val on image 2), polygon and RLE masks."""
    square = np.zeros((H, W), bool)
    square[2:8, 3:12] = True
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": H, "width": W}],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "segmentation": [[10.0, 10.0, 20.0, 10.0, 20.0, 18.0, 10.0, 18.0]],
             "area": 80.0, "bbox": [10, 10, 10, 8], "iscrowd": 0},
            {"id": 102, "image_id": 1, "category_id": 2, "segmentation": _rle_string(square), "area": 54.0,
             "bbox": [3, 2, 9, 6], "iscrowd": 1},
            {"id": 201, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]], "area": 25.0,
             "bbox": [0, 0, 5, 5], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 2, "name": "dog", "supercategory": "animal"}],
    }

    def sent(i, text):
        return {"tokens": text.split(), "raw": text, "sent_id": i, "sent": text}

    refs = [
        {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000001_101.jpg", "ann_id": 101, "ref_id": 0,
         "image_id": 1, "split": "train", "sentences": [sent(0, "man on the left"), sent(1, "left guy")], "category_id": 1},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000000001_102.jpg", "ann_id": 102, "ref_id": 1,
         "image_id": 1, "split": "train", "sentences": [sent(2, "brown dog")], "category_id": 2},
        {"sent_ids": [3], "file_name": "COCO_train2014_000000000002_201.jpg", "ann_id": 201, "ref_id": 2,
         "image_id": 2, "split": "val", "sentences": [sent(3, "person top corner")], "category_id": 1},
    ]
    d = os.path.join(data_root, dataset)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"refs({split_by}).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the released files are Python 2 pickles
    with open(os.path.join(d, "instances.json"), "w") as f:
        json.dump(instances, f)
    return square


def test_refer_index_and_masks(tmp_path):
    data_root = str(tmp_path / "refer_seg")
    square = _write_refcoco(data_root)
    refer = Refer(data_root, "refcoco")
    assert refer.refs_file.endswith("refcoco/refs(unc).p")
    assert refer.ref_ids("train") == [0, 1] and refer.ref_ids("val") == [2]
    assert refer.image_ids([0, 1, 2]) == [1, 2]
    assert refer.image_path(1).endswith("refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg")
    np.testing.assert_array_equal(refer.mask(102).decode(), square)
    polygon = refer.mask(101).decode()
    expected = mask_utils.decode(mask_utils.frPyObjects([[10.0, 10.0, 20.0, 10.0, 20.0, 18.0, 10.0, 18.0]], H, W)).sum(2) > 0
    np.testing.assert_array_equal(polygon, expected)
    val = list(refer.eval_samples("val"))
    assert len(val) == 1 and val[0].questions == ["person top corner"] and val[0].answers == ["[SEG]."]
    corner = mask_utils.decode(mask_utils.frPyObjects([[0, 0, 5, 0, 5, 5, 0, 5]], H, W)).sum(2) > 0
    np.testing.assert_array_equal(val[0].masks[0][0].decode(), corner)


def test_refer_seg_source_pools_sentences(tmp_path):
    root = str(tmp_path)
    square = _write_refcoco(os.path.join(root, "refer_seg"))
    (src,) = refer_seg_sources(root, names=("refcoco",))
    assert isinstance(src, ReferSegSource) and len(src) == 1  # only image 1 has train refs
    for seed in range(10):
        s = src.sample(0, np.random.default_rng(seed))
        labels = sorted(m.label for ms in s.masks for m in ms)
        assert labels == ["brown dog", "left guy", "man on the left"]
        assert sum(a.count(SEG_TOKEN) for a in s.answers) == 3
        for ms, a in zip(s.masks, s.answers):
            assert a.count(SEG_TOKEN) == len(ms)
        masks = {m.label: m.decode() for ms in s.masks for m in ms}
        np.testing.assert_array_equal(masks["brown dog"], square)
        np.testing.assert_array_equal(masks["left guy"], masks["man on the left"])


def test_refs_pickle_with_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data_root = tmp_path / "refer_seg"
    _write_refcoco(str(data_root))
    refs_file = data_root / "refcoco" / "refs(unc).p"
    refs_file.write_bytes(pickle.dumps([{"ref_id": 0, "x": Exploit()}], protocol=2))
    with pytest.raises(UnsafePickleError) as e:
        Refer(str(data_root), "refcoco")
    assert "refs(unc).p" in str(e.value) and "system" in str(e.value)
    assert not marker.exists()

    class Evaluator:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    refs_file.write_bytes(pickle.dumps(Evaluator(), protocol=4))
    with pytest.raises(UnsafePickleError):
        load_plain_pickle(str(refs_file))
    assert not marker.exists()
    refs_file.write_bytes(pickle.dumps([{"a": (1, 2.5, "s", b"b", {3}), "b": [None, True]}], protocol=2))
    assert load_plain_pickle(str(refs_file)) == [{"a": (1, 2.5, "s", b"b", {3}), "b": [None, True]}]

"""A dataset root in the documented layout (docs/datasets.md) with one tiny image per training
source: the sem_seg group (ADE20K, COCO-Stuff, Mapillary Vistas v2.0, PACO-LVIS, PASCAL-Part),
the refer_seg group (RefCLEF, RefCOCO, RefCOCO+, RefCOCOg), vqa (LLaVA-Instruct) and MMR, each
in its upstream file format."""

import json
import os
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

DATASET_HW = (8, 12)
DATASET_POLYGON = [[0.0, 0.0, 6.0, 0.0, 6.0, 6.0, 0.0, 6.0]]
# Larger than the canvas the mixture tests train with (16 × 16), as Mapillary's photos are
# larger than the paper's 1024 × 1024 mask canvas.
MAPILLARY_HW = (24, 40)
MAPILLARY_LABELS = ("Bird", "Road", "Pole", "Sky")      # config_v2.0.json "readable" names
# Every source the paper's mixture draws from, by group (configs/m2sa_7b.py's lists).
SOURCES = {"sem_seg": ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary"),
           "refer_seg": ("refclef", "refcoco", "refcoco+", "refcocog"),
           "vqa": ("vqa",), "mmr": ("mmr",)}


def _refs(image_id, ann_id, sentence):
    return pickle.dumps([{
        "ref_id": 0, "ann_id": ann_id, "image_id": image_id, "split": "train", "category_id": 1,
        "sentences": [{"sent": sentence, "sent_id": 0, "tokens": sentence.split()}]}], protocol=2)


def _instances(image_id, file_name, ann_id, h, w, category="person"):
    return {"images": [{"id": image_id, "file_name": file_name, "height": h, "width": w}],
            "annotations": [{"id": ann_id, "image_id": image_id, "category_id": 1,
                             "segmentation": DATASET_POLYGON, "area": 36.0,
                             "bbox": [0.0, 0.0, 6.0, 6.0], "iscrowd": 0}],
            "categories": [{"id": 1, "name": category}]}


def _coco_parts(file_name, h, w, categories):
    """A COCO-format part file (PACO-LVIS / PASCAL-Part): one image, one polygon per category."""
    return {"images": [{"id": 7, "file_name": file_name, "height": h, "width": w}],
            "annotations": [{"id": 70 + i, "image_id": 7, "category_id": i + 1,
                             "segmentation": DATASET_POLYGON, "area": 36.0,
                             "bbox": [0.0, 0.0, 6.0, 6.0], "iscrowd": 0}
                            for i in range(len(categories))],
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)]}


def write_dataset_root(root):
    """One image per source in the documented layout (docs/datasets.md), annotations and image
    files; every image ``DATASET_HW`` pixels except Mapillary's (``MAPILLARY_HW``)."""
    h, w = DATASET_HW

    def put(path, data=None, image=None):
        path = root / path
        os.makedirs(path.parent, exist_ok=True)
        if image is not None:
            image.save(path) if isinstance(image, Image.Image) else Image.fromarray(image).save(path)
        else:
            path.write_text(json.dumps(data)) if not isinstance(data, bytes) else path.write_bytes(data)

    rgb = np.zeros((h, w, 3), np.uint8)
    # sem_seg
    put("ade20k/images/training/a.jpg", image=rgb)
    put("ade20k/annotations/training/a.png", image=np.full((h, w), 3, np.uint8))
    put("coco/train2017/000000000002.jpg", image=rgb)
    stuff = np.full((h, w), 255, np.uint8)
    stuff[:4] = 0                                                          # person
    put("cocostuff/train2017/000000000002.png", image=stuff)
    mh, mw = MAPILLARY_HW
    put("mapillary/config_v2.0.json", {"labels": [
        {"name": f"object--{n.lower()}", "readable": n, "color": [10 * i, 20, 30],
         "instances": False, "evaluate": True} for i, n in enumerate(MAPILLARY_LABELS)]})
    put("mapillary/training/images/m1.jpg", image=np.zeros((mh, mw, 3), np.uint8))
    label = np.full((mh, mw), 3, np.uint8)                                  # sky
    label[mh // 2:] = 1                                                     # road
    label[4:, 20:22] = 2                                                    # a pole
    palette = Image.frombytes("P", (mw, mh), label.tobytes())              # v2.0 labels: 8-bit palette
    palette.putpalette([c for i in range(len(MAPILLARY_LABELS)) for c in (10 * i, 20, 30)])
    put("mapillary/training/v2.0/labels/m1.png", image=palette)
    put("coco/train2017/000000000003.jpg", image=rgb)
    put("vlpart/paco/annotations/paco_lvis_v1_train.json",
        _coco_parts("train2017/000000000003.jpg", h, w, ["mug", "mug:handle"]))
    put("vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000003.jpg", image=rgb)
    put("vlpart/pascal_part/train.json", _coco_parts("2008_000003.jpg", h, w, ["dog:head"]))
    # refer_seg
    put("refer_seg/refcoco/instances.json",
        _instances(1, "COCO_train2014_000000000001.jpg", 5, h, w))
    put("refer_seg/refcoco/refs(unc).p", _refs(1, 5, "the person"))
    put("refer_seg/refcoco+/instances.json",
        _instances(1, "COCO_train2014_000000000001.jpg", 6, h, w))
    put("refer_seg/refcoco+/refs(unc).p", _refs(1, 6, "person on the left"))
    put("refer_seg/refcocog/instances.json",
        _instances(1, "COCO_train2014_000000000001.jpg", 8, h, w))
    put("refer_seg/refcocog/refs(umd).p", _refs(1, 8, "a person standing by the wall"))
    put("refer_seg/refclef/instances.json", _instances(25262, "25/images/25262.jpg", 9, h, w, "man"))
    put("refer_seg/refclef/refs(unc).p", _refs(25262, 9, "man in blue"))
    put("refer_seg/images/saiapr_tc-12/25/images/25262.jpg", image=rgb)
    put("refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg", image=rgb)
    # vqa
    put("llava_dataset/llava_instruct_150k.json", [{"id": "1", "image": "1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A test."}]}])
    put("coco/train2017/1.jpg", image=rgb)
    # mmr
    rle = mask_utils.encode(np.asfortranarray(np.ones((h, w), np.uint8)))
    put("refer_seg/images/mscoco/images/train2014/x.jpg", image=rgb)
    put("MMR/MMR_train.json", [{
        "file_name": "train2014/x.jpg", "height": h, "width": w, "image_id": 9,
        "not_exhaustive_category_ids": [], "neg_category_ids": [], "coco_url": "",
        "questions": ["What holds the coffee?"],
        "answers": [[{"bbox": [0, 0, w, h], "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                      "image_id": 9, "category_name": "mug", "category_id": 1, "sorted_category_id": 1}]],
        "text_answers": ["The mug {seg}."], "raw_answers": ["The mug."]}])

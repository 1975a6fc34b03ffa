"""A dataset root in the documented layout (docs/datasets.md) with one tiny image per training
group: ADE20K (sem_seg), RefCOCO (refer_seg), LLaVA-Instruct (vqa) and MMR."""

import json
import os
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

DATASET_HW = (8, 12)
DATASET_POLYGON = [[0.0, 0.0, 6.0, 0.0, 6.0, 6.0, 0.0, 6.0]]


def write_dataset_root(root):
    """One image per group in the documented layout (docs/datasets.md): ADE20K, RefCOCO,
    LLaVA-Instruct and MMR, annotations and image files, each ``DATASET_HW`` pixels."""
    h, w = DATASET_HW

    def put(path, data=None, image=None):
        path = root / path
        os.makedirs(path.parent, exist_ok=True)
        if image is not None:
            Image.fromarray(image).save(path)
        else:
            path.write_text(json.dumps(data)) if not isinstance(data, bytes) else path.write_bytes(data)

    rgb = np.zeros((h, w, 3), np.uint8)
    put("ade20k/images/training/a.jpg", image=rgb)
    put("ade20k/annotations/training/a.png", image=np.full((h, w), 3, np.uint8))
    put("refer_seg/refcoco/instances.json", {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": h, "width": w}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": DATASET_POLYGON}],
        "categories": [{"id": 1, "name": "person"}]})
    put("refer_seg/refcoco/refs(unc).p", pickle.dumps([{
        "ref_id": 0, "ann_id": 5, "image_id": 1, "split": "train", "category_id": 1,
        "sentences": [{"sent": "the person", "sent_id": 0, "tokens": ["the", "person"]}]}], protocol=2))
    put("llava_dataset/llava_instruct_150k.json", [{"id": "1", "image": "1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A test."}]}])
    rle = mask_utils.encode(np.asfortranarray(np.ones((h, w), np.uint8)))
    put("refer_seg/images/mscoco/images/train2014/x.jpg", image=rgb)
    put("refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg", image=rgb)
    put("coco/train2017/1.jpg", image=rgb)
    put("MMR/MMR_train.json", [{
        "file_name": "train2014/x.jpg", "height": h, "width": w, "image_id": 9,
        "not_exhaustive_category_ids": [], "neg_category_ids": [], "coco_url": "",
        "questions": ["What holds the coffee?"],
        "answers": [[{"bbox": [0, 0, w, h], "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                      "image_id": 9, "category_name": "mug", "category_id": 1, "sorted_category_id": 1}]],
        "text_answers": ["The mug {seg}."], "raw_answers": ["The mug."]}])

"""MMR as a TFDS dataset, written as array_record so any host can read any record by index.

Manual download (``manual_dir``)::

    MMR_train.json  MMR_val.json  MMR_test_mixed.json  MMR_test_obj_only.json  MMR_test_part_only.json
    images/         the COCO images, found by each record's ``file_name``

Storage choices:
- ``image``: the image file's own bytes (JPEG as downloaded), not re-encoded: no quality
  loss, about the size of the source folder, and decoding stays in the loader's workers
  (PIL). Re-encoding would need TensorFlow and would change pixels.
- ``record_json``: the MMR JSON record verbatim (questions, text/raw answers, annotations
  with their masks as COCO compressed-RLE strings, a few hundred bytes each). Keeping the
  record whole means the MMR reader turns a stored example into a Sample exactly as it turns
  a JSON record into one, and nothing of the source is lost.
- ``file_name``, ``image_id``, ``height``, ``width``: duplicated as scalars for filtering.

Only numpy-backed features are used, so building and reading work without TensorFlow.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

SPLIT_FILES = {
    "train": "MMR_train.json",
    "val": "MMR_val.json",
    "test_mixed": "MMR_test_mixed.json",
    "test_obj_only": "MMR_test_obj_only.json",
    "test_part_only": "MMR_test_part_only.json",
}

_REQUIRED = ("file_name", "height", "width", "image_id", "questions", "answers", "text_answers")


class Mmr(tfds.core.GeneratorBasedBuilder):
    """MMR: multi-target, multi-granularity reasoning segmentation (ICLR 2025)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images as original bytes, records as verbatim JSON."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put MMR_train.json, MMR_val.json, MMR_test_mixed.json, MMR_test_obj_only.json and "
        "MMR_test_part_only.json in manual_dir, and the COCO images they name (file_name) in "
        "manual_dir/images (or pass image_dir=...)."
    )

    def __init__(self, *, image_dir: str | None = None, splits: tuple[str, ...] | None = None, **kwargs):
        self._image_dir = image_dir
        self._only_splits = splits
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "file_name": tfds.features.Text(),
                "image_id": np.int64,
                "height": np.int32,
                "width": np.int32,
                "record_json": tfds.features.Text(),
            }),
            description="MMR reasoning-segmentation records with their COCO images.",
            disable_shuffling=True,  # example i of a split is record i of its json file
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        image_dir = self._image_dir or os.path.join(manual, "images")
        splits = self._only_splits or tuple(SPLIT_FILES)
        return {s: self._generate_examples(os.path.join(manual, SPLIT_FILES[s]), image_dir) for s in splits}

    def _generate_examples(self, json_path: str, image_dir: str):
        if not os.path.exists(json_path):
            raise FileNotFoundError(f"{json_path}: missing; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        with open(json_path) as f:
            records = json.load(f)
        name = os.path.basename(json_path)
        for i, record in enumerate(records):
            missing = [k for k in _REQUIRED if k not in record]
            if missing:
                raise ValueError(f"{name} record {i}: missing {missing}; is this an MMR json file?")
            file_name = record["file_name"]
            if not isinstance(file_name, str) or os.path.isabs(file_name) or ".." in file_name.replace("\\", "/").split("/"):
                raise ValueError(f"{name} record {i}: file_name {file_name!r} is not a path inside the images folder")
            image_path = os.path.join(image_dir, file_name)
            try:
                with open(image_path, "rb") as f:
                    image = f.read()
            except OSError as e:
                raise FileNotFoundError(f"{name} record {i}: image {image_path} unreadable ({e}); put the COCO images in {image_dir}") from e
            yield f"{i:08d}", {
                "image": image,
                "file_name": record["file_name"],
                "image_id": int(record["image_id"]),
                "height": int(record["height"]),
                "width": int(record["width"]),
                "record_json": json.dumps(record, ensure_ascii=False, separators=(",", ":")),
            }


def data_source(data_dir: str, split: str):
    """Random-access, picklable view of a built split (what the loader reads)."""
    return Mmr(data_dir=data_dir, file_format="array_record").as_data_source(split=split)


def decode_example(example: dict[str, Any]) -> tuple[dict, bytes]:
    """A stored example → (the MMR JSON record, the encoded image bytes)."""
    text = example["record_json"]
    record = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    return record, bytes(example["image"])

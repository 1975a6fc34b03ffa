"""MMR TFDS builder: build a fixture MMR folder to array_record (no TensorFlow), read back
identical records, and load them through the resumable loader."""

import io
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from m2sa_jax.data.loader import Loader
from m2sa_jax.data.tfds_mmr import SPLIT_FILES, Mmr, data_source, decode_example
from m2sa_jax.data.tfds_mmr.__main__ import main as tfds_mmr_main
from m2sa_jax.data.types import BadRecord


def _annotation(mask, image_id, name, cat_id):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
            "image_id": image_id, "category_name": name, "category_id": cat_id, "sorted_category_id": cat_id}


def _record(i, split, h, w):
    a = np.zeros((h, w), bool)
    a[: h // 2, : w // 3] = True
    b = np.zeros((h, w), bool)
    b[h // 2:, w // 2:] = True
    image_id = 1000 * list(SPLIT_FILES).index(split) + i
    return {
        "file_name": f"{split}_{i:012d}.jpg", "height": h, "width": w, "image_id": image_id,
        "not_exhaustive_category_ids": [], "neg_category_ids": [3, 4],
        "coco_url": f"http://images.cocodataset.org/train2017/{split}_{i:012d}.jpg",
        "questions": [f"Which item could hold coffee? ({split} {i})", "What part would you grab?"],
        "answers": [[_annotation(a, image_id, "mug", 1)], [_annotation(a, image_id, "mug:handle", 2), _annotation(b, image_id, "cup:handle", 3)]],
        "text_answers": ["The mug {seg} holds coffee.", "The mug's handle {seg} and the cup's handle {seg}."],
        "raw_answers": ["The mug [mug] holds coffee.", "The mug's handle [mug:handle] and the cup's handle [cup:handle]."],
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    manual = tmp_path_factory.mktemp("manual")
    os.makedirs(manual / "images")
    records = {}
    for split, file in SPLIT_FILES.items():
        records[split] = [_record(i, split, 10 + i, 14 + 2 * i) for i in range(3 if split != "train" else 6)]
        for i, r in enumerate(records[split]):
            pixels = np.random.default_rng(i).integers(0, 255, (r["height"], r["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(manual / "images" / r["file_name"], quality=90)
        with open(manual / file, "w") as f:
            json.dump(records[split], f)
    # one image that is not an image: stored as bytes, skipped by the loader's decode
    (manual / "images" / records["train"][4]["file_name"]).write_bytes(b"not a jpeg")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    Mmr(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return data_dir, str(manual), records


def test_splits_are_array_record_files(built):
    data_dir, _, records = built
    files = os.listdir(os.path.join(data_dir, "mmr", "1.0.0"))
    for split in SPLIT_FILES:
        assert any(f.startswith(f"mmr-{split}.array_record-") for f in files), files
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow


def test_records_read_back_identical_in_file_order(built):
    data_dir, manual, records = built
    for split in SPLIT_FILES:
        ds = data_source(data_dir, split)
        assert len(ds) == len(records[split])
        for i in range(len(ds)):
            example = ds[i]
            record, image = decode_example(example)
            assert record == records[split][i]
            with open(os.path.join(manual, "images", record["file_name"]), "rb") as f:
                assert image == f.read()  # the original bytes, not re-encoded
            assert int(example["image_id"]) == record["image_id"]
            assert (int(example["height"]), int(example["width"])) == (record["height"], record["width"])
            counts = record["answers"][1][1]["segmentation"]
            decoded = mask_utils.decode({"size": counts["size"], "counts": counts["counts"].encode()})
            assert decoded.shape == (record["height"], record["width"])


def decode_for_training(example):
    """What a pipeline does with a stored example: pixels + masks (here without tokenising)."""
    record, image = decode_example(example)
    try:
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))  # [H, W, 3]
    except OSError as e:
        raise BadRecord("corrupt_image", f"MMR record {record['image_id']} ({record['file_name']}): {e}") from e
    masks = [[mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
              for a in answer] for answer in record["answers"]]
    return record["image_id"], pixels.shape, [len(m) for m in masks]


def test_loader_over_built_split_resumes_and_skips(built):
    data_dir, _, records = built
    make = lambda: Loader(data_source(data_dir, "train"), seed=7, transform=decode_for_training, num_epochs=2)  # noqa: E731
    full = list(make())
    assert len(full) == 2 * (len(records["train"]) - 1)
    assert {image_id for image_id, _, _ in full} == {r["image_id"] for j, r in enumerate(records["train"]) if j != 4}
    assert all(counts == [1, 2] for _, _, counts in full)
    it = iter(make())
    head = [next(it) for _ in range(4)]
    fresh = iter(make())
    fresh.set_state(it.get_state())
    rest = list(fresh)
    assert head + rest == full
    assert fresh.skipped == {"corrupt_image": 2}
    hosts = [list(Loader(data_source(data_dir, "val"), seed=1, shard_index=h, shard_count=2, num_epochs=1,
                         transform=decode_for_training)) for h in range(2)]
    assert sorted(x[0] for h in hosts for x in h) == sorted(r["image_id"] for r in records["val"])


def test_missing_split_file_names_the_fix(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="MMR_val.json"):
        Mmr(data_dir=str(tmp_path / "out"), file_format="array_record", splits=("val",)).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path)))


def test_command_line_builds_chosen_splits(built, tmp_path, capsys):
    _, manual, records = built
    tfds_mmr_main(["--manual_dir", manual, "--data_dir", str(tmp_path), "--splits",
                   "test_part_only"])
    assert "test_part_only 3" in capsys.readouterr().out
    ds = data_source(str(tmp_path), "test_part_only")
    assert [decode_example(ds[i])[0] for i in range(len(ds))] == records["test_part_only"]


def test_file_name_leaving_the_images_folder_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.txt").write_text("not for the dataset")
    record = _record(0, "val", 10, 14)
    record["file_name"] = "../secret.txt"
    (tmp_path / "MMR_val.json").write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=r"MMR_val.json record 0: file_name '../secret.txt'"):
        Mmr(data_dir=str(tmp_path / "out"), file_format="array_record", splits=("val",)).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path)))

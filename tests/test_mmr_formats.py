"""``data.mmr_format``: MMR's training split read from the released JSON file or from the
array_record split built beside it (``python -m m2sa_jax.data.tfds_mmr``) gives the same
samples in the same order, bad and no-target records included, and the same training batches
(``data.kind = "mmr"`` and the mixture's MMR group). On two simulated hosts each reads only
its own share of the records (docs/training.md, "Several hosts"): none read twice, none
dropped."""

import collections
import json
import os
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from m2sa_jax import config_file
from m2sa_jax.data import benchmarks, mmr, pipeline
from m2sa_jax.data.mixed import MixedSource
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tfds_mmr import Mmr
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.data.train_stream import StreamConfig, TrainStream
from m2sa_jax.data.types import BadRecord
from m2sa_jax.evaluation import run, teacher_forced
from m2sa_jax.training import loop, setup
from tests.support import CONFIGS, llama_vocab, train_tiny
from tests.test_mmr import H, W, ann, box_mask, good_record, record, rle_string

N_GOOD = 5


def _records():
    out = [good_record(image_id=10 + i, file_name=f"train2017/{i}.jpg") for i in range(N_GOOD)]
    # a {seg} count that differs from the masks: refused in both formats, at the same index
    out.insert(2, record(30, "train2017/bad.jpg", ["Where is the handle?"],
                        [[ann(rle_string(box_mask(2, 8, 3, 9)), "mug:handle")]],
                        ["The handle {seg} and the rim {seg}."]))
    # an answer without a target (read with data.allow_no_target)
    out.append(record(31, "train2017/none.jpg", ["Which animal has a long neck?"], [[]],
                      ["There is no giraffe in the image."]))
    return out


@pytest.fixture(scope="module")
def mmr_dir(tmp_path_factory):
    """root/MMR with MMR_train.json and, built into the same folder, its array_record split;
    images (random pixels, JPEG) under root/images."""
    root = tmp_path_factory.mktemp("mmr_formats")
    folder, images = root / "MMR", root / "images"
    records = _records()
    for i, r in enumerate(records):
        path = images / r["file_name"]
        os.makedirs(path.parent, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    os.makedirs(folder)
    (folder / "MMR_train.json").write_text(json.dumps(records))
    (folder / "MMR_val.json").write_text(json.dumps(records[::-1]))
    Mmr(data_dir=str(folder), file_format="array_record", image_dir=str(images),
        splits=("train", "val")).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))
    return str(folder), str(images)


def _outcome(dataset, index):
    try:
        s = dataset.sample(index, np.random.default_rng(index))
    except BadRecord as e:
        return ("bad", e.reason, e.source, e.record)
    masks = [[(r.label, r.kind, r.decode().tobytes()) for r in refs] for refs in s.masks]
    return (s.source, s.record_id, s.questions, s.answers, masks, s.height, s.width,
            s.extra["question_index"])


def test_both_formats_give_the_same_samples_in_the_same_order(mmr_dir):
    folder, images = mmr_dir
    json_split = mmr.training_split(folder, images, "train", fmt="json", allow_no_target=True)
    array_split = mmr.training_split(folder, images, "train", fmt="array_record",
                                     allow_no_target=True)
    assert len(json_split) == len(array_split) == N_GOOD + 2
    got_json = [_outcome(json_split, i) for i in range(len(json_split))]
    got_array = [_outcome(array_split, i) for i in range(len(array_split))]
    assert got_json == got_array
    assert got_json[2][:2] == ("bad", "seg_count")
    assert got_json[-1][4] == [[]]                                   # the no-target answer
    # the pixels too: one from the file, one from the bytes stored in the split
    tok = LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder(),
                                               model_max_length=512)
    for i in (0, N_GOOD):
        a, b = (pipeline.prepare_example(d.sample(i, np.random.default_rng(i)), tok, sam_size=64,
                                         clip_size=32) for d in (json_split, array_split))
        np.testing.assert_array_equal(a.sam_image, b.sam_image)
        np.testing.assert_array_equal(a.clip_image, b.clip_image)
    with pytest.raises(ValueError, match="json.*array_record"):
        mmr.training_split(folder, images, "train", fmt="tfrecord")
    with pytest.raises(FileNotFoundError, match="tfds_mmr.*data.mmr_format=json"):
        mmr.training_split(images, images, "train", fmt="array_record")


def test_eval_reads_either_format_from_the_data_config(mmr_dir):
    """eval.py's MMR reader: the same evaluation samples from both formats; with a training
    config and no eval.mmr_root, from data.mmr_root in data.mmr_format."""
    folder, images = mmr_dir

    def view(samples):
        return [(s.record_id, s.questions, s.answers, s.extra.get("eval_questions"),
                 s.extra.get("eval_answers"),
                 [[r.decode().tobytes() for r in refs] for refs in s.masks]) for s in samples]

    want, want_skips = benchmarks.mmr(folder, images, "val", allow_no_target=True)
    got, got_skips = benchmarks.mmr(folder, "", "val", fmt="array_record", allow_no_target=True)
    assert view(got) == view(want) and len(want) == N_GOOD + 1
    assert dict(got_skips.counts) == dict(want_skips.counts) == {"seg_count": 1}
    assert all(s.image_bytes for s in got) and not any(s.image_bytes for s in want)

    cfg = _config(folder, "", "mmr", "array_record")
    cfg.eval.dataset, cfg.eval.split = "mmr", "val"
    samples, skips = run.load_samples(cfg)
    assert view(samples) == view(want) and skips.total == 1
    # the training run's held-out split (its end-of-run evaluation), both formats alike
    held_out = {fmt: teacher_forced.held_out_samples(_config(folder, images, "mmr", fmt),
                                                     folder, images)
                for fmt in ("json", "array_record")}
    assert view(held_out["json"]) == view(held_out["array_record"])
    assert len(held_out["json"]) == N_GOOD + 1


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tok = LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder(),
                                               model_max_length=512)
    cfg = train_tiny.config(str(tmp_path_factory.mktemp("unused")))
    return tok, setup.model_config_from_sizes(cfg, tok.seg_token_id, len(tok))


def _config(folder, images, kind, fmt):
    cfg = config_file.load(os.path.join(CONFIGS, "m2sa_7b.py"))
    cfg.data.kind, cfg.data.mmr_format, cfg.data.allow_no_target = kind, fmt, True
    cfg.data.mmr_root, cfg.data.image_root = folder, images
    if kind == "mixture":            # the MMR group alone (groups with ratio 0 are not opened)
        cfg.data.root = os.path.dirname(folder)
        cfg.data.ratios = dict(sem_seg=0.0, refer_seg=0.0, vqa=0.0, mmr=1.0)
    cfg.data.images_per_batch, cfg.data.max_targets = 2, 3
    cfg.data.token_buckets, cfg.data.mask_hw = (256,), (32, 32)
    cfg.data.model_max_length, cfg.data.read_threads = 512, 1
    cfg.train.steps, cfg.train.grad_accum = 3, 1
    return cfg


@pytest.mark.parametrize("kind", ["mmr", "mixture"])
def test_training_batches_equal_across_formats(mmr_dir, tiny_model, kind):
    folder, images = mmr_dir
    tok, model_config = tiny_model
    batches, counts = {}, {}
    for fmt in ("json", "array_record"):
        cfg = _config(folder, images, kind, fmt)
        skips = SkipCounter()
        stream = loop._train_stream(cfg, model_config, tok, *loop.data_roots(cfg), skips,
                                    shard_index=0, shard_count=1)
        batches[fmt] = [next(stream) for _ in range(4)]
        counts[fmt] = skips.per_source()
    for want, got in zip(batches["json"], batches["array_record"]):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert counts["json"] == counts["array_record"]
    if kind == "mmr":                # 8 examples of 7 records: the bad one was drawn
        assert counts["json"] == {"mmr": {"seg_count": 1}}


class _Reads:
    """Records which items of a source are read (the reader itself is the real one)."""

    def __init__(self, source, method):
        self.source, self.method = source, method
        self.log = collections.Counter()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.source)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read(self, index, *args, **kwargs):
        with self._lock:
            self.log[index] += 1
        return getattr(self.source, self.method)(index, *args, **kwargs)

    def __getitem__(self, index):
        return self.read(index)

    def __repr__(self):                      # grain compares it when restoring: no address
        return f"Reads({len(self)})"


def _host_streams(tok, model_config, make_dataset, hosts=2, images=2):
    shapes = pipeline.BatchShapes(images=images, conversations=3 * images, token_buckets=(256,),
                                  max_targets=3, mask_hw=(32, 32))
    cfg = StreamConfig(shapes=shapes, sam_size=model_config.sam.img_size,
                       clip_size=model_config.llava.vision.image_size, max_length=512,
                       read_threads=2)
    out = []
    for host in range(hosts):
        dataset, reads = make_dataset()
        skips = SkipCounter()
        stream = TrainStream(dataset, tok, cfg, seed=5, epochs=1, skips=skips,
                             shard_index=host, shard_count=hosts)
        out.append((list(stream), reads.log, skips))
    return out


def test_two_hosts_each_read_their_own_share(mmr_dir, tiny_model):
    folder, images = mmr_dir
    tok, model_config = tiny_model

    def mmr_split():                         # data.kind = "mmr": the lazy MMR reader
        dataset = mmr.training_split(folder, images, "train", allow_no_target=True)
        dataset.lazy = reads = _Reads(dataset.lazy, "parse")
        dataset.lazy.parse = reads.read
        return dataset, reads

    hosts = _host_streams(tok, model_config, mmr_split)
    n = N_GOOD + 2
    for host, (batches, log, skips) in enumerate(hosts):
        # host h reads records h, h + 2, h + 4, ... once each, and nothing else
        assert dict(log) == {i: 1 for i in range(host, n, 2)}, (host, log)
        for b in batches:                    # its half of each global batch of 2 images
            assert b["sam_images"].shape[0] == 1 and b["input_ids"].shape[0] == 3
    assert sum(len(b) for b, _, _ in hosts) == n - 1       # every good record trained on
    assert hosts[0][2].per_source() == {"mmr": {"seg_count": 1}}     # record 2 is host 0's
    assert hosts[1][2].total == 0

    def mixture():                           # data.kind = "mixture": draws of the mixture
        mix = mmr.training_split(folder, images, "train", allow_no_target=True)
        reads = _Reads(MixedSource({"mmr": [mix]}, {"mmr": 1.0}, seed=2, draws_per_epoch=9),
                       "__getitem__")
        return reads, reads

    hosts = _host_streams(tok, model_config, mixture, images=2)
    logs = [log for _, log, _ in hosts]
    assert dict(logs[0]) == {i: 1 for i in range(0, 9, 2)}
    assert dict(logs[1]) == {i: 1 for i in range(1, 9, 2)}

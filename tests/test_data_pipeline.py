"""Sample → example → static-shape batches grouped by image, on the synthetic MMR data."""

import numpy as np
import pytest

from m2sa_jax.data import mmr, pipeline, preprocess, synthetic
from m2sa_jax.data.images import load_rgb
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tokenizer import IMAGE_TOKEN_INDEX, LegacyLlamaTokenizer
from m2sa_jax.data.types import IGNORE_INDEX
from tests.support import llama_vocab


@pytest.fixture(scope="module")
def tok():
    return LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    paths = synthetic.generate(str(out), 6, 0, seed=5, size=128)
    return mmr.MMRDataset(paths["train"], str(out / "images"), max_questions=3, prompt="train"), out


def test_example_contents(tok, data):
    ds, _ = data
    s = ds.sample(0, np.random.default_rng(0))
    ex = pipeline.prepare_example(s, tok, sam_size=256)
    image = load_rgb(s.image_path)
    sam, resized, original = preprocess.sam_preprocess(image, 256)
    np.testing.assert_array_equal(ex.sam_image, sam)
    np.testing.assert_array_equal(ex.clip_image, preprocess.clip_preprocess(image))
    assert ex.resized_hw == (256, 256) and ex.original_hw == (128, 128) == tuple(original)
    assert len(ex.conversations) == len(s.questions) == len(ex.masks)
    for conv, masks, refs in zip(ex.conversations, ex.masks, s.masks):
        assert conv.num_seg == len(masks) == len(refs)
        assert masks.dtype == bool and masks.shape[1:] == (128, 128)
        np.testing.assert_array_equal(masks[0], refs[0].decode())
        assert (conv.input_ids == IMAGE_TOKEN_INDEX).sum() == 1


def test_batches_have_static_shapes_and_group_by_image(tok, data):
    ds, _ = data
    rng = np.random.default_rng(0)
    skips = SkipCounter()
    samples = [ds.sample(i, rng) for i in range(len(ds))]
    examples = list(pipeline.iter_examples(samples, tok, skips, num_workers=2, sam_size=256))
    assert skips.total == 0 and [e.record_id for e in examples] == [s.record_id for s in samples]
    shapes = pipeline.BatchShapes(images=2, conversations=6, token_buckets=(96, 128, 256),
                                  max_targets=4, mask_hw=(128, 128))
    out = list(pipeline.batches(examples, shapes, tok.pad_token_id, skips))
    assert sum(int(b["image_valid"].sum()) for b in out) == len(examples)
    seen = 0
    for b in out:
        assert b["sam_images"].shape == (2, 256, 256, 3) and b["clip_images"].shape == (2, 224, 224, 3)
        t = b["input_ids"].shape[1]
        assert t in (96, 128, 256) and b["labels"].shape == b["attention_mask"].shape == (6, t)
        assert b["gt_masks"].shape == (6, 4, 128, 128) and b["target_valid"].shape == (6, 4)
        for c in range(6):
            if not b["conv_valid"][c]:
                assert not b["attention_mask"][c].any() and not b["target_valid"][c].any()
                assert (b["labels"][c] == IGNORE_INDEX).all()
                continue
            n_seg = int((b["input_ids"][c] == tok.seg_token_id).sum())
            assert n_seg == int(b["target_valid"][c].sum())
            assert b["image_valid"][b["conv_image_index"][c]]
            assert (b["input_ids"][c][~b["attention_mask"][c]] == tok.pad_token_id).all()
        # the conversations of one example point at the same, single image slot
        idx = b["conv_image_index"][b["conv_valid"]]
        assert list(idx) == sorted(idx)
        seen += int(b["conv_valid"].sum())
    assert seen == sum(len(e.conversations) for e in examples)


def test_examples_that_cannot_fit_are_counted(tok, data):
    ds, _ = data
    ex = pipeline.prepare_example(ds.sample(0, all_questions=True), tok, sam_size=128)
    skips = SkipCounter()
    tiny = pipeline.BatchShapes(images=1, conversations=2, token_buckets=(512,), max_targets=4,
                                mask_hw=(128, 128))
    assert list(pipeline.batches([ex], tiny, tok.pad_token_id, skips)) == []
    assert skips.counts["does_not_fit_batch"] == 1


def test_bad_samples_are_skipped_in_the_stream(tok, data, tmp_path):
    ds, _ = data
    good = ds.sample(0, np.random.default_rng(0))
    bad_image = ds.sample(1, np.random.default_rng(0))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad_image.image_path = str(corrupt)
    too_long = ds.sample(2, np.random.default_rng(0))
    too_long.answers[0] += " very" * 1800                   # > model_max_length 2048 with the image
    skips = SkipCounter()
    out = list(pipeline.iter_examples([good, bad_image, too_long], tok, skips))
    assert [e.record_id for e in out] == [good.record_id]
    assert dict(skips.counts) == {"corrupt_image": 1, "too_long": 1}

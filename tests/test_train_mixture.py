"""The paper configs' input: ``data.kind = "mixture"`` streams the 2:9:2:6 training mixture
through the training loop's own stream builder, in fixed shapes, resumably.

The dataset root is test_mixed's one-image-per-group fixture; the paper config (M²SA-7B) is
shrunk only in its batch shapes, and the model config, whose image sizes the stream needs, is
the tiny synthetic one (no weights are built).
"""

import collections
import dataclasses
import os

import numpy as np
import pytest

from m2sa_jax import config_file
from m2sa_jax.data import mixed, pipeline
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.data.train_stream import StreamConfig, TrainStream
from m2sa_jax.evaluation import run
from m2sa_jax.training import loop, setup
from tests.support import CONFIGS, llama_vocab, train_tiny
from tests.support.dataset_root import DATASET_HW, MAPILLARY_HW, SOURCES, write_dataset_root

IMAGES = 2                       # per batch
QUESTIONS = 3                    # per image (the paper's)
TARGETS = 3
BUCKET = 256
MASK_HW = (16, 16)               # ≥ the fixture's 8 × 12 images
# one phrase of each group's only record, as it appears in the tokenised conversation
GROUP_TEXT = {"sem_seg": "sky", "refer_seg": "the person", "vqa": "What is it?",
              "mmr": "What holds the coffee?"}


def _paper_config(root, **data):
    cfg = config_file.load(os.path.join(CONFIGS, "m2sa_7b.py"))
    assert cfg.data.kind == "mixture" and dict(cfg.data.ratios) == dict(
        sem_seg=2.0, refer_seg=9.0, vqa=2.0, mmr=6.0)
    cfg.data.root = str(root)
    cfg.data.sem_seg, cfg.data.refer_seg = ("ade20k",), ("refcoco",)
    cfg.data.images_per_batch, cfg.data.max_targets = IMAGES, TARGETS
    cfg.data.token_buckets, cfg.data.mask_hw = (BUCKET,), MASK_HW
    cfg.data.model_max_length, cfg.data.read_threads = 512, 1
    cfg.train.steps, cfg.train.grad_accum = 6, 1
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset_root")
    write_dataset_root(root)
    tok = LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder(),
                                               model_max_length=512)
    model_config = setup.model_config_from_sizes(train_tiny.config(str(root / "unused")),
                                                 tok.seg_token_id, len(tok))
    return root, tok, model_config


def _stream(cfg, tok, model_config, skips=None):
    root, images = loop.data_roots(cfg)
    return loop._train_stream(cfg, model_config, tok, root, images, skips or SkipCounter(),
                              shard_index=0, shard_count=1)


def _groups(batch, tok):
    found = set()
    for ids, valid in zip(batch["input_ids"], batch["conv_valid"]):
        if valid:
            text = tok.decode([int(t) for t in ids if t >= 0])
            found |= {g for g, phrase in GROUP_TEXT.items() if phrase in text}
    return found


def test_mixture_batches_shapes_groups_and_resume(setting):
    root, tok, model_config = setting
    cfg = _paper_config(root)
    assert loop.data_roots(cfg) == (f"{root}/MMR", f"{root}/refer_seg/images/mscoco/images")
    skips = SkipCounter()
    stream = _stream(cfg, tok, model_config, skips)
    first, second = next(stream), next(stream)
    sam, clip = model_config.sam.img_size, model_config.llava.vision.image_size
    conv = IMAGES * QUESTIONS
    for batch in (first, second):
        assert batch["sam_images"].shape == (IMAGES, sam, sam, 3)
        assert batch["clip_images"].shape == (IMAGES, clip, clip, 3)
        assert batch["input_ids"].shape == (conv, BUCKET)
        assert batch["gt_masks"].shape == (conv, TARGETS, *MASK_HW)
        assert batch["image_valid"].all()
        assert (batch["original_hw"] == DATASET_HW).all()
        assert batch["conv_valid"].any()
    state = stream.get_state()
    rest = [next(stream) for _ in range(3)]
    groups = set().union(*(_groups(b, tok) for b in (first, second, *rest)))
    assert len(groups) > 1, groups             # 10 draws, not all from one group
    assert skips.total == 0, dict(skips.counts)

    # a fresh stream starts over (at `first`); resumed, it continues with `rest`
    assert any(not np.array_equal(first[k], rest[0][k]) for k in first)
    resumed = _stream(cfg, tok, model_config)
    resumed.set_state(state)
    for want in rest[:2]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_mmr_kind_and_unknown_kind(setting):
    root, tok, model_config = setting
    cfg = _paper_config(root, kind="mmr", mmr_root=f"{root}/MMR",
                        image_root=f"{root}/refer_seg/images/mscoco/images")
    batch = next(_stream(cfg, tok, model_config))
    assert _groups(batch, tok) == {"mmr"} and batch["target_valid"].any()

    cfg = _paper_config(root, kind="coco")
    with pytest.raises(ValueError, match="'coco'.*synthetic.*mmr.*mixture"):
        _stream(cfg, tok, model_config)
    with pytest.raises(ValueError, match="data.root"):
        _stream(_paper_config(""), tok, model_config)


def test_every_source_of_the_paper_mix_draws_and_trains(setting):
    """10,000 draws of the paper config's mixture over a root holding every source: each
    source's share is within 4σ of the declared mix (group ratio ÷ members), and one draw of
    each, Mapillary's larger-than-the-canvas image included, goes through the training stream
    without a skip."""
    root, tok, model_config = setting
    cfg = _paper_config(root)
    cfg.data.sem_seg, cfg.data.refer_seg = SOURCES["sem_seg"], SOURCES["refer_seg"]
    paper = config_file.load(os.path.join(CONFIGS, "m2sa_7b.py"))
    assert (tuple(paper.data.sem_seg), tuple(paper.data.refer_seg)) == (
        SOURCES["sem_seg"], SOURCES["refer_seg"])
    n = 10_000
    mix = mixed.training_mixture(str(root), seed=3, draws_per_epoch=n, ratios=dict(cfg.data.ratios),
                                 sem_seg=cfg.data.sem_seg, refer_seg=cfg.data.refer_seg)
    samples = [mix[i] for i in range(n)]                       # draws only: no image decoded
    assert not any(s.skip_events for s in samples)
    counts = collections.Counter(s.source for s in samples)
    total = sum(cfg.data.ratios.values())
    for group, members in SOURCES.items():
        for source in members:
            p = cfg.data.ratios[group] / total / len(members)
            sigma = np.sqrt(n * p * (1 - p))
            assert abs(counts[source] - n * p) < 4 * sigma, (source, counts[source], n * p, sigma)
    assert set(counts) == {s for members in SOURCES.values() for s in members}

    first = {}
    for s in samples:
        first.setdefault(s.source, s)
    order = sorted(first)
    shapes = dataclasses.replace(loop.batch_shapes(cfg), images=1, conversations=QUESTIONS)
    skips = SkipCounter()
    stream = TrainStream(
        [first[name] for name in order], tok,
        StreamConfig(shapes=shapes, sam_size=model_config.sam.img_size,
                     clip_size=model_config.llava.vision.image_size, max_length=512,
                     read_threads=1),
        seed=0, epochs=1, skips=skips, shard_index=0, shard_count=1)
    batches = list(stream)
    assert len(batches) == len(order) and skips.total == 0, skips.summary()
    seen = {tuple(b["original_hw"][0]) for b in batches}
    grid = pipeline.grid_hw(MAPILLARY_HW, MASK_HW)
    assert seen == {DATASET_HW, grid} and grid == (10, 16)        # Mapillary: on the 10 × 16 grid
    (mapillary,) = [b for b in batches if tuple(b["original_hw"][0]) == grid]
    assert mapillary["gt_masks"].dtype == np.uint8 and mapillary["target_valid"].any()
    masks = mapillary["gt_masks"][mapillary["target_valid"]][:, :grid[0], :grid[1]]
    assert (masks > 0).any() and (masks < 255).any()              # coverage, not a resampled bit
    assert (mapillary["gt_masks"][..., grid[0]:, :] == 0).all()


def test_eval_takes_mmr_from_the_mixture_root(setting, tmp_path):
    """eval.py with the paper's mixture config reads MMR where training does (data.root's
    layout, or data.mmr_root / data.image_root), with no eval.mmr_root."""
    root, _, _ = setting
    val = root / "MMR" / "MMR_val.json"
    val.write_text((root / "MMR" / "MMR_train.json").read_text())
    try:
        cfg = _paper_config(root)
        cfg.eval.dataset, cfg.eval.split = "mmr", "val"
        assert not cfg.eval.mmr_root and not cfg.eval.image_root
        samples, skips = run.load_samples(cfg)
        assert skips.total == 0 and [s.questions for s in samples] == [["What holds the coffee?"]]
        assert samples[0].image_path == f"{root}/refer_seg/images/mscoco/images/train2014/x.jpg"
        cfg.data.root = ""                              # no root, no eval.mmr_root: say so
        with pytest.raises(ValueError, match="eval.mmr_root.*data.root"):
            run.load_samples(cfg)
    finally:
        val.unlink()

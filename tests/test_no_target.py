"""Questions whose answer has no target (no [SEG], no mask), end to end: the MMR reader accepts
them when the dataset says it has such questions (and still refuses a {seg} count that differs
from the masks), the batcher packs them with zero targets, and training on them gives a text
loss and no mask loss (a tiny M²SA's forward, the training loss and its gradients)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2sa_jax.data import mmr, pipeline
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.data.types import BadRecord
from m2sa_jax.models.m2sa import M2SA
from m2sa_jax.training import setup
from m2sa_jax.training.step import make_loss_fn
from tests.support import llama_vocab, train_tiny
from tests.test_mmr import H, W, ann, box_mask, record, rle_string, write_image

NO_TARGET = "There is no giraffe in the image."


def _records():
    mug = box_mask(2, 10, 3, 12)
    handle = box_mask(4, 8, 12, 14)
    return [
        record(1, "a.jpg", ["What could hold coffee?", "Which animal has a long neck?"],
               [[ann(rle_string(mug), "mug")], []],
               ["The mug {seg} holds coffee.", NO_TARGET]),
        record(2, "b.jpg", ["Which animal has a long neck?"], [[]], [NO_TARGET]),
        # a {seg} count that differs from the masks stays a bad record
        record(3, "c.jpg", ["Where is the handle?"], [[ann(rle_string(handle), "mug:handle")]],
               ["The handle {seg} and the rim {seg}."]),
        record(4, "d.jpg", ["Where is the handle?"], [[]], ["The handle {seg}."]),
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmr_no_target")
    for name in "abcd":
        write_image(str(root), f"{name}.jpg")
    path = root / "MMR_train.json"
    path.write_text(json.dumps(_records()))
    return str(path), str(root)


def test_reader_refuses_no_target_answers_unless_the_dataset_has_them(files):
    path, root = files
    strict = mmr.MMRDataset(path, root, prompt="raw")
    assert [r.image_id for r in strict.records] == []
    assert dict(strict.skips.counts) == {"no_target": 2, "seg_count": 2}
    assert "allow_no_target=True" in strict.skips.examples["no_target"][0][1]

    allowed = mmr.MMRDataset(path, root, prompt="raw", allow_no_target=True)
    assert [r.image_id for r in allowed.records] == [1, 2]
    assert dict(allowed.skips.counts) == {"seg_count": 2}       # 2 {seg} / 1 mask, 1 / 0
    s = allowed.sample(0, all_questions=True)
    assert s.answers == ["The mug [SEG] holds coffee.", NO_TARGET]
    assert [len(m) for m in s.masks] == [1, 0]

    # the lazy training reader, same rules
    lazy = mmr.training_split(os.path.dirname(path), root, "train", allow_no_target=True,
                              prompt="raw")
    assert len(lazy) == 4 and lazy.sample(1, all_questions=True).masks == [[]]
    with pytest.raises(BadRecord) as e:
        lazy.sample(2)
    assert (e.value.reason, e.value.source) == ("seg_count", "mmr")
    with pytest.raises(BadRecord, match="no target"):
        mmr.training_split(os.path.dirname(path), root, "train").sample(1)


@pytest.fixture(scope="module")
def tiny(files, tmp_path_factory):
    tok = LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder(),
                                               model_max_length=512)
    cfg = train_tiny.config(str(tmp_path_factory.mktemp("unused")))
    config = setup.model_config_from_sizes(cfg, tok.seg_token_id, len(tok))
    params = setup.random_params(config, 0)
    path, root = files
    dataset = mmr.MMRDataset(path, root, prompt="val", allow_no_target=True)
    examples = [pipeline.prepare_example(dataset.sample(i, all_questions=True), tok,
                                         sam_size=config.sam.img_size,
                                         clip_size=config.llava.vision.image_size)
                for i in range(len(dataset))]
    return tok, config, params, examples


def _loss_and_grads(config, params, batch):
    loss_fn = make_loss_fn(M2SA(config), dict(ce_weight=1.0, bce_weight=2.0, dice_weight=0.5),
                           None, deterministic=True)
    grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn({"params": p}, {}, b,
                                                           jax.random.key(0)), has_aux=True))
    (total, terms), grads = grad(params, batch)
    return float(total), {k: float(v) for k, v in terms.items()}, grads


def test_batches_without_targets_give_a_text_loss_and_no_mask_loss(tiny):
    tok, config, params, examples = tiny
    with_target, no_target = examples
    assert [len(m) for m in with_target.masks] == [1, 0] and [len(m) for m in no_target.masks] == [0]
    shapes = pipeline.BatchShapes(images=2, conversations=3, token_buckets=(128,), max_targets=2,
                                  mask_hw=(H, W))
    only_none = pipeline.collate([no_target], shapes, tok.pad_token_id, coverage=True)
    assert not only_none["target_valid"].any() and only_none["conv_valid"].sum() == 1
    assert (only_none["labels"] != -100).any()                    # the answer is supervised
    total, terms, grads = _loss_and_grads(config, params, only_none)
    assert terms["ce"] > 0 and terms["bce"] == 0.0 and terms["dice"] == 0.0
    assert total == pytest.approx(terms["ce"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(bool(jnp.isfinite(g).all()) for _, g in flat)
    by_name = {jax.tree_util.keystr(p): g for p, g in flat}
    decoder = [g for k, g in by_name.items() if "mask_decoder" in k or "text_hidden_fcs" in k]
    assert decoder and all(float(jnp.abs(g).max()) == 0.0 for g in decoder)   # no mask signal
    assert any(float(jnp.abs(g).max()) > 0 for k, g in by_name.items() if "lm_head" in k)

    # a no-target conversation next to a targeted one leaves the mask terms of that one alone
    both = pipeline.collate([with_target, no_target], shapes, tok.pad_token_id, coverage=True)
    alone = pipeline.collate([with_target], shapes, tok.pad_token_id, coverage=True)
    _, t_both, _ = _loss_and_grads(config, params, both)
    _, t_alone, _ = _loss_and_grads(config, params, alone)
    assert t_both["bce"] > 0 and t_both["dice"] > 0
    assert t_both["bce"] == pytest.approx(t_alone["bce"], rel=1e-6)
    assert t_both["dice"] == pytest.approx(t_alone["dice"], rel=1e-6)


def test_no_target_draws_are_counted_by_source_when_refused(files):
    path, root = files
    skips = SkipCounter()
    dataset = mmr.training_split(os.path.dirname(path), root, "train")
    for i in range(len(dataset)):
        try:
            dataset.sample(i, np.random.default_rng(i))
        except BadRecord as e:
            skips.add_error(e, e.record)
    assert skips.per_source() == {"mmr": {"no_target": 2, "seg_count": 2}}


@pytest.mark.slow
def test_training_and_teacher_forced_eval_on_no_target_questions(files, tmp_path):
    """The training loop continues a tiny converted M²SA on an MMR split whose questions include
    no-target ones (``data.allow_no_target``): every step is finite and only the two bad
    ``{seg}`` counts are skipped. The teacher-forced evaluation of the same split then scores
    the one targeted mask and counts the no-target questions without a mask."""
    from checkpoints_convert.__main__ import main as convert_main
    from m2sa_jax.checkpoints.resolve import resolve
    from m2sa_jax.evaluation import teacher_forced
    from m2sa_jax.training import loop
    from tests.support.m2sa_helpers import write_tiny_m2sa_folder

    path, root = files
    write_tiny_m2sa_folder(str(tmp_path / "hf"), "m2sa", sam_depth=2, global_attn=(1,),
                           img_size=128)
    assert convert_main(["m2sa", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "m")]) == 0
    cfg = train_tiny.config(str(tmp_path / "unused"))
    cfg.model.init, cfg.model.checkpoint = "checkpoint", str(tmp_path / "m")
    cfg.data.kind, cfg.data.mmr_root, cfg.data.image_root = "mmr", root, root
    cfg.data.allow_no_target = True
    cfg.data.token_buckets, cfg.data.mask_hw, cfg.data.max_questions = (256,), (H, W), 2
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.checkpoint_every = 3, 1, 3
    summary = loop.train(cfg, str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["finite"] for r in rows)
    assert all(np.isfinite(r["loss"]) and r["ce"] > 0 for r in rows)
    assert "no_target" not in summary["skipped"], summary["skipped"]

    trained = resolve(str(tmp_path / "run"))               # the run's model, step 3
    dataset = mmr.MMRDataset(path, root, prompt="val", allow_no_target=True)
    samples = [dataset.sample(i, all_questions=True) for i in range(len(dataset))]
    shapes = pipeline.BatchShapes(images=2, conversations=4, token_buckets=(256,),
                                  max_targets=2, mask_hw=(H, W))
    metrics, skips, stats = teacher_forced.evaluate(
        teacher_forced.make_forward(M2SA(trained.config)), {"params": trained.params}, samples,
        trained.tokenizer, shapes, split="val", sam_size=trained.config.sam.img_size,
        clip_size=trained.config.llava.vision.image_size, progress=False)
    assert skips.total == 0
    assert stats["questions"] == 3 and stats["masks"] == 1
    result = metrics.result()["val"]["all"]
    assert result["masks"] == 1 and 0.0 <= result["giou"] <= 1.0

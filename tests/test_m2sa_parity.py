"""The full M²SA forward against a PyTorch composition of the upstream modules (SPEC §1, §4).

A tiny LLaMA + tiny CLIP + a narrow SAM with the real ViT-H block structure (depth 32, global
attention at 7/15/23/31, 1024×1024 input) are written as a LISA/M²SA checkpoint folder (sharded
safetensors with an index, the released key layout), converted through the CLI, and run on one
real photograph with two questions carrying 2 and 3 [SEG]s. Float32, highest matmul precision.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch

from checkpoints_convert.__main__ import main as convert_main
from m2sa_jax.models.m2sa import M2SAConfig
from m2sa_jax.data.preprocess import clip_preprocess, sam_preprocess
from m2sa_jax.models.m2sa import M2SA
from m2sa_jax.checkpoints.converted import load_meta, load_params
from m2sa_jax.training.losses import compute_losses
from tests.support.m2sa_helpers import write_tiny_m2sa_folder
from tests.support.torch_m2sa_reference import IMAGE_TOKEN_INDEX, mask_loss_terms

pytestmark = pytest.mark.torch

SP_VOCAB = 400          # SentencePiece pieces of the test tokenizer; [SEG] etc. follow


@pytest.fixture(scope="module", params=["m2sa", "lisa"])
def setup(request, tmp_path_factory):
    variant = request.param
    tmp = tmp_path_factory.mktemp(f"{variant}_ckpt")
    src, dst = tmp / "hf", tmp / "converted"
    ref, seg_id, state = write_tiny_m2sa_folder(str(src), variant, sp_vocab=SP_VOCAB)
    assert convert_main(["m2sa", "--src", str(src), "--dst", str(dst)]) == 0
    meta = load_meta(str(dst))
    config = M2SAConfig.from_meta(meta)
    params = load_params(str(dst))
    return dict(variant=variant, ref=ref, config=config, params=params, seg_id=seg_id,
                src=src, dst=dst, state=state)


def _inputs(seg_id, rng):
    """One image, two questions with 2 and 3 [SEG]s (right-padded)."""
    from skimage import data

    image = data.astronaut()[::2, ::3]                                   # 256×171, not square
    body = lambda n: list(rng.integers(3, SP_VOCAB, n))
    q0 = [1] + body(4) + [IMAGE_TOKEN_INDEX] + body(6) + body(2) + [seg_id] + body(3) + \
        [seg_id] + body(1) + [2]
    q1 = [1] + body(4) + [IMAGE_TOKEN_INDEX] + body(3) + [seg_id] + body(2) + [seg_id] + \
        body(2) + [seg_id] + body(2) + [2]
    t = max(len(q0), len(q1))
    ids = np.zeros((2, t), np.int64)
    am = np.zeros((2, t), np.int64)
    for i, q in enumerate((q0, q1)):
        ids[i, :len(q)] = q
        am[i, :len(q)] = 1
    labels = np.where(am == 1, ids, -100)
    labels[:, :9] = -100                                  # the "instruction" part is unsupervised
    labels[ids == IMAGE_TOKEN_INDEX] = -100
    return image, ids, am, labels


@pytest.mark.slow
def test_m2sa_forward_matches_pytorch(setup):
    ref, config, params, seg_id = setup["ref"], setup["config"], setup["params"], setup["seg_id"]
    rng = np.random.default_rng(1)
    image, ids, am, labels = _inputs(seg_id, rng)
    sam_in, resized, original = sam_preprocess(image)
    clip_in = clip_preprocess(image)
    h, w = original
    gt = (rng.random((5, h, w)) < 0.3).astype(np.float32)

    with torch.no_grad():
        r = ref(torch.from_numpy(sam_in).permute(2, 0, 1)[None],
                torch.from_numpy(clip_in).permute(2, 0, 1)[None],
                torch.from_numpy(ids), torch.from_numpy(am), torch.tensor([0, 0]),
                [resized], [original], labels=torch.from_numpy(labels))
        ref_bce, ref_dice = mask_loss_terms(r["mask_logits"], [torch.from_numpy(gt)])

    n_tgt, mask_hw = 3, (h + 7, w + 5)             # padding in both: proves masking
    gt_masks = np.zeros((2, n_tgt) + mask_hw, bool)
    gt_masks[0, :2, :h, :w] = gt[:2]
    gt_masks[1, :3, :h, :w] = gt[2:]
    target_valid = np.array([[1, 1, 0], [1, 1, 1]], bool)
    batch = dict(sam_images=sam_in[None], clip_images=clip_in[None],
                 input_ids=ids.astype(np.int32), attention_mask=am.astype(bool),
                 labels=labels.astype(np.int32), conv_image_index=np.array([0, 0], np.int32),
                 resized_hw=np.array([resized], np.int32),
                 original_hw=np.array([original], np.int32), gt_masks=gt_masks,
                 target_valid=target_valid)
    model = M2SA(config)
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b, method=M2SA.forward_batch))
    out = fwd(params, batch)
    np.testing.assert_array_equal(np.asarray(out["seg_counts"]), [2, 3])
    np.testing.assert_array_equal(np.asarray(out["seg_valid"]), target_valid.reshape(-1))
    slots = target_valid.reshape(-1)

    # Logits over the expanded sequence, real positions only.
    n_extra = 255
    exp_mask = np.concatenate([np.ones((2, n_extra), bool), am.astype(bool)], 1)
    err_logits = np.abs(np.asarray(out["logits"]) - r["logits"].numpy())[exp_mask].max()
    err_seg = np.abs(np.asarray(out["seg_embeddings"])[slots] - r["seg_embeddings"].numpy()).max()
    err_early = np.abs(np.asarray(out["early_features"]) - r["early_features"].numpy()).max()
    ref_masks = r["mask_logits"][0].numpy()                               # [5, h, w]
    ours = np.asarray(out["mask_logits"])
    err_masks = np.abs(ours[slots][:, :h, :w] - ref_masks).max()
    print(f"\n[{setup['variant']}] max abs err: logits {err_logits:.2e}, seg_embeddings "
          f"{err_seg:.2e}, early features {err_early:.2e}, mask logits {err_masks:.2e}")
    assert err_logits <= 1e-4
    assert err_seg <= 1e-4
    assert err_masks <= 1e-3
    assert np.all(ours[:, h:, :] == 0) and np.all(ours[:, :, w:] == 0)

    _, terms = compute_losses(out, batch, ce_weight=1.0, bce_weight=1.0, dice_weight=1.0)
    for name, want in (("ce", r["ce"].item()), ("bce", ref_bce.item()),
                       ("dice", ref_dice.item())):
        got = float(terms[name])
        rel = abs(got - want) / abs(want)
        print(f"[{setup['variant']}] {name}: jax {got:.8f} torch {want:.8f} rel err {rel:.2e}")
        assert rel <= 1e-5, name


def test_export_round_trip_is_bit_identical(setup, tmp_path):
    back = tmp_path / "back"
    assert convert_main(["m2sa", "--export", "--src", str(setup["dst"]), "--dst", str(back)]) == 0
    from m2sa_jax.checkpoints.torch_io import iter_checkpoint

    exported = dict(iter_checkpoint(str(back)))
    original = {k: v.numpy() for k, v in setup["state"].items()}
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
    assert os.path.isfile(back / "tokenizer.model")
    assert json.loads((back / "config.json").read_text())["architectures"] == ["LISAForCausalLM"]
    # and the exported folder converts again
    again = tmp_path / "again"
    assert convert_main(["m2sa", "--src", str(back), "--dst", str(again)]) == 0
    meta = load_meta(str(again))
    assert meta["variant"] == setup["variant"]
    assert meta["seg_token_id"] == setup["seg_id"]

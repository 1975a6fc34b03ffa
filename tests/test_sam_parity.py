"""Full ViT-B SAM against segment_anything at 1024×1024, through both SamPredictors.

One random PyTorch model is saved as a .pth, converted with the CLI, and both predictors
encode the same photograph once (module fixture); every prompt test reuses the embeddings.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch

from checkpoints_convert.__main__ import main as cli
from m2sa_jax.models.sam import Sam, sam_config
from m2sa_jax.inference.sam_predictor import SamPredictor
from tests.support.sam_reference import max_abs, torch_sam

pytestmark = [pytest.mark.torch, pytest.mark.slow]

CFG = sam_config("vit_b")


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    from segment_anything import SamPredictor as TorchPredictor

    tmp = tmp_path_factory.mktemp("sam_vit_b")
    ref = torch_sam(CFG, seed=0, std=0.02, decoder_std=0.1)
    torch.save(ref.state_dict(), tmp / "sam_vit_b_random.pth")
    assert cli(["sam", "--src", str(tmp / "sam_vit_b_random.pth"), "--dst", str(tmp / "jax")]) == 0
    ours = SamPredictor.from_pretrained(str(tmp / "jax"))
    assert ours.config == CFG

    image = skimage.data.astronaut()  # 512×512 RGB → fills the whole 1024×1024 input
    theirs = TorchPredictor(ref)
    t0 = time.perf_counter()
    with torch.no_grad():
        theirs.set_image(image)
    t1 = time.perf_counter()
    ours.set_image(image)
    ours.features["image_embeddings"].block_until_ready()
    t2 = time.perf_counter()
    print(f"\nvit_b set_image: torch {t1 - t0:.1f}s, jax (incl. compile) {t2 - t1:.1f}s")
    return ours, theirs, ref


def test_image_embedding(predictors):
    ours, theirs, _ = predictors
    want = theirs.features.permute(0, 2, 3, 1).numpy()  # NCHW → NHWC
    err = max_abs(ours.get_image_embedding(), want)
    print(f"image embedding max abs err {err:.2e} (max |x| {np.abs(want).max():.2f})")
    assert err <= 1e-4


H, W = skimage.data.astronaut().shape[:2]
POINTS = (np.array([[250.0, 180.0], [330.5, 400.0]]), np.array([1, 0]))
BOX = np.array([120.0, 40.0, 400.0, 300.0])


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["point", "box", "point+box", "point+box+mask"])
def test_prompts(predictors, prompt, multimask):
    ours, theirs, _ = predictors
    kw = {}
    if "point" in prompt:
        kw.update(point_coords=POINTS[0], point_labels=POINTS[1])
    if "box" in prompt:
        kw["box"] = BOX
    if "mask" in prompt:
        with torch.no_grad():
            _, _, prev = theirs.predict(point_coords=POINTS[0], point_labels=POINTS[1],
                                        multimask_output=False)
        kw["mask_input"] = prev
    with torch.no_grad():
        t_logits, t_iou, t_low = theirs.predict(**kw, multimask_output=multimask, return_logits=True)
        t_masks, _, _ = theirs.predict(**kw, multimask_output=multimask)
    o_logits, o_iou, o_low = ours.predict(**kw, multimask_output=multimask, return_logits=True)
    o_masks, o_iou2, _ = ours.predict(**kw, multimask_output=multimask)

    n = 3 if multimask else 1
    assert o_logits.shape == t_logits.shape == (n, H, W)
    assert o_low.shape == (n, 256, 256) and o_iou.shape == (n,)
    e_low, e_full, e_iou = max_abs(o_low, t_low), max_abs(o_logits, t_logits), max_abs(o_iou, t_iou)
    print(f"{prompt} multimask={multimask}: low-res {e_low:.2e} full {e_full:.2e} iou {e_iou:.2e} "
          f"(max |logit| {np.abs(t_low).max():.2f})")
    assert e_low <= 1e-3 and e_full <= 1e-3 and e_iou <= 1e-4
    np.testing.assert_array_equal(o_iou, o_iou2)
    assert o_masks.dtype == bool
    differ = o_masks != t_masks
    assert not np.any(differ & (np.abs(t_logits) > 1e-3)), "binary masks differ away from 0"


def test_text_embeds_batched_against_lisa_style_reference(predictors):
    """[SEG] vectors as the only sparse prompt, all decoded in one batched call (LISA's
    prompt_encoder(points=None, boxes=None, masks=None, text_embeds=e[:, None]))."""
    ours, theirs, ref = predictors
    k = 3
    seg = torch.randn(k, 1, 256, generator=torch.Generator().manual_seed(7))
    pe, md = ref.prompt_encoder, ref.mask_decoder
    with torch.no_grad():
        sparse = torch.cat([torch.empty(k, 0, 256), seg], dim=1)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, 64, 64)
        t_low, t_iou = md(theirs.features, pe.get_dense_pe(), sparse, dense, False)
    out = ours.model.apply({"params": ours.params}, ours.get_image_embedding(),
                           text_embeds=jnp.asarray(seg.numpy()), multimask_output=False,
                           method=Sam.decode)
    assert out["sparse_embeddings"].shape == (k, 1, 256)
    e_low = max_abs(out["low_res_masks"], t_low.numpy())
    e_iou = max_abs(out["iou_predictions"], t_iou.numpy())
    print(f"text_embeds ×{k}: low-res {e_low:.2e} iou {e_iou:.2e}")
    assert out["low_res_masks"].shape == (k, 1, 256, 256)
    assert e_low <= 1e-3 and e_iou <= 1e-4
    # single-image decoding of one [SEG] equals its row of the batched call
    one = ours.predict(text_embeds=seg[1].numpy(), multimask_output=False)[2]
    assert max_abs(one, out["low_res_masks"][1]) <= 1e-4

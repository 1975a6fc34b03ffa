"""Narrow ViT-H wiring (depth 32, global blocks 7/15/23/31, width 64) at 1024×1024 with M²SA's
compress_vit fusion, against segment_anything plus a PyTorch fused decoder written from the
SPEC; also interpolation helpers, jit behaviour and bfloat16 compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2sa_jax.data.preprocess import resize_longest_side_shape
from m2sa_jax.models.sam import (Sam, get_rel_pos, narrow_config, postprocess_masks, sam_config,
                                 postprocess_masks_padded)
from tests.support.sam_reference import convert_module, max_abs, torch_sam

pytestmark = pytest.mark.torch

CFG = narrow_config("vit_h", 64, 4, use_compress_vit=True)


class TorchFusedDecoder(torch.nn.Module):
    """M²SA's decoder per SPEC §1: compress_vit(block-7 output) added once to the image
    embedding, then SAM's mask decoder unchanged."""

    def __init__(self, mask_decoder):
        super().__init__()
        self.mask_decoder = mask_decoder

    def forward(self, image_embeddings, early_features, image_pe, sparse, dense, multimask):
        fused = image_embeddings + self.mask_decoder.compress_vit(early_features.permute(0, 3, 1, 2))
        return self.mask_decoder(fused, image_pe, sparse, dense, multimask)


@pytest.fixture(scope="module")
def narrow():
    ref = torch_sam(CFG, seed=1, std=0.05, decoder_std=0.1)
    params = convert_module(ref, CFG)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    blocks = {}
    hooks = [ref.image_encoder.blocks[i].register_forward_hook(
        lambda m, i_, o, i=i: blocks.__setitem__(i, o.detach().clone()))
        for i in CFG.global_attn_indexes]
    with torch.no_grad():
        emb = ref.image_encoder(x)
    for h in hooks:
        h.remove()
    model = Sam(CFG)
    encode = jax.jit(lambda p, im: model.apply({"params": p}, im, method=Sam.encode_image))
    ours = encode(params, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    return ref, params, x, emb, blocks, ours


def test_encoder_and_global_block_outputs(narrow):
    _, _, _, emb, blocks, ours = narrow
    assert set(ours["global_block_outputs"]) == {7, 15, 23, 31}
    err = max_abs(ours["image_embeddings"], emb.permute(0, 2, 3, 1).numpy())
    print(f"\nnarrow vit_h embedding err {err:.2e}")
    assert ours["image_embeddings"].shape == (1, 64, 64, 256)
    assert err <= 1e-4
    for i, want in blocks.items():
        got = ours["global_block_outputs"][i]
        assert got.shape == (1, 64, 64, 64)
        scale = float(want.abs().max())
        e = max_abs(got, want.numpy())
        print(f"block {i} output err {e:.2e} (max |x| {scale:.1f})")
        assert e <= 1e-5 * max(1.0, scale)
    np.testing.assert_array_equal(ours["early_features"], ours["global_block_outputs"][7])


def test_fused_decoder(narrow):
    ref, params, _, emb, blocks, ours = narrow
    k = 4
    seg = torch.randn(k, 1, 256, generator=torch.Generator().manual_seed(5))
    pe = ref.prompt_encoder
    fused = TorchFusedDecoder(ref.mask_decoder)
    with torch.no_grad():
        sparse = torch.cat([torch.empty(k, 0, 256), seg], dim=1)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, 64, 64)
        t_low, t_iou = fused(emb, blocks[7], pe.get_dense_pe(), sparse, dense, False)
        plain_low, _ = ref.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, False)
        pts = (torch.tensor([[[300.0, 500.0], [40.0, 900.0]]]), torch.tensor([[1, 0]]))
        sp2, de2 = pe(points=pts, boxes=None, masks=None)
        t_low2, t_iou2 = fused(emb, blocks[7], pe.get_dense_pe(), sp2, de2, True)
    model = Sam(CFG)
    decode = jax.jit(lambda p, e, early, te, pts, mm: model.apply(
        {"params": p}, e, points=pts, text_embeds=te, multimask_output=mm,
        early_features=early, method=Sam.decode), static_argnums=5)
    out = decode(params, ours["image_embeddings"], ours["early_features"],
                 jnp.asarray(seg.numpy()), None, False)
    e_low, e_iou = max_abs(out["low_res_masks"], t_low.numpy()), max_abs(out["iou_predictions"], t_iou.numpy())
    fusion_effect = max_abs(t_low.numpy(), plain_low.numpy())
    print(f"\nfused decoder ×{k}: low-res {e_low:.2e} iou {e_iou:.2e} "
          f"(max |logit| {t_low.abs().max():.1f}; fusion moves logits by {fusion_effect:.1f})")
    assert e_low <= 1e-3 and e_iou <= 1e-4
    assert fusion_effect > 0.1  # the fusion path is live, so the comparison can fail
    out2 = decode(params, ours["image_embeddings"], ours["early_features"], None,
                  (jnp.asarray(pts[0].numpy()), jnp.asarray(pts[1].numpy())), True)
    assert max_abs(out2["low_res_masks"], t_low2.numpy()) <= 1e-3
    assert max_abs(out2["iou_predictions"], t_iou2.numpy()) <= 1e-4
    # batched prompts per image: one image embedding shared by all k prompts, or indexed
    idx = jnp.zeros((k,), jnp.int32)
    out3 = model.apply({"params": params}, ours["image_embeddings"], text_embeds=jnp.asarray(seg.numpy()),
                       early_features=ours["early_features"], image_index=idx, method=Sam.decode)
    assert max_abs(out3["low_res_masks"], out["low_res_masks"]) <= 1e-4
    with pytest.raises(ValueError, match="early_features"):
        model.apply({"params": params}, ours["image_embeddings"],
                    text_embeds=jnp.asarray(seg.numpy()), method=Sam.decode)


def test_bfloat16_compute_close_to_float32(narrow):
    """bf16 matmuls/activations (f32 params, LayerNorm stats, softmax): embedding within
    0.15 abs (LayerNorm-scaled, ~unit variance) and mean abs error ≤ 0.02 after 32 blocks."""
    _, params, x, _, _, ours = narrow
    model = Sam(CFG, jnp.bfloat16)
    out = jax.jit(lambda p, im: model.apply({"params": p}, im, method=Sam.encode_image))(
        params, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    got = np.asarray(out["image_embeddings"], np.float32)
    want = np.asarray(ours["image_embeddings"])
    err, mean_err = max_abs(got, want), float(np.mean(np.abs(got - want)))
    print(f"\nbf16 vs f32 embedding: max {err:.3f} mean {mean_err:.4f}")
    assert out["image_embeddings"].dtype == jnp.bfloat16
    assert err <= 0.15 and mean_err <= 0.02


def test_decoder_jit_does_not_retrace(narrow):
    _, params, _, _, _, ours = narrow
    model = Sam(CFG)
    traces = []

    def fn(p, e, early, pts):
        traces.append(1)
        return model.apply({"params": p}, e, points=pts, early_features=early, method=Sam.decode)

    f = jax.jit(fn)
    for i in range(3):
        pts = (jnp.array([[[10.0 * i, 20.0]]]), jnp.array([[1]]))
        f(params, ours["image_embeddings"], ours["early_features"], pts)["low_res_masks"].block_until_ready()
    assert len(traces) == 1


@pytest.mark.parametrize("q,k,length", [(14, 14, 27), (14, 14, 19), (8, 16, 31), (16, 8, 20)])
def test_get_rel_pos_matches_torch(q, k, length):
    from segment_anything.modeling.image_encoder import get_rel_pos as torch_get_rel_pos

    table = torch.randn(length, 8, generator=torch.Generator().manual_seed(q * k + length))
    want = torch_get_rel_pos(q, k, table).numpy()
    got = np.asarray(get_rel_pos(q, k, jnp.asarray(table.numpy())))
    assert got.shape == want.shape
    assert max_abs(got, want) <= 1e-6


@pytest.mark.parametrize("original", [(300, 451), (512, 512), (700, 300)])
def test_postprocess_matches_torch(original):
    low = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(sum(original)))
    input_size = resize_longest_side_shape(*original)
    up = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    want = F.interpolate(up[..., : input_size[0], : input_size[1]], original, mode="bilinear",
                         align_corners=False).numpy()
    got = np.asarray(postprocess_masks(jnp.asarray(low.numpy()), input_size, original))
    assert got.shape == want.shape
    assert max_abs(got, want) <= 1e-5
    # static-shape version under jit + vmap, two images of different sizes padded to 720×720
    pad = jax.jit(jax.vmap(lambda lr, i, o: postprocess_masks_padded(lr, i, o, (720, 720))))
    sizes_in = jnp.array([input_size, resize_longest_side_shape(100, 50)])
    sizes_orig = jnp.array([original, (100, 50)])
    got2 = np.asarray(pad(jnp.stack([jnp.asarray(low.numpy())] * 2), sizes_in, sizes_orig))
    assert got2.shape == (2, 2, 3, 720, 720)
    assert max_abs(got2[0, ..., : original[0], : original[1]], want) <= 1e-5
    assert not np.any(got2[0, ..., original[0]:, :]) and not np.any(got2[0, ..., original[1]:])
    small = np.asarray(postprocess_masks(jnp.asarray(low.numpy()), resize_longest_side_shape(100, 50),
                                         (100, 50)))
    assert max_abs(got2[1, ..., :100, :50], small) <= 1e-5


def test_attention_in_blocks_of_query_rows_equals_whole(monkeypatch):
    """The encoder's attention computed one block of query rows at a time (as on the 64×64 grid
    of a real image) gives the attention computed whole, rel-pos terms included."""
    from m2sa_jax.models.sam import image_encoder as ie

    assert ie.query_chunk_rows(64, 64, 12) == 2            # ViT-B global: 32 blocks of 2 rows
    assert ie.query_chunk_rows(14, 14, 25 * 12) == 7       # its 14×14 windows: 2 blocks
    assert ie.query_chunk_rows(16, 16, 8) == 16            # the demo's grid: whole
    assert ie.query_chunk_rows(64, 64, 4) == 4             # 4 heads: at most 256 queries
    attn = ie.EncoderAttention(num_heads=2, input_size=(12, 12))
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 32))
    params = attn.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                          params)                          # non-zero rel-pos tables
    whole = attn.apply(params, x)
    per_row = 2 * 2 * 12 * 144                             # logits of one query row
    for rows in (1, 3, 4):
        monkeypatch.setattr(ie, "ATTENTION_BLOCK_VALUES", rows * per_row)
        assert ie.query_chunk_rows(12, 12, 4) == rows
        assert max_abs(attn.apply(params, x), whole) <= 1e-6


def test_encoder_loop_over_images_equals_whole_batch(monkeypatch):
    """On the CPU a batch of full-size images is encoded one image at a time (Sam.encode_image);
    outputs and gradients equal the whole batch's, and initialisation takes the batch whole."""
    import re

    from m2sa_jax.models.sam import sam as sam_module

    cfg = sam_config("vit_b", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                     global_attn_indexes=(1,), use_compress_vit=True, img_size=256,
                     window_size=5)
    model = Sam(cfg)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 256, 256, 3)), jnp.float32)
    monkeypatch.setattr(sam_module, "ONE_IMAGE_AT_A_TIME_TOKENS", 16 * 16)
    params = model.init(jax.random.key(0), x, method=Sam.encode_image)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                          params)
    got = {}
    for loop in (True, False):
        if not loop:
            monkeypatch.setattr(sam_module, "ONE_IMAGE_AT_A_TIME_TOKENS", 10 ** 9)

        def enc(p, im):                                    # a new function: a new trace
            return model.apply(p, im, method=Sam.encode_image)

        lengths = re.findall(r"length=(\d+)", str(jax.make_jaxpr(enc)(params, x)))
        assert ("3" in lengths) == loop                    # the loop over the 3 images
        grads = jax.grad(lambda p: jnp.sum(jnp.sin(enc(p, x)["image_embeddings"])))(params)
        got[loop] = (enc(params, x), grads)
    (a, ga), (b, gb) = got[True], got[False]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.shape == v.shape and max_abs(u, v) <= 1e-5
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert max_abs(u, v) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(v))))

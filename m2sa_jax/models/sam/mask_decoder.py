"""SAM's mask decoder, with M²SA's early local feature fusion (``compress_vit``): the output of
the encoder's first global-attention block, compressed to 256 channels and added once to the
image embedding before the two-way transformer."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from m2sa_jax.models.sam.common import MLP, Dtype, LayerNorm, conv, gelu
from m2sa_jax.models.sam.config import SamConfig
from m2sa_jax.models.sam.transformer import TwoWayTransformer


class Upscale2x(nn.Module):
    """SAM's ``ConvTranspose2d(k=2, stride=2)`` as one einsum: each input pixel writes its own
    2×2 output block, with no overlap, so this is exactly ``nn.ConvTranspose(features, (2, 2),
    strides=(2, 2), padding="VALID")`` with the same ``kernel`` [2, 2, in, out] and ``bias``
    leaves. XLA's CPU backend differentiates the transposed convolution ~20× slower than this
    einsum, which made it most of a small model's training step.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        b, h, w, _ = x.shape
        # flax's ConvTranspose (transpose_kernel=False) applies the spatially flipped kernel
        y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype),
                       kernel[::-1, ::-1].astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class MaskDecoder(nn.Module):
    """SAM's mask decoder, with M²SA's optional ``compress_vit`` early fusion.

    Prompts may outnumber images: ``image_embeddings`` [Bi, 64, 64, 256] is shared by all
    B prompts when Bi == 1 (SAM's repeat), or picked per prompt with ``image_index`` [B];
    otherwise Bi must equal B.
    """

    config: SamConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeddings, image_pe, sparse_embeddings, dense_embeddings,
                 multimask_output: bool, early_features=None, image_index=None):
        cfg = self.config
        d, nm = cfg.prompt_embed_dim, cfg.num_multimask_outputs + 1
        dt = self.dtype
        emb = nn.initializers.normal(1.0)
        iou_token = self.param("iou_token", emb, (1, d), jnp.float32)
        mask_tokens = self.param("mask_tokens", emb, (nm, d), jnp.float32)

        src = image_embeddings.astype(dt)  # [Bi, 64, 64, 256]
        if cfg.use_compress_vit:
            if early_features is None:
                raise ValueError("this mask decoder fuses early features (use_compress_vit=True): "
                                 "pass early_features=[B, 64, 64, encoder width]")
            e = conv(d, 3, 1, 1, dt, "compress_vit_conv0")(early_features.astype(dt))
            e = gelu(LayerNorm(1e-6, dt, name="compress_vit_ln")(e))
            src = src + conv(d, 3, 1, 1, dt, "compress_vit_conv1")(e)  # [Bi, 64, 64, 256]
        elif early_features is not None:
            raise ValueError("early_features given, but this mask decoder has no compress_vit "
                             "(use_compress_vit=False)")

        b = sparse_embeddings.shape[0]
        tokens = jnp.concatenate(
            [jnp.broadcast_to(jnp.concatenate([iou_token, mask_tokens])[None], (b, 1 + nm, d)),
             sparse_embeddings.astype(jnp.float32)], axis=1).astype(dt)  # [B, 5 + n, 256]
        if image_index is not None:
            src = jnp.take(src, image_index, axis=0)
        elif src.shape[0] == 1:
            src = jnp.broadcast_to(src, (b,) + src.shape[1:])
        elif src.shape[0] != b:
            raise ValueError(f"{src.shape[0]} image embeddings for {b} prompts: pass one image, "
                             f"one per prompt, or image_index")
        src = src + dense_embeddings.astype(dt)  # [B, 64, 64, 256]
        bb, h, w, _ = src.shape
        pos = jnp.broadcast_to(image_pe.astype(dt), (bb, h, w, d)).reshape(bb, h * w, d)
        hs, src = TwoWayTransformer(cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_dim,
                                    2, dt, name="transformer")(src.reshape(bb, h * w, d), pos,
                                                               tokens)
        iou_token_out = hs[:, 0]  # [B, 256]
        mask_tokens_out = hs[:, 1: 1 + nm]  # [B, 4, 256]

        x = src.reshape(bb, h, w, d)
        x = Upscale2x(d // 4, dt, name="upscale_conv0")(x)
        x = gelu(LayerNorm(1e-6, dt, name="upscale_ln")(x))
        x = Upscale2x(d // 8, dt, name="upscale_conv1")(x)
        upscaled = gelu(x)  # [B, 256, 256, 32]
        hyper_in = jnp.stack(
            [MLP(d, d // 8, 3, dt, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i])
             for i in range(nm)], axis=1)  # [B, 4, 32]
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, upscaled)  # [B, 4, 256, 256]
        iou_pred = MLP(cfg.iou_head_hidden_dim, nm, cfg.iou_head_depth, dt,
                       name="iou_prediction_head")(iou_token_out)  # [B, 4]
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return {
            "low_res_masks": masks[:, sel].astype(jnp.float32),
            "iou_predictions": iou_pred[:, sel].astype(jnp.float32),
            "all_low_res_masks": masks.astype(jnp.float32),
            "all_iou_predictions": iou_pred.astype(jnp.float32),
        }

"""SAM's ViT image encoder: windowed and global attention with decomposed relative position
embeddings, and a conv neck. Channels-last: [B, 64, 64, C] where PyTorch has [B, C, 64, 64]."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax.models.sam.common import HIGHEST, Dtype, LayerNorm, conv, dense, gelu
from m2sa_jax.models.sam.config import SamConfig
from m2sa_jax.models.sam.postprocess import interp_weights


def get_rel_pos(q_size: int, k_size: int, rel_pos):
    """Relative position table [q_size, k_size, C] from a learned [L, C] table.

    When L differs from 2·max(q, k) − 1 the table is linearly resized first (torch
    F.interpolate, mode="linear", align_corners=False), as in SAM.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        w = interp_weights(max_rel_dist, rel_pos.shape[0], max_rel_dist, rel_pos.shape[0])
        rel_pos = jnp.einsum("ol,lc->oc", w, rel_pos.astype(jnp.float32), precision=HIGHEST)
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.astype(np.int64)]


# Global attention on SAM's 64×64 grid has [heads, 4096, 4096] logits (800 MB per image at
# ViT-B); computed whole, the rel-pos sum and the softmax pass over them in memory several times.
# Blocks of query rows whose logits stay under this many values, and that hold at most this many
# queries, are computed one after another. Measured on a 2-core CPU (docs/performance.md): ViT-B
# and ViT-L ran fastest with 2 rows of 64 in their global blocks and 7 of 14 in their windows
# (8.7 s per image for ViT-B, 31.0 s for ViT-L; 1 and 2 rows: 10.4 s and 35.9 s), a 256-wide,
# 4-head encoder with 4 rows (1.95 s; 8 rows 2.56 s, the whole grid 3.0 s).
ATTENTION_BLOCK_VALUES = 1 << 23
ATTENTION_BLOCK_QUERIES = 256


def query_chunk_rows(h: int, w: int, batch_heads: int) -> int:
    """Query rows per block: the largest divisor of ``h`` whose logits ([batch·heads, rows·W,
    H·W]) stay within :data:`ATTENTION_BLOCK_VALUES` and whose queries (rows·W) within
    :data:`ATTENTION_BLOCK_QUERIES` (all ``h`` rows when they fit; at least one row)."""
    per_row = batch_heads * w * h * w
    fits = [r for r in range(1, h + 1) if h % r == 0 and r * per_row <= ATTENTION_BLOCK_VALUES
            and r * w <= ATTENTION_BLOCK_QUERIES]
    return max(fits) if fits else 1


def _attend_rows(q, kt, vt, rh, rw, hd: int, dtype):
    """Attention of a block of query rows. q [B, r, W, heads, hd]; kt, vt [B, heads, HW, hd];
    rh [r, H, hd] (these rows' part of the H table), rw [W, W, hd]. Returns [B, heads, r·W, hd]."""
    b, r, w, n, _ = q.shape
    h = rh.shape[1]
    qs = (q * (hd ** -0.5)).reshape(b, r * w, n, hd)
    logits = jnp.einsum("bqnd,bnkd->bnqk", qs, kt)                  # [B, heads, rW, HW]
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", q, rh)                    # [B, heads, r, W, H]
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", q, rw)                    # [B, heads, r, W, W]
    logits = logits.reshape(b, n, r, w, h, w)
    logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
    logits = logits.reshape(b, n, r * w, h * w).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bnqk,bnkd->bnqd", probs, vt)                  # [B, heads, rW, hd]


class EncoderAttention(nn.Module):
    """Multi-head self-attention on a [B, H, W, C] grid with decomposed rel-pos terms."""

    num_heads: int
    input_size: tuple[int, int]  # grid the rel-pos tables are sized for
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        hd = c // self.num_heads
        rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros,
                               (2 * self.input_size[0] - 1, hd), jnp.float32)
        rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros,
                               (2 * self.input_size[1] - 1, hd), jnp.float32)
        qkv = dense(3 * c, self.dtype, "qkv")(x).reshape(b, h * w, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, HW, heads, hd]
        rh = get_rel_pos(h, h, rel_pos_h).astype(self.dtype)  # [H, H, hd]
        rw = get_rel_pos(w, w, rel_pos_w).astype(self.dtype)  # [W, W, hd]
        rows = query_chunk_rows(h, w, b * self.num_heads)
        # heads-major k, v: XLA:CPU runs the contractions ~3× faster than on [B, HW, heads, hd]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, heads, HW, hd]
        q = q.reshape(b, h // rows, rows, w, self.num_heads, hd)
        if rows == h:
            out = _attend_rows(q[:, 0], kt, vt, rh, rw, hd, self.dtype)[:, None]
        else:     # one block of query rows at a time: its logits stay small enough for the cache
            out = jax.lax.map(
                lambda xs: _attend_rows(xs[0], kt, vt, xs[1], rw, hd, self.dtype),
                (q.transpose(1, 0, 2, 3, 4, 5), rh.reshape(h // rows, rows, h, hd)))
            out = out.transpose(1, 0, 2, 3, 4)
        # out [B, H/rows, heads, rows·W, hd] → [B, H, W, C]
        out = out.reshape(b, h // rows, self.num_heads, rows, w, hd)
        out = out.transpose(0, 1, 3, 4, 2, 5).reshape(b, h, w, c)
        return dense(c, self.dtype, "proj")(out)


def window_partition(x, window: int):
    """[B, H, W, C] → ([B·nH·nW, window, window, C], padded (Hp, Wp)); zero-pads bottom/right."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows, window: int, padded: tuple[int, int], size: tuple[int, int]):
    """Inverse of :func:`window_partition`, cropping the padding away."""
    hp, wp = padded
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return x[:, : size[0], : size[1]]


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention."""

    num_heads: int
    mlp_ratio: float
    window_size: int
    grid_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        shortcut = x
        x = LayerNorm(1e-6, self.dtype, name="norm1")(x)
        if self.window_size > 0:
            h, w = x.shape[1:3]
            x, padded = window_partition(x, self.window_size)
            size = (self.window_size, self.window_size)
        else:
            size = (self.grid_size, self.grid_size)
        x = EncoderAttention(self.num_heads, size, self.dtype, name="attn")(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, padded, (h, w))
        x = shortcut + x
        y = LayerNorm(1e-6, self.dtype, name="norm2")(x)
        y = dense(int(c * self.mlp_ratio), self.dtype, "lin1")(y)
        y = dense(c, self.dtype, "lin2")(gelu(y))
        return x + y


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder.

    Input: normalised, padded images [B, 1024, 1024, 3]. Returns a dict with
    ``image_embeddings`` [B, 64, 64, 256], ``global_block_outputs`` {block index: [B, 64, 64, C]}
    and ``early_features`` (the first global block's output, M²SA's fusion input).
    """

    config: SamConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        c, g = cfg.encoder_embed_dim, cfg.image_embedding_size
        x = nn.Conv(c, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding="VALID",
                    dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed")(
            images.astype(self.dtype))  # [B, 64, 64, C]
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, g, g, c), jnp.float32)
        x = x + pos_embed.astype(self.dtype)
        global_outputs = {}
        for i in range(cfg.encoder_depth):
            is_global = i in cfg.global_attn_indexes
            x = EncoderBlock(cfg.encoder_num_heads, cfg.mlp_ratio,
                             0 if is_global else cfg.window_size, g, self.dtype,
                             name=f"blocks_{i}")(x)
            if is_global:
                global_outputs[i] = x  # [B, 64, 64, C]
        y = conv(cfg.prompt_embed_dim, 1, 1, 0, self.dtype, "neck_conv1", use_bias=False)(x)
        y = LayerNorm(1e-6, self.dtype, name="neck_ln1")(y)
        y = conv(cfg.prompt_embed_dim, 3, 1, 1, self.dtype, "neck_conv2", use_bias=False)(y)
        y = LayerNorm(1e-6, self.dtype, name="neck_ln2")(y)  # [B, 64, 64, 256]
        return {
            "image_embeddings": y,
            "global_block_outputs": global_outputs,
            "early_features": global_outputs[min(cfg.global_attn_indexes)],
        }

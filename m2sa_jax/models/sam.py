"""Segment Anything (ViT-B/L/H) in Flax linen, numerically faithful to the PyTorch original.

Three networks, as in SAM:

* :class:`ImageEncoderViT` — ViT with windowed and global attention, decomposed relative
  position embeddings and a conv neck. Returns the image embedding and the output of every
  global-attention block (M²SA's ``early_features`` = the first of them, block 7 in ViT-H).
* :class:`PromptEncoder` — points, boxes, a low-res mask, and extra sparse embeddings
  (``text_embeds``: one 256-vector per [SEG] in M²SA) appended after points and boxes.
* :class:`MaskDecoder` — the two-way transformer decoder; optionally fuses ``early_features``
  through ``compress_vit`` (M²SA's early local feature fusion).

Layout: everything spatial is channels-last (NHWC). The image embedding is
``[B, 64, 64, 256]`` where PyTorch has ``[B, 256, 64, 64]``; mask logits are ``[B, C, H, W]``
as in PyTorch (C = masks per prompt). Parameters are float32; ``dtype`` selects the compute
dtype (LayerNorm statistics and softmax stay float32).

Numerical choices that differ from Flax defaults are made explicitly: exact (erf) GELU,
LayerNorm eps 1e-6 in the image encoder and every LayerNorm2d, 1e-5 in the two-way
transformer (PyTorch's default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
HIGHEST = jax.lax.Precision.HIGHEST


# --- configuration ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Sizes of one SAM variant. ``global_attn_indexes`` are the blocks without windows."""

    model_type: str = "vit_h"
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    img_size: int = 1024
    patch_size: int = 16
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_compress_vit: bool = False

    @property
    def image_embedding_size(self) -> int:
        return self.img_size // self.patch_size  # 64

    def replace(self, **kw) -> "SamConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamConfig":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if "global_attn_indexes" in d:
            d["global_attn_indexes"] = tuple(d["global_attn_indexes"])
        return cls(**d)


SAM_CONFIGS = {
    "vit_b": SamConfig("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
}


def sam_config(model_type: str = "vit_h", **overrides) -> SamConfig:
    """A named SAM config, optionally with fields replaced (e.g. ``use_compress_vit=True``)."""
    if model_type not in SAM_CONFIGS:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose from {sorted(SAM_CONFIGS)}")
    return SAM_CONFIGS[model_type].replace(**overrides)


def narrow_config(model_type: str = "vit_h", embed_dim: int = 64, num_heads: int = 4,
                  **overrides) -> SamConfig:
    """Same depth and global-attention wiring as ``model_type``, narrower encoder (tests)."""
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    return sam_config(model_type, encoder_embed_dim=embed_dim, encoder_num_heads=num_heads,
                      **overrides)


# --- shared pieces ----------------------------------------------------------------------------

def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU(); Flax's nn.gelu defaults to the tanh form."""
    return nn.gelu(x, approximate=False)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with PyTorch names (weight, bias); stats in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) / jnp.sqrt(var + self.eps)
        return (y * weight + bias).astype(self.dtype)


def _dense(features, dtype, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _conv(features, kernel, stride, padding, dtype, name, use_bias=True):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(padding, padding)] * 2, use_bias=use_bias, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (SAM's decoder heads)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = _dense(self.output_dim if last else self.hidden_dim, self.dtype, f"layers_{i}")(x)
            if not last:
                x = nn.relu(x)
        return x


# --- bilinear / linear interpolation exactly like torch F.interpolate ---------------------------

def _interp_weights(out_size, in_size, n_out: int, n_in: int):
    """[n_out, n_in] matrix of torch's linear interpolation (align_corners=False, no antialias).

    ``out_size``/``in_size`` may be traced scalars (≤ n_out / n_in): rows at and past
    ``out_size`` are zero and no source index reaches ``in_size`` or beyond, so cropping to
    ``in_size`` and padding to ``n_out`` come for free.

    PyTorch's CPU/GPU kernels evaluate the source coordinate ``scale·(i + 0.5) − 0.5`` with a
    fused multiply-add (one rounding). With Python ints (static sizes) this is reproduced
    exactly in float64 followed by one rounding to float32; traced sizes use float32
    arithmetic, which can sit one rounding of the coordinate away (≤ 1e-5 on unit logits).
    """
    static = all(isinstance(v, (int, np.integer)) for v in (out_size, in_size))
    xp = np if static else jnp
    f32 = np.float32 if static else jnp.float32
    scale = xp.asarray(in_size, f32) / xp.asarray(out_size, f32)
    dst = xp.arange(n_out, dtype=f32)
    if static:
        src = (scale.astype(np.float64) * (dst.astype(np.float64) + 0.5) - 0.5).astype(f32)
    else:
        src = scale * (dst + f32(0.5)) - f32(0.5)
    src = xp.maximum(src, f32(0.0))
    last = xp.asarray(in_size, np.int32) - 1
    i0 = xp.minimum(xp.floor(src).astype(np.int32), last)
    lam1 = xp.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    lam0 = f32(1.0) - lam1
    i1 = xp.minimum(i0 + 1, last)
    cols = xp.arange(n_in)
    w = (lam0[:, None] * (cols[None, :] == i0[:, None])
         + lam1[:, None] * (cols[None, :] == i1[:, None]))
    valid = dst < xp.asarray(out_size, f32)
    return xp.where(valid[:, None], w, f32(0.0)).astype(f32)


def _resize_hw(x, wh, ww):
    """x [..., H, W] → [..., h', w'] with separable weights wh [h', H], ww [w', W]."""
    x = jnp.einsum("...hw,vw->...hv", x, ww, precision=HIGHEST)
    return jnp.einsum("...hv,uh->...uv", x, wh, precision=HIGHEST)


def interpolate_bilinear(x, size: tuple[int, int]):
    """torch ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on [..., H, W]."""
    h, w = x.shape[-2:]
    wh = _interp_weights(size[0], h, size[0], h)
    ww = _interp_weights(size[1], w, size[1], w)
    return _resize_hw(x.astype(jnp.float32), wh, ww)


def postprocess_masks(low_res_logits, input_size: tuple[int, int], original_size: tuple[int, int],
                      img_size: int = 1024):
    """Mask logits [..., 256, 256] → [..., H, W] at the original image size (SAM's recipe).

    Bilinear to ``img_size``², crop to the resized (unpadded) ``input_size``, bilinear to
    ``original_size``; all with align_corners=False and no antialiasing, like PyTorch.
    """
    x = interpolate_bilinear(low_res_logits, (img_size, img_size))
    x = x[..., : input_size[0], : input_size[1]]
    return interpolate_bilinear(x, tuple(original_size))


def postprocess_masks_host(low_res_logits, input_size: tuple[int, int],
                           original_size: tuple[int, int], img_size: int = 1024) -> np.ndarray:
    """:func:`postprocess_masks` in NumPy on the host: [..., h, w] → float32 [..., H, W].

    Upscaling to ``img_size``, cropping to ``input_size`` and resizing to ``original_size`` are
    one linear map per axis, ``A_h`` [H, h] and ``A_w`` [W, w], composed here in float64 from
    the same torch weights (align_corners=False, no antialias); the result is ``A_h · x · A_wᵀ``.
    Lets a server keep every compiled shape fixed whatever the image sizes it is sent.
    """
    x = np.asarray(low_res_logits, np.float32)

    def axis(n_low: int, n_in: int, n_out: int) -> np.ndarray:
        up = _interp_weights(img_size, n_low, img_size, n_low)[:n_in]          # [n_in, n_low]
        down = _interp_weights(n_out, n_in, n_out, n_in)                       # [n_out, n_in]
        return (down.astype(np.float64) @ up.astype(np.float64)).astype(np.float32)

    a_h = axis(x.shape[-2], int(input_size[0]), int(original_size[0]))
    a_w = axis(x.shape[-1], int(input_size[1]), int(original_size[1]))
    return np.matmul(np.matmul(a_h, x), a_w.T)


def postprocess_masks_padded(low_res_logits, input_size, original_size,
                             max_size: tuple[int, int], img_size: int = 1024):
    """jit-friendly :func:`postprocess_masks` with a static output shape.

    ``input_size`` and ``original_size`` are int arrays ``[2]`` (may be traced, one image);
    the result is ``[..., max_size[0], max_size[1]]`` whose top-left ``original_size`` block
    equals :func:`postprocess_masks` and whose remainder is 0. Use ``jax.vmap`` over images.
    """
    lr = low_res_logits.shape[-2:]
    up = _resize_hw(low_res_logits.astype(jnp.float32),
                    _interp_weights(img_size, lr[0], img_size, lr[0]),
                    _interp_weights(img_size, lr[1], img_size, lr[1]))  # [..., 1024, 1024]
    wh = _interp_weights(original_size[0], input_size[0], max_size[0], img_size)
    ww = _interp_weights(original_size[1], input_size[1], max_size[1], img_size)
    return _resize_hw(up, wh, ww)


# --- image encoder ----------------------------------------------------------------------------

def get_rel_pos(q_size: int, k_size: int, rel_pos):
    """Relative position table [q_size, k_size, C] from a learned [L, C] table.

    When L differs from 2·max(q, k) − 1 the table is linearly resized first (torch
    F.interpolate, mode="linear", align_corners=False), as in SAM.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        w = _interp_weights(max_rel_dist, rel_pos.shape[0], max_rel_dist, rel_pos.shape[0])
        rel_pos = jnp.einsum("ol,lc->oc", w, rel_pos.astype(jnp.float32), precision=HIGHEST)
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.astype(np.int64)]


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
        qkv = _dense(3 * c, self.dtype, "qkv")(x).reshape(b, h * w, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, HW, heads, hd]
        logits = jnp.einsum("bqnd,bknd->bnqk", q * (hd ** -0.5), k)  # [B, heads, HW, HW]
        rh = get_rel_pos(h, h, rel_pos_h).astype(self.dtype)  # [H, H, hd]
        rw = get_rel_pos(w, w, rel_pos_w).astype(self.dtype)  # [W, W, hd]
        rq = q.reshape(b, h, w, self.num_heads, hd)
        rel_h = jnp.einsum("byxnd,ykd->bnyxk", rq, rh)  # [B, heads, H, W, kH]
        rel_w = jnp.einsum("byxnd,xkd->bnyxk", rq, rw)  # [B, heads, H, W, kW]
        logits = logits.reshape(b, self.num_heads, h, w, h, w)
        logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
        logits = logits.reshape(b, self.num_heads, h * w, h * w).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        # heads-major v: XLA:CPU runs this contraction ~3× faster than on [B, HW, heads, hd]
        out = jnp.einsum("bnqk,bnkd->bnqd", probs, v.transpose(0, 2, 1, 3))  # [B, heads, HW, hd]
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, c)
        return _dense(c, self.dtype, "proj")(out)


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
        y = _dense(int(c * self.mlp_ratio), self.dtype, "lin1")(y)
        y = _dense(c, self.dtype, "lin2")(gelu(y))
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
        y = _conv(cfg.prompt_embed_dim, 1, 1, 0, self.dtype, "neck_conv1", use_bias=False)(x)
        y = LayerNorm(1e-6, self.dtype, name="neck_ln1")(y)
        y = _conv(cfg.prompt_embed_dim, 3, 1, 1, self.dtype, "neck_conv2", use_bias=False)(y)
        y = LayerNorm(1e-6, self.dtype, name="neck_ln2")(y)  # [B, 64, 64, 256]
        return {
            "image_embeddings": y,
            "global_block_outputs": global_outputs,
            "early_features": global_outputs[min(cfg.global_attn_indexes)],
        }


# --- prompt encoder ---------------------------------------------------------------------------

class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding; the gaussian matrix is a converted buffer."""

    num_pos_feats: int = 128

    def setup(self):
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix", nn.initializers.normal(1.0),
            (2, self.num_pos_feats), jnp.float32)

    def encode(self, coords):
        """coords in [0, 1], [..., 2] (x, y) → [..., 2·num_pos_feats] (sin then cos)."""
        coords = 2 * coords - 1
        coords = jnp.einsum("...i,ij->...j", coords, self.positional_encoding_gaussian_matrix,
                            precision=HIGHEST)
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def grid(self, h: int, w: int):
        """Dense PE of an h×w grid: [h, w, 2·num_pos_feats]."""
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        xy = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self.encode(xy)

    def with_coords(self, coords, image_size: tuple[int, int]):
        """Pixel coords [..., 2] (x, y) in an image of ``image_size`` (h, w) → PE."""
        norm = coords.astype(jnp.float32) / jnp.array([image_size[1], image_size[0]], jnp.float32)
        return self.encode(norm)


class PromptEncoder(nn.Module):
    """Sparse (points, boxes, extra embeddings) and dense (mask) prompt embeddings.

    Sparse embeddings are concatenated in the order points, boxes, ``text_embeds``; a padding
    point is appended to points when no boxes are given, as in SAM. With no prompt at all the
    sparse part is empty ([B, 0, 256]).
    """

    config: SamConfig

    def setup(self):
        cfg = self.config
        d = cfg.prompt_embed_dim
        emb = nn.initializers.normal(1.0)
        self.pe_layer = PositionEmbeddingRandom(d // 2)
        self.point_embeddings = [self.param(f"point_embeddings_{i}", emb, (1, d), jnp.float32)
                                 for i in range(4)]
        self.not_a_point_embed = self.param("not_a_point_embed", emb, (1, d), jnp.float32)
        self.no_mask_embed = self.param("no_mask_embed", emb, (1, d), jnp.float32)
        m = cfg.mask_in_chans
        self.mask_conv0 = _conv(m // 4, 2, 2, 0, jnp.float32, None)
        self.mask_ln0 = LayerNorm(1e-6)
        self.mask_conv1 = _conv(m, 2, 2, 0, jnp.float32, None)
        self.mask_ln1 = LayerNorm(1e-6)
        self.mask_conv2 = _conv(d, 1, 1, 0, jnp.float32, None)

    @property
    def _input_size(self):
        return (self.config.img_size, self.config.img_size)

    def get_dense_pe(self):
        g = self.config.image_embedding_size
        return self.pe_layer.grid(g, g)[None]  # [1, 64, 64, 256]

    def _embed_points(self, coords, labels, pad: bool):
        coords = coords.astype(jnp.float32) + 0.5  # pixel centres
        if pad:
            b = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
        pe = self.pe_layer.with_coords(coords, self._input_size)  # [B, N, 256]
        lab = labels[..., None]
        pe = jnp.where(lab == -1, self.not_a_point_embed[0], pe)
        pe = pe + jnp.where(lab == 0, self.point_embeddings[0][0], 0.0)
        pe = pe + jnp.where(lab == 1, self.point_embeddings[1][0], 0.0)
        return pe

    def _embed_boxes(self, boxes):
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        pe = self.pe_layer.with_coords(corners, self._input_size)  # [B, 2, 256]
        corner = jnp.concatenate([self.point_embeddings[2], self.point_embeddings[3]], axis=0)
        return pe + corner[None]

    def _embed_masks(self, masks):
        x = gelu(self.mask_ln0(self.mask_conv0(masks)))
        x = gelu(self.mask_ln1(self.mask_conv1(x)))
        return self.mask_conv2(x)  # [B, 64, 64, 256]

    def __call__(self, points=None, boxes=None, masks=None, text_embeds=None):
        """points: (coords [B, N, 2] (x, y) in 1024-space, labels [B, N]); boxes [B, 4]
        (x0, y0, x1, y1); masks [B, 256, 256, 1] logits; text_embeds [B, k, 256].

        Returns ``{"sparse_embeddings": [B, n, 256], "dense_embeddings": [B, 64, 64, 256]}``.
        """
        d, g = self.config.prompt_embed_dim, self.config.image_embedding_size
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        elif text_embeds is not None:
            bs = text_embeds.shape[0]
        else:
            bs = 1
        sparse = [jnp.zeros((bs, 0, d), jnp.float32)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        if text_embeds is not None:
            sparse.append(text_embeds.astype(jnp.float32))
        sparse = jnp.concatenate(sparse, axis=1)
        if masks is not None:
            dense = self._embed_masks(masks.astype(jnp.float32))
        else:
            dense = jnp.broadcast_to(self.no_mask_embed[0], (bs, g, g, d))
        return {"sparse_embeddings": sparse, "dense_embeddings": dense}


# --- mask decoder -----------------------------------------------------------------------------

class DecoderAttention(nn.Module):
    """Attention with q/k/v projections to ``dim // downsample_rate`` (SAM's Attention)."""

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v):
        dim = q.shape[-1]
        inner = dim // self.downsample_rate
        hd = inner // self.num_heads
        split = lambda x: x.reshape(*x.shape[:-1], self.num_heads, hd)  # noqa: E731
        q = split(_dense(inner, self.dtype, "q_proj")(q))  # [B, Nq, heads, hd]
        k = split(_dense(inner, self.dtype, "k_proj")(k))  # [B, Nk, heads, hd]
        v = split(_dense(inner, self.dtype, "v_proj")(v))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
        out = out.reshape(*out.shape[:2], inner)
        return _dense(dim, self.dtype, "out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attn, token→image cross-attn, MLP (ReLU), image→token cross-attn."""

    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        dim = queries.shape[-1]
        ln = lambda name: LayerNorm(1e-5, self.dtype, name=name)  # noqa: E731  torch default eps
        self_attn = DecoderAttention(self.num_heads, 1, self.dtype, name="self_attn")
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries)
        queries = ln("norm1")(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = queries + DecoderAttention(self.num_heads, self.downsample_rate, self.dtype,
                                             name="cross_attn_token_to_image")(q, k, keys)
        queries = ln("norm2")(queries)
        y = _dense(self.mlp_dim, self.dtype, "mlp_lin1")(queries)
        queries = queries + _dense(dim, self.dtype, "mlp_lin2")(nn.relu(y))
        queries = ln("norm3")(queries)
        q, k = queries + query_pe, keys + key_pe
        keys = keys + DecoderAttention(self.num_heads, self.downsample_rate, self.dtype,
                                       name="cross_attn_image_to_token")(k, q, queries)
        keys = ln("norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    depth: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embedding, image_pe, point_embedding):
        """image_embedding, image_pe [B, HW, C]; point_embedding [B, N, C]."""
        queries, keys = point_embedding, image_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads, self.mlp_dim, self.downsample_rate, i == 0, self.dtype,
                name=f"layers_{i}")(queries, keys, point_embedding, image_pe)
        q, k = queries + point_embedding, keys + image_pe
        queries = queries + DecoderAttention(self.num_heads, self.downsample_rate, self.dtype,
                                             name="final_attn_token_to_image")(q, k, keys)
        queries = LayerNorm(1e-5, self.dtype, name="norm_final_attn")(queries)
        return queries, keys


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
            e = _conv(d, 3, 1, 1, dt, "compress_vit_conv0")(early_features.astype(dt))
            e = gelu(LayerNorm(1e-6, dt, name="compress_vit_ln")(e))
            src = src + _conv(d, 3, 1, 1, dt, "compress_vit_conv1")(e)  # [Bi, 64, 64, 256]
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


# --- the whole model --------------------------------------------------------------------------

class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder under one parameter tree.

    Call it through its methods with ``apply(..., method=...)``: :meth:`encode_image`,
    :meth:`decode` (prompt encoder + mask decoder), or ``__call__`` (both, for init).
    """

    config: SamConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.image_encoder = ImageEncoderViT(self.config, self.dtype)
        self.prompt_encoder = PromptEncoder(self.config)
        self.mask_decoder = MaskDecoder(self.config, self.dtype)

    def encode_image(self, images):
        """images [B, 1024, 1024, 3] (normalised, padded) → encoder dict."""
        return self.image_encoder(images)

    def decode(self, image_embeddings, points=None, boxes=None, masks=None, text_embeds=None,
               multimask_output: bool = False, early_features=None, image_index=None):
        """Prompts → {low_res_masks [B, C, 256, 256], iou_predictions [B, C], ...}."""
        prompts = self.prompt_encoder(points, boxes, masks, text_embeds)
        out = self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(),
                                prompts["sparse_embeddings"], prompts["dense_embeddings"],
                                multimask_output, early_features=early_features,
                                image_index=image_index)
        return {**out, **prompts}

    def __call__(self, images, points=None, boxes=None, masks=None, text_embeds=None,
                 multimask_output: bool = False):
        enc = self.encode_image(images)
        early = enc["early_features"] if self.config.use_compress_vit else None
        if points is None and boxes is None and masks is None and text_embeds is None:
            points = (jnp.zeros((images.shape[0], 1, 2)), jnp.ones((images.shape[0], 1), jnp.int32))
        dec = self.decode(enc["image_embeddings"], points, boxes, masks, text_embeds,
                          multimask_output, early_features=early)
        return {**enc, **dec}


def abstract_params(config: SamConfig):
    """Parameter shapes of ``Sam(config)`` without allocating them (jax.eval_shape)."""
    model = Sam(config)
    b = 1
    images = jax.ShapeDtypeStruct((b, config.img_size, config.img_size, 3), jnp.float32)
    masks = jax.ShapeDtypeStruct((b, 4 * config.image_embedding_size,
                                  4 * config.image_embedding_size, 1), jnp.float32)
    pts = (jax.ShapeDtypeStruct((b, 1, 2), jnp.float32), jax.ShapeDtypeStruct((b, 1), jnp.int32))
    boxes = jax.ShapeDtypeStruct((b, 4), jnp.float32)
    shapes = jax.eval_shape(
        lambda i, p, bx, m: model.init(jax.random.PRNGKey(0), i, p, bx, m), images, pts, boxes,
        masks)
    return shapes["params"]


def init_params(config: SamConfig, seed: int = 0):
    """Random parameters of ``Sam(config)`` (tests, demo). Small image → fast init."""
    from m2sa_jax.tree import flatten, unflatten

    flat = flatten(abstract_params(config))
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flat.items():
        x = rng.normal(0.0, 0.02, s.shape).astype(np.float32)
        if path.endswith("/weight"):  # LayerNorm scales around 1
            x += 1.0
        out[path] = jnp.asarray(x)
    return unflatten(out)



def select_compute_dtype(name: Optional[str]):
    return {None: jnp.float32, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


__all__: Sequence[str] = (
    "SamConfig", "SAM_CONFIGS", "sam_config", "narrow_config", "Sam", "ImageEncoderViT",
    "PromptEncoder", "MaskDecoder", "postprocess_masks", "postprocess_masks_padded",
    "get_rel_pos", "abstract_params", "init_params", "interpolate_bilinear",
)

"""Bilinear / linear interpolation exactly like torch ``F.interpolate`` (align_corners=False,
no antialias) as separable weight matrices, and SAM's mask postprocessing built on it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from m2sa_jax.models.sam.common import HIGHEST


def interp_weights(out_size, in_size, n_out: int, n_in: int):
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


def resize_hw(x, wh, ww):
    """x [..., H, W] → [..., h', w'] with separable weights wh [h', H], ww [w', W]."""
    x = jnp.einsum("...hw,vw->...hv", x, ww, precision=HIGHEST)
    return jnp.einsum("...hv,uh->...uv", x, wh, precision=HIGHEST)


def interpolate_bilinear(x, size: tuple[int, int]):
    """torch ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on [..., H, W]."""
    h, w = x.shape[-2:]
    wh = interp_weights(size[0], h, size[0], h)
    ww = interp_weights(size[1], w, size[1], w)
    return resize_hw(x.astype(jnp.float32), wh, ww)


def postprocess_masks(low_res_logits, input_size: tuple[int, int], original_size: tuple[int, int],
                      img_size: int = 1024):
    """Mask logits [..., 256, 256] → [..., H, W] at the original image size (SAM's recipe).

    Bilinear to ``img_size``², crop to the resized (unpadded) ``input_size``, bilinear to
    ``original_size``; all with align_corners=False and no antialiasing, like PyTorch.
    """
    x = interpolate_bilinear(low_res_logits, (img_size, img_size))
    x = x[..., : input_size[0], : input_size[1]]
    return interpolate_bilinear(x, tuple(original_size))


def postprocess_masks_padded(low_res_logits, input_size, original_size,
                             max_size: tuple[int, int], img_size: int = 1024):
    """jit-friendly :func:`postprocess_masks` with a static output shape.

    ``input_size`` and ``original_size`` are int arrays ``[2]`` (may be traced, one image);
    the result is ``[..., max_size[0], max_size[1]]`` whose top-left ``original_size`` block
    equals :func:`postprocess_masks` and whose remainder is 0. Use ``jax.vmap`` over images.
    """
    lr = low_res_logits.shape[-2:]
    up = resize_hw(low_res_logits.astype(jnp.float32),
                    interp_weights(img_size, lr[0], img_size, lr[0]),
                    interp_weights(img_size, lr[1], img_size, lr[1]))  # [..., 1024, 1024]
    wh = interp_weights(original_size[0], input_size[0], max_size[0], img_size)
    ww = interp_weights(original_size[1], input_size[1], max_size[1], img_size)
    return resize_hw(up, wh, ww)


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
        up = interp_weights(img_size, n_low, img_size, n_low)[:n_in]           # [n_in, n_low]
        down = interp_weights(n_out, n_in, n_out, n_in)                        # [n_out, n_in]
        return (down.astype(np.float64) @ up.astype(np.float64)).astype(np.float32)

    a_h = axis(x.shape[-2], int(input_size[0]), int(original_size[0]))
    a_w = axis(x.shape[-1], int(input_size[1]), int(original_size[1]))
    return np.matmul(np.matmul(a_h, x), a_w.T)

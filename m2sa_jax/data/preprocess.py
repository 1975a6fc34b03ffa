"""Image preprocessing for both branches (SPEC §3), shared by training, eval and the predictors.

NumPy + PIL on the host, exactly as the PyTorch pipeline does it:

* SAM: resize the longest side to 1024 with PIL bilinear on uint8 (what torchvision's
  ``resize`` does to a PIL image in segment_anything's ``ResizeLongestSide``), normalise with
  ImageNet mean/std on 0-255, zero-pad bottom/right to 1024×1024.
* CLIP: shortest side → 224 with PIL bicubic, centre crop 224, rescale to [0, 1], CLIP
  mean/std (``CLIPImageProcessor`` of transformers 4.31, the slow PIL path).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SAM_IMAGE_SIZE = 1024
SAM_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
SAM_PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)

CLIP_IMAGE_SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def resize_longest_side_shape(h: int, w: int, long_side: int = SAM_IMAGE_SIZE) -> tuple[int, int]:
    """Output (h, w) with the longest side = ``long_side`` (segment_anything's rounding)."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def sam_resize(image: np.ndarray, long_side: int = SAM_IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [h', w', 3] with max(h', w') == long_side (PIL bilinear)."""
    image = _as_uint8_rgb(image)
    h, w = resize_longest_side_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def sam_normalize_pad(resized: np.ndarray, size: int = SAM_IMAGE_SIZE) -> np.ndarray:
    """uint8 [h, w, 3] → float32 [size, size, 3], normalised then zero-padded bottom/right."""
    x = (resized.astype(np.float32) - SAM_PIXEL_MEAN) / SAM_PIXEL_STD
    out = np.zeros((size, size, 3), np.float32)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def sam_preprocess(image: np.ndarray, size: int = SAM_IMAGE_SIZE):
    """RGB uint8 image → (float32 [size, size, 3] NHWC-ready, resized (h, w), original (H, W))."""
    image = _as_uint8_rgb(image)
    resized = sam_resize(image, size)
    return sam_normalize_pad(resized, size), resized.shape[:2], image.shape[:2]


def clip_preprocess(image: np.ndarray, size: int = CLIP_IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 image → float32 [size, size, 3] (CLIPImageProcessor: resize, crop, normalise)."""
    image = _as_uint8_rgb(image)
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top: top + size, left: left + size]
    x = crop.astype(np.float64) * (1 / 255)
    return ((x.astype(np.float32) - CLIP_MEAN) / CLIP_STD).astype(np.float32)

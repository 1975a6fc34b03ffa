"""Safe image loading: any file PIL reads → RGB uint8 [H, W, 3], as the PyTorch code sees it.

The public code reads images with ``cv2.imread(path)`` (IMREAD_COLOR) + BGR→RGB. We match what
that call returns, with PIL only:

* EXIF orientation is **applied**: OpenCV ≥ 3.1 rotates IMREAD_COLOR images by their EXIF
  orientation tag unless IMREAD_IGNORE_ORIENTATION is passed, which the public code does not do.
  (tests/test_mmr_images.py checks this against OpenCV.)
* grayscale and palette images are expanded to RGB; alpha is dropped, not composited;
* 16-bit images keep their high byte (OpenCV's 16→8-bit conversion is ``value >> 8``);
* CMYK JPEGs go through PIL's conversion (within ±1 of OpenCV's libjpeg path).

Errors are :class:`~m2sa_jax.data.types.BadRecord` with reason ``missing_image`` or
``corrupt_image`` and name the file, so a loader can count and skip them.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from m2sa_jax.data.types import BadRecord


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.uint32)
        if mode == "I" and array.max(initial=0) < 256:        # 8-bit data stored as int32
            gray = array.astype(np.uint8)
        else:
            gray = (array >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("LA", "La"):
        image = image.convert("L")                              # alpha dropped
    elif mode in ("RGBA", "RGBa", "PA"):
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[..., :3])
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def load_rgb(path: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] of ``path`` (EXIF-rotated, like cv2.imread), or BadRecord naming it."""
    if not os.path.isfile(path):
        raise BadRecord("missing_image", f"{path}: image file not found; check the images root "
                        "and the record's file_name")
    return _decode(path, path)


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """:func:`load_rgb` of an image file's bytes (a record that carries its image); ``name``
    says where the bytes came from in errors."""
    return _decode(io.BytesIO(data), name)


def _decode(file, path: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb_uint8(image)
    except BadRecord:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadRecord("corrupt_image", f"{path}: cannot decode image ({type(e).__name__}: {e}); "
                        "re-download or remove the file") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadRecord("corrupt_image", f"{path}: decoded to shape {rgb.shape}, not [H, W, 3]")
    return rgb


def image_size(path: str) -> tuple[int, int]:
    """(height, width) after EXIF orientation, reading only the header."""
    if not os.path.isfile(path):
        raise BadRecord("missing_image", f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as e:
        raise BadRecord("corrupt_image", f"{path}: cannot read image header ({e})") from e
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)

"""What the server sends back: uploads decoded, masks as COCO RLE or PNG, zips, answer spans."""

from __future__ import annotations

import base64
import io
import json
import re
import warnings
import zipfile

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from m2sa_jax.data.images import _to_rgb_uint8
from m2sa_jax.data.types import SEG_TOKEN
from m2sa_jax.inference.engine import InputError, Segmented
from m2sa_jax.inference.overlay import PALETTE

MASK_FORMATS = ("rle", "png", "none")


def decode_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Uploaded bytes → RGB uint8 [H, W, 3] (EXIF-rotated, as ``load_rgb`` reads files).

    The size is checked from the header before any pixel is decoded; every failure is an
    :class:`InputError` that names the upload and says what to send instead.
    """
    if not data:
        raise InputError(f"{name}: the file is empty; send a JPEG, PNG or WebP image", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name}: {e}; send a smaller image", 413) from None
    except Exception as e:
        raise InputError(f"{name}: not an image this server can read ({type(e).__name__}); "
                         f"send a JPEG, PNG or WebP image", 400) from None
    w, h = image.size
    if w * h > max_pixels:
        raise InputError(f"{name}: {w}×{h} = {w * h / 1e6:.1f} MP is above this server's limit of "
                         f"{max_pixels / 1e6:g} MP; send a smaller image", 413)
    try:
        image.load()
        rgb = _to_rgb_uint8(ImageOps.exif_transpose(image))
    except Exception as e:
        raise InputError(f"{name}: cannot decode the image ({type(e).__name__}: {e}); the file "
                         f"is truncated or corrupt", 400) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise InputError(f"{name}: decoded to shape {rgb.shape}, not an [H, W, 3] image", 400)
    return rgb


def mask_rle(mask: np.ndarray) -> dict:
    """bool [H, W] → COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).convert("1").save(buf, format="PNG",
                                                                    optimize=True)
    return buf.getvalue()


def mask_records(result: Segmented, fmt: str) -> list[dict]:
    """One dict per mask: label, area, bbox [x, y, w, h], and ``rle`` or ``png`` (base64)."""
    if fmt == "none":
        return []
    out = []
    for label, m in zip(result.labels, result.masks):
        raw = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rec = {"label": label, "area": int(m.sum()),
               "bbox": [float(v) for v in mask_utils.toBbox(raw)]}
        if fmt == "rle":
            rec["rle"] = {"size": [int(v) for v in raw["size"]],
                          "counts": raw["counts"].decode("ascii")}
        else:
            rec["png"] = base64.b64encode(mask_png(m)).decode("ascii")
        out.append(rec)
    return out


def coco_annotations(result: Segmented) -> list[dict]:
    """The masks as COCO-style annotations (segmentation = compressed RLE)."""
    return [{"id": k + 1, "category_name": rec["label"], "segmentation": rec["rle"],
             "area": rec["area"], "bbox": rec["bbox"], "iscrowd": 0}
            for k, rec in enumerate(mask_records(result, "rle"))]


def masks_zip(result: Segmented) -> bytes:
    """``mask_<k>.png`` per mask plus ``result.json`` (question, answer, labels, files)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        files = []
        for k, m in enumerate(result.masks):
            z.writestr(f"mask_{k + 1}.png", mask_png(m))
            files.append({"file": f"mask_{k + 1}.png", "label": result.labels[k],
                          "area": int(m.sum())})
        z.writestr("result.json", json.dumps({"question": result.question,
                                              "answer": result.answer, "masks": files}, indent=2))
    return buf.getvalue()


def answer_spans(answer: str, labels: list[str]) -> list[tuple[str, int | None]]:
    """The answer cut into (text, mask index or None): each [SEG]'s label phrase carries the
    index of its mask, the [SEG] tokens themselves are dropped."""
    chunks = answer.split(SEG_TOKEN)
    spans: list[tuple[str, int | None]] = []
    for k, chunk in enumerate(chunks):
        label = labels[k] if k < len(chunks) - 1 and k < len(labels) else ""
        at = chunk.rfind(label) if label else -1
        if at < 0:
            spans.append((chunk, None))
            if k < len(chunks) - 1:
                spans.append((f"[mask {k + 1}]", k))
            continue
        spans += [(chunk[:at], None), (label, k), (chunk[at + len(label):], None)]
    merged: list[tuple[str, int | None]] = []
    for t, i in spans:
        if i is None and merged and merged[-1][1] is None:
            merged[-1] = (merged[-1][0] + t, None)
        else:
            merged.append((t, i))
    tidy = [(re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", t)) if i is None else t, i)
            for t, i in merged]                 # "the cup [SEG] ." → "the cup."
    return [(t, i) for t, i in tidy if t]


def mask_colour(k: int) -> str:
    r, g, b = (int(c) for c in PALETTE[k % len(PALETTE)])
    return f"#{r:02x}{g:02x}{b:02x}"

"""Mask overlays people can look at: tinted masks, outlines and a legend."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
], np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay(image: np.ndarray, masks: np.ndarray, labels: Sequence[str] = (),
            title: str = "", alpha: float = 0.45, points: np.ndarray | None = None) -> Image.Image:
    """RGB uint8 [H, W, 3] + bool [N, H, W] → a PIL image with tinted masks and a legend."""
    out = image.astype(np.float32).copy()
    for i, m in enumerate(masks):
        color = PALETTE[i % len(PALETTE)].astype(np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * color
        out[_outline(m)] = color
    canvas = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if points is not None:
        for x, y in np.asarray(points).reshape(-1, 2):
            r = max(3, min(canvas.size) // 100)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 0), outline=(0, 0, 0))
    rows = [title] if title else []
    rows += [f"{i + 1}: {lab or f'mask {i + 1}'}" for i, lab in enumerate(labels)]
    if not rows:
        return canvas
    font = ImageFont.load_default()
    line = 14
    legend = Image.new("RGB", (canvas.width, len(rows) * line + 8), (255, 255, 255))
    ld = ImageDraw.Draw(legend)
    y = 4
    for k, row in enumerate(rows):
        i = k - (1 if title else 0)
        if i >= 0:
            ld.rectangle([4, y + 2, 14, y + 12], fill=tuple(int(c) for c in PALETTE[i % len(PALETTE)]))
        ld.text((20 if i >= 0 else 4, y), row, fill=(0, 0, 0), font=font)
        y += line
    full = Image.new("RGB", (canvas.width, canvas.height + legend.height), (255, 255, 255))
    full.paste(canvas, (0, 0))
    full.paste(legend, (0, canvas.height))
    return full

"""How far the mask loss moves when an image larger than the mask canvas is scored on the
canvas-sized grid instead of at its original size.

The public code upsamples each mask's 256×256 logits to 1024², crops the resized image and
resizes bilinearly to the original H×W, then takes BCE and Dice there. For an image larger than
the canvas (Mapillary: 1920×1080 up to 4000×3000 and more) training here scores the crop itself
(the grid SAM resized the image to) against the ground truth reduced to that grid
(``data.pipeline.grid_masks``). This script draws street scenes at Mapillary sizes with the
classes that suffer most from a coarser grid (poles, wires, lane markings, signs, distant
people), builds logits of three qualities in SAM's geometry, and compares per-mask BCE and Dice
computed both ways with the training code's own loss functions (``training.losses``).

    python -m bench.mask_loss_grid [--sizes 3000x4000 1080x1920] [--seed 0]

Reported: per class and logit quality, the original-size terms and the relative difference of
the grid terms; per quality, the loss as the paper weights it (0.5·BCE + 2·Dice, averaged over
the masks) both ways.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from PIL import Image, ImageDraw

from m2sa_jax.data import pipeline, preprocess
from m2sa_jax.models.sam.postprocess import interp_weights
from m2sa_jax.training.losses import mask_targets, per_mask_bce, per_mask_dice

LOW_RES = 256
QUALITIES = ("trained", "rough", "untrained")
BCE_WEIGHT, DICE_WEIGHT = 0.5, 2.0          # the paper's weights (SPEC §4)


def street_scene(h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Class masks (bool [h, w]) of a drawn street scene at its full size. Thin and small
    classes are sized as they appear in Mapillary photos of this size (a pole 0.3–0.6 % of the
    width, a cable 1 px per 1000 px, a sign ~1.5 % of the width)."""
    rng = np.random.default_rng(seed)
    s = w / 4000.0                                        # sizes below are for a 4000-px width

    def canvas():
        return Image.new("L", (w, h), 0)

    def done(im):
        return np.asarray(im) > 0

    scene = {}
    im = canvas()
    horizon = [(x, int(h * (0.35 + 0.05 * np.sin(x / w * 7 + seed)))) for x in range(0, w + 50, 50)]
    ImageDraw.Draw(im).polygon([(0, 0), (w, 0)] + horizon[::-1], fill=1)
    scene["sky"] = done(im)
    im = canvas()
    ImageDraw.Draw(im).polygon([(0, h), (w, h), (int(w * 0.62), int(h * 0.5)),
                                (int(w * 0.38), int(h * 0.5))], fill=1)
    scene["road"] = done(im)
    im = canvas()
    d = ImageDraw.Draw(im)
    for k in range(6):      # dashed lane marking, 15 px wide at 4000
        y0 = h * (0.55 + 0.07 * k)
        x0 = w * (0.5 + 0.01 * k)
        d.line([(x0, y0), (x0 + 20 * s, y0 + h * 0.04)], fill=1, width=max(1, round(15 * s)))
    scene["lane marking"] = done(im)
    im = canvas()
    d = ImageDraw.Draw(im)
    for x, width in ((0.12, 24), (0.71, 14), (0.86, 18)):
        d.rectangle([w * x, h * 0.15, w * x + width * s, h * 0.62], fill=1)
    scene["pole"] = done(im)
    im = canvas()
    d = ImageDraw.Draw(im)
    pts = [(x, h * 0.2 + 0.05 * h * ((x / w - 0.5) ** 2) * 4) for x in np.linspace(0, w, 64)]
    d.line(pts, fill=1, width=max(1, round(4 * s)))
    scene["cable"] = done(im)
    im = canvas()
    d = ImageDraw.Draw(im)
    for cx, cy in ((0.125, 0.2), (0.715, 0.25)):
        r = 30 * s
        d.ellipse([w * cx - r, h * cy - r, w * cx + r, h * cy + r], fill=1)
    scene["traffic sign"] = done(im)
    im = canvas()
    d = ImageDraw.Draw(im)
    for k in range(3):
        x, y = w * rng.uniform(0.2, 0.8), h * rng.uniform(0.6, 0.8)
        d.rounded_rectangle([x, y, x + 600 * s, y + 280 * s], radius=60 * s, fill=1)
    scene["car"] = done(im)
    im = canvas()
    d = ImageDraw.Draw(im)
    for k in range(4):
        x, y = w * rng.uniform(0.05, 0.95), h * rng.uniform(0.5, 0.6)
        d.ellipse([x, y, x + 40 * s, y + 110 * s], fill=1)
    scene["person"] = done(im)
    im = canvas()
    ImageDraw.Draw(im).rectangle([0, h * 0.2, w * 0.3, h * 0.55], fill=1)
    scene["building"] = done(im) & ~scene["pole"]
    return scene


def _area_reduce(coverage: np.ndarray, factor: int) -> np.ndarray:
    h, w = coverage.shape
    return coverage.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def low_res_logits(mask: np.ndarray, quality: str, rng: np.random.Generator,
                   img_size: int = preprocess.SAM_IMAGE_SIZE) -> np.ndarray:
    """float32 [256, 256] logits in SAM's geometry (resized image top-left in the padded
    square). "trained": the mask's coverage of each low-res cell mapped to ±6 with the edge at
    half coverage; "rough": the mask shifted by ~2 % of the image, blurred, with noise;
    "untrained": smooth noise around −1."""
    h, w = mask.shape
    rh, rw = preprocess.resize_longest_side_shape(h, w, img_size)
    cover = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((rw, rh), Image.BOX),
                       np.float32) / 255
    padded = np.zeros((img_size, img_size), np.float32)
    padded[:rh, :rw] = cover
    c = _area_reduce(padded, img_size // LOW_RES)                        # [256, 256]
    if quality == "trained":
        return (12.0 * (c - 0.5)).astype(np.float32)
    if quality == "rough":
        shift = np.roll(c, (5, -4), axis=(0, 1))
        blur = np.asarray(Image.fromarray(shift).resize((64, 64), Image.BOX).resize(
            (LOW_RES, LOW_RES), Image.BILINEAR), np.float32)
        noise = np.asarray(Image.fromarray(rng.normal(0, 1, (32, 32)).astype(np.float32)).resize(
            (LOW_RES, LOW_RES), Image.BILINEAR), np.float32)
        return (6.0 * (blur - 0.3) + noise).astype(np.float32)
    if quality == "untrained":
        noise = rng.normal(0, 1.0, (16, 16)).astype(np.float32)
        return np.asarray(Image.fromarray(noise).resize((LOW_RES, LOW_RES), Image.BILINEAR),
                          np.float32) - 1.0
    raise ValueError(quality)


def _sparse(out_size: int, in_size: int, n_in: int) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix(interp_weights(out_size, in_size, out_size, n_in))


def logits_both_ways(low: np.ndarray, original_hw, img_size: int = preprocess.SAM_IMAGE_SIZE):
    """(logits at the original size, logits on the grid): SAM's postprocessing with the same
    interpolation weights as the model (``interp_weights``), evaluated sparsely."""
    up = _sparse(img_size, LOW_RES, LOW_RES) @ low @ _sparse(img_size, LOW_RES, LOW_RES).T
    rh, rw = preprocess.resize_longest_side_shape(*original_hw, img_size)
    crop = np.ascontiguousarray(up[:rh, :rw], np.float32)                 # the grid's logits
    h, w = original_hw
    full = _sparse(h, rh, rh) @ (_sparse(w, rw, rw) @ crop.T).T           # [H, W]
    return np.asarray(full, np.float32), crop


@jax.jit
def _terms(logits, targets):
    lg, tg = logits[None], mask_targets(targets)[None]
    valid = jnp.ones(lg.shape, bool)
    return per_mask_bce(lg, tg, valid)[0], per_mask_dice(lg, tg, valid)[0]


def terms(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(BCE, Dice) of one mask with the training code's per-mask functions; ``targets`` bool,
    or uint8 coverage as the training batch holds it."""
    bce, dice = _terms(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    return float(bce), float(dice)


@dataclasses.dataclass
class Row:
    size: tuple[int, int]
    name: str
    quality: str
    bce: float                  # at the original size (the public code)
    dice: float
    bce_grid: float             # on the grid, ground truth reduced by grid_masks
    dice_grid: float

    def loss(self, grid: bool) -> float:
        b, d = (self.bce_grid, self.dice_grid) if grid else (self.bce, self.dice)
        return BCE_WEIGHT * b + DICE_WEIGHT * d


def measure(size: tuple[int, int], seed: int = 0, qualities=QUALITIES,
            classes: tuple[str, ...] | None = None) -> list[Row]:
    """One scene at ``size`` (H, W), every class (or ``classes``) and logit quality."""
    rng = np.random.default_rng(seed + 1)
    scene = street_scene(*size, seed=seed)
    grid_hw = pipeline.grid_hw(size, (preprocess.SAM_IMAGE_SIZE,) * 2)
    rows = []
    for name, mask in scene.items():
        if classes is not None and name not in classes:
            continue
        on_grid = pipeline.grid_masks(mask[None], grid_hw)[0]
        for quality in qualities:
            full, crop = logits_both_ways(low_res_logits(mask, quality, rng), size)
            assert crop.shape == on_grid.shape == grid_hw
            rows.append(Row(size, name, quality, *terms(full, mask), *terms(crop, on_grid)))
    return rows


def relative(a: float, b: float) -> float:
    return (b - a) / a if a else float("inf") if b else 0.0


def report(rows: list[Row]) -> None:
    print(f"{'size':>10} {'class':>13} {'logits':>9} | {'BCE':>8} {'Δrel':>7} | {'Dice':>7} {'Δrel':>7}")
    for r in rows:
        print(f"{r.size[0]:>4}x{r.size[1]:<5} {r.name:>13} {r.quality:>9} | {r.bce:8.4f} "
              f"{relative(r.bce, r.bce_grid):+7.2%} | {r.dice:7.4f} {relative(r.dice, r.dice_grid):+7.2%}")
    print(f"\nloss = {BCE_WEIGHT}·BCE + {DICE_WEIGHT}·Dice, mean over the masks of each size and "
          "logit quality:")
    for size in sorted({r.size for r in rows}):
        for q in QUALITIES:
            sel = [r for r in rows if r.size == size and r.quality == q]
            if not sel:
                continue
            orig = float(np.mean([r.loss(False) for r in sel]))
            grid = float(np.mean([r.loss(True) for r in sel]))
            worst = max(sel, key=lambda r: abs(relative(r.loss(False), r.loss(True))))
            print(f"  {size[0]}x{size[1]} {q:>9}: original {orig:.5f}, grid {grid:.5f} "
                  f"({relative(orig, grid):+.3%}); largest per-mask difference "
                  f"{relative(worst.loss(False), worst.loss(True)):+.2%} ({worst.name})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["3000x4000", "1080x1920"],
                        help="image sizes HxW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for s in args.sizes:
        h, w = (int(v) for v in s.lower().split("x"))
        rows += measure((h, w), args.seed)
    report(rows)


if __name__ == "__main__":
    main()

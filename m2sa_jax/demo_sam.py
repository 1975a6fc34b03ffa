"""Point-prompted SAM on a real photograph; writes an overlay PNG.

    python -m m2sa_jax.demo_sam [--checkpoint DIR] [--out DIR]

``--checkpoint`` is a directory converted with ``python -m checkpoints_convert sam``. Without
it a ViT-B with seeded random weights runs, so the pipeline can be seen end to end without
downloading anything (the mask is then meaningless).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from m2sa_jax.models.sam import init_params, sam_config
from m2sa_jax.inference.sam_predictor import SamPredictor


def overlay(image: np.ndarray, mask: np.ndarray, point: tuple[float, float]) -> Image.Image:
    """Image with the mask tinted blue and the prompt point as a red dot."""
    tint = np.array([30, 144, 255], np.float32)
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * tint
    pil = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(4, round(0.012 * max(image.shape[:2])))
    x, y = point
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 20, 20), outline=(255, 255, 255),
                 width=2)
    return pil


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="converted SAM directory (default: random ViT-B)")
    ap.add_argument("--out", default="outputs/demo_sam", help="folder for the overlay PNG")
    args = ap.parse_args(argv)

    import skimage.data

    if args.checkpoint:
        predictor = SamPredictor.from_pretrained(args.checkpoint)
        print(f"SAM {predictor.config.model_type} from {args.checkpoint}")
    else:
        config = sam_config("vit_b")
        predictor = SamPredictor(init_params(config, seed=0), config)
        print("NOTE: no --checkpoint given: SAM ViT-B with RANDOM weights (seed 0); the mask "
              "below is meaningless.\n  For real masks: download sam_vit_b_01ec64.pth (or vit_h), "
              "then\n  python -m checkpoints_convert sam --src sam_vit_b_01ec64.pth --dst "
              "ckpt/sam_vit_b\n  python -m m2sa_jax.demo_sam --checkpoint ckpt/sam_vit_b")

    image = skimage.data.astronaut()  # [512, 512, 3] uint8 RGB
    point = (250.0, 170.0)  # on the astronaut's face
    t0 = time.perf_counter()
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([point]), point_labels=np.array([1]),
                                         multimask_output=True)
    best = int(np.argmax(scores))
    print(f"encoded + decoded in {time.perf_counter() - t0:.1f} s; predicted IoU per mask "
          f"{', '.join(f'{s:.3f}' for s in scores)}, kept mask {best} ({int(masks[best].sum())} pixels)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.abspath(os.path.join(args.out, "sam_point_overlay.png"))
    overlay(image, masks[best], point).save(path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

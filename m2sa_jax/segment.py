"""Command line: ask a LISA/M²SA model about an image and save its masks.

    python -m m2sa_jax.segment --checkpoint converted/m2sa_7b --image kitchen.jpg \\
        --question "Which parts would you hold to carry both cups?" --out outputs/kitchen

``--checkpoint`` is any model source: a converted directory, a LISA/M²SA PyTorch folder
(converted in memory; its CLIP tower from the folder, --vision-tower or config.json's
mm_vision_tower), a training workdir (the README demo's ``outputs/synthetic``; ``DIR@STEP`` for
a given step) or a Hugging Face id in the local cache.

Writes ``mask_<k>.png`` (one per [SEG], white = target), ``overlay.png`` (masks tinted on the
image with a legend) and ``result.json`` (question, answer, labels, mask files and areas).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from m2sa_jax import dtypes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2sa_jax.segment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="converted directory, LISA/M²SA folder, training workdir "
                             "(DIR or DIR@STEP) or Hugging Face id in the local cache")
    parser.add_argument("--image", required=True, help="image file (any format PIL reads)")
    parser.add_argument("--question", required=True, help="what to ask about the image")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--vision-tower", default=None, metavar="PATH_OR_ID",
                        help="CLIP tower for a folder saved without one (default: config.json's "
                             "mm_vision_tower)")
    parser.add_argument("--dtype", choices=dtypes.NAMES, default="float32",
                        help="language model dtype (bfloat16 halves a 7B's memory)")
    parser.add_argument("--sam-dtype", choices=dtypes.NAMES, default="float32",
                        help="SAM's dtype")
    parser.add_argument("--save-converted", default=None, metavar="DIR",
                        help="also write the converted model there (PyTorch folder sources)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --save-converted replace a non-empty folder")
    args = parser.parse_args(argv)

    from m2sa_jax.inference.predictor import load, read_image

    try:
        if not args.question.strip():
            raise ValueError("--question is empty: ask something about the image")
        image = read_image(args.image)
        predictor = load(args.checkpoint, max_new_tokens=args.max_new_tokens,
                         vision_tower=args.vision_tower, dtype=args.dtype,
                         sam_dtype=args.sam_dtype, save_converted=args.save_converted,
                         overwrite=args.overwrite)
        result = predictor.segment(image, args.question)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    files = []
    for k, m in enumerate(result.masks):
        name = f"mask_{k + 1}.png"
        Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(args.out, name))
        files.append(name)
    from m2sa_jax.inference.overlay import overlay

    overlay(image, result.masks, result.labels, title=f"Q: {args.question}").save(
        os.path.join(args.out, "overlay.png"))
    summary = dict(question=args.question, answer=result.answer, labels=result.labels,
                   masks=[dict(file=f, label=l, area=int(m.sum()))
                          for f, l, m in zip(files, result.labels, result.masks)],
                   image=os.path.abspath(args.image), checkpoint=predictor.source)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"answer: {result.answer}")
    if not files:
        print("the answer has no [SEG]: no masks")
    for f_, l_ in zip(files, result.labels):
        print(f"  {f_}: {l_}")
    print(f"wrote {os.path.join(os.path.abspath(args.out), 'overlay.png')} and result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

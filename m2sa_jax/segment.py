"""Command line: ask a LISA/M²SA model about an image and save its masks.

    python -m m2sa_jax.segment --checkpoint converted/m2sa_7b --image kitchen.jpg \\
        --question "Which parts would you hold to carry both cups?" --out outputs/kitchen

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2sa_jax.segment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="directory written by `python -m checkpoints_convert m2sa`")
    parser.add_argument("--image", required=True, help="image file (any format PIL reads)")
    parser.add_argument("--question", required=True, help="what to ask about the image")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from m2sa_jax.pipeline import load, read_image

    try:
        if not args.question.strip():
            raise ValueError("--question is empty: ask something about the image")
        image = read_image(args.image)
        predictor = load(args.checkpoint, max_new_tokens=args.max_new_tokens)
        result = predictor.segment(image, args.question)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    files = []
    for k, m in enumerate(result.masks):
        name = f"mask_{k + 1}.png"
        Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(args.out, name))
        files.append(name)
    from m2sa_jax.overlay import overlay

    overlay(image, result.masks, result.labels, title=f"Q: {args.question}").save(
        os.path.join(args.out, "overlay.png"))
    summary = dict(question=args.question, answer=result.answer, labels=result.labels,
                   masks=[dict(file=f, label=l, area=int(m.sum()))
                          for f, l, m in zip(files, result.labels, result.masks)],
                   image=os.path.abspath(args.image), checkpoint=os.path.abspath(args.checkpoint))
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

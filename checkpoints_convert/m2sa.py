"""``python -m checkpoints_convert m2sa``: a LISA / M²SA folder ⇄ a converted directory.

    python -m checkpoints_convert m2sa --src M2SA-7B/ --dst converted/m2sa_7b [--dtype bfloat16]
    python -m checkpoints_convert m2sa --src M2SA-7B/ --vision-tower clip-vit-large-patch14/ --dst ...
    python -m checkpoints_convert m2sa --src M2SA-7B/ --dst converted/m2sa_7b_int8 --quantize int8
    python -m checkpoints_convert m2sa --export --src converted/m2sa_7b --dst M2SA-7B-back/

Released folders carry no CLIP weights; the tower comes from --vision-tower or config.json's
mm_vision_tower (a folder, absolute or relative to the checkpoint, or a Hugging Face id found in
the local cache; nothing is downloaded). The converted directory records where it came from.
Key tables: m2sa_jax/checkpoints/m2sa.py.
"""

from __future__ import annotations

import argparse

from m2sa_jax import dtypes
from m2sa_jax.checkpoints import m2sa as m2sa_ckpt


def _main(args) -> int:
    if args.export:
        out = m2sa_ckpt.export_folder(args.src, args.dst, dtype=args.dtype)
    else:
        out = m2sa_ckpt.convert_to_directory(args.src, args.dst, scan=args.scan, dtype=args.dtype,
                                             vision_tower=args.vision_tower,
                                             overwrite=args.overwrite, quantize=args.quantize,
                                             quantize_vision=args.quantize_vision)
    print(f"{'exported' if args.export else 'converted'} {args.src} → {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "m2sa", help="LISA or M²SA Hugging Face folder (LLaVA + SAM + [SEG] projector)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="checkpoint folder (or converted dir with --export)")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--dtype", choices=dtypes.NAMES, default=None,
                   help="output dtype of floating-point weights (default: as stored)")
    p.add_argument("--scan", action="store_true", help="stack LLaMA layers for nn.scan")
    p.add_argument("--vision-tower", default=None, metavar="PATH_OR_ID",
                   help="the CLIP tower when the folder has none (default: config.json's "
                        "mm_vision_tower)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of a non-empty --dst")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="store the LLM's linear layers quantized (weight-only): the directory "
                        "then loads without float weights, e.g. a 7B in ~7.5 GB with int8")
    p.add_argument("--quantize-vision", action="store_true",
                   help="with --quantize: also CLIP's and SAM's ViT linear layers")
    p.add_argument("--export", action="store_true",
                   help="the other way: converted directory → LISA/M²SA PyTorch folder")
    p.set_defaults(func=_main)

"""``python -m checkpoints_convert llava``: a LLaMA / Vicuna or LLaVA folder → a converted directory.

    python -m checkpoints_convert llava --src LLaVA-Lightning-7B-v1/ --dst converted/llava_7b

Layouts and key tables are in m2sa_jax/checkpoints/llava.py; a LLaVA v1 folder saved without its
CLIP tower takes it from --vision-tower or config.json's mm_vision_tower (a folder, or a Hugging
Face id in the local cache).
"""

from __future__ import annotations

from m2sa_jax import dtypes
from m2sa_jax.checkpoints import llava as llava_ckpt


def _main(args) -> int:
    dst = llava_ckpt.convert_to_directory(args.src, args.dst, scan=args.scan, dtype=args.dtype,
                                          vision_tower=args.vision_tower,
                                          overwrite=args.overwrite)
    print(f"converted {args.src} → {dst}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "llava", help="LLaMA/Vicuna or LLaVA (v1/LISA or llava-hf) Hugging Face folder",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="Hugging Face folder (config.json + weights)")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--dtype", choices=dtypes.NAMES, default=None,
                   help="cast floating-point weights (default: keep the checkpoint's dtype)")
    p.add_argument("--scan", action="store_true",
                   help="stack decoder layers for nn.scan (LlamaConfig.scan_layers=True)")
    p.add_argument("--vision-tower", default=None, metavar="PATH_OR_ID",
                   help="the CLIP tower when the folder has none (default: config.json's "
                        "mm_vision_tower, a folder or a Hugging Face id in the local cache)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of a non-empty --dst")
    p.set_defaults(func=_main)

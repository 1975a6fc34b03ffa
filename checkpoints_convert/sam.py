"""``python -m checkpoints_convert sam``: a segment_anything checkpoint ⇄ a converted directory.

    python -m checkpoints_convert sam --src sam_vit_h_4b8939.pth --dst DIR
    python -m checkpoints_convert sam --export --src DIR --dst sam.safetensors

The key table is m2sa_jax/checkpoints/sam.py.
"""

from __future__ import annotations

import numpy as np

from m2sa_jax import dtypes
from m2sa_jax.checkpoints import converted
from m2sa_jax.checkpoints import sam as sam_ckpt


def _to_jax(args) -> int:
    params, config, meta = sam_ckpt.convert_file(args.src, prefix=args.prefix,
                                                 model_type=args.model_type,
                                                 dtype=dtypes.storage_dtype(args.dtype))
    with converted.atomic_directory(args.dst, overwrite=args.overwrite) as tmp:
        converted.save_params(tmp, params, meta)
    print(f"SAM {config.model_type} (compress_vit: {config.use_compress_vit}) → {args.dst}")
    return 0


def _to_torch(args) -> int:
    import torch

    meta = converted.load_meta(args.src)
    if meta.get("model") != "sam":
        raise SystemExit(f"{args.src}: holds a {meta.get('model')!r} model, not SAM")
    params = converted.load_params(args.src)
    out = {}
    for key, arr in sam_ckpt.export_sam(params, prefix=args.prefix):
        t = torch.from_numpy(np.asarray(arr, np.float32))
        out[key] = t.to(torch.bfloat16) if args.dtype == "bfloat16" else t
    if args.dst.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(out, args.dst)
    else:
        torch.save(out, args.dst)
    print(f"{len(out)} tensors → {args.dst}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sam", help="Segment Anything (ViT-B/L/H, optional M²SA compress_vit)",
        description="Convert a segment_anything checkpoint to an m2sa-jax directory, or back "
                    "with --export.")
    p.add_argument("--src", required=True,
                   help=".pth/.safetensors/HF folder (or, with --export, a converted directory)")
    p.add_argument("--dst", required=True,
                   help="output directory (or, with --export, a .pth or .safetensors file)")
    p.add_argument("--model-type", default="auto", choices=["auto", "vit_b", "vit_l", "vit_h"],
                   help="auto: every size read from the tensor shapes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the written parameters")
    p.add_argument("--prefix", default="",
                   help="key prefix of the SAM weights, e.g. 'model.visual_model.'")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of a non-empty --dst")
    p.add_argument("--export", action="store_true", help="JAX directory → PyTorch file")
    p.set_defaults(func=lambda a: _to_torch(a) if a.export else _to_jax(a))

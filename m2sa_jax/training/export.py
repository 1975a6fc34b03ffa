"""A trained run → a LISA/M²SA PyTorch folder, so a JAX-trained model goes back to PyTorch.

Restores a step of ``workdir/checkpoints`` (the latest unless ``--step``) with the model
description the run wrote (``model.json``, ``tokenizer/``), merges the LoRA factors into the
LLM's kernels, and writes the released layout through the M²SA exporter
(:func:`m2sa_jax.checkpoints.m2sa.export_folder`: safetensors shards with an index,
config.json, tokenizer files with the added [SEG] / <im_start> / <im_end>):

    python -m m2sa_jax.training.export --workdir outputs/synthetic --dst outputs/synthetic_hf \\
        [--step N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from m2sa_jax import dtypes
from m2sa_jax.checkpoints import converted, runs
from m2sa_jax.checkpoints.m2sa import copy_tokenizer, export_folder


def hf_config(config, source: dict) -> dict:
    """config.json of the exported folder: LLaMA fields of the trained model (the vocabulary
    grown by the added tokens) plus the LISA fields; other fields kept from the initial
    checkpoint's config.json (``source``) where the run started from one."""
    text, vision = config.llava.text, config.llava.vision
    out = {**source, **text.to_hf()}
    out.update(architectures=["LISAForCausalLM"], mm_use_im_start_end=True,
               mm_vision_select_layer=config.llava.vision_feature_layer,
               mm_projector_type=config.llava.projector_type, out_dim=config.out_dim,
               mm_hidden_size=vision.hidden_size, vision_config=vision.to_hf())
    return out


def export_run(workdir: str, dst: str, *, step: int | None = None,
               dtype: str | None = None) -> str:
    """Writes the LISA/M²SA folder ``dst`` from the run in ``workdir`` (module doc)."""
    config, params, tokenizer, step = runs.restore_model(workdir, step)
    source = runs.read_description(workdir).get("source_config") or {}
    with tempfile.TemporaryDirectory(prefix="m2sa_export_") as tmp:
        meta = dict(config.to_meta(), dtype=dtype or "float32",
                    source_config=hf_config(config, source))
        converted.save_params(tmp, params, meta)
        copy_tokenizer(os.path.join(workdir, runs.TOKENIZER_DIR), tmp)
        # the ids the model was trained with, whatever the source folder listed
        with open(os.path.join(tmp, "added_tokens.json"), "w") as f:
            json.dump(dict(sorted(tokenizer.added_vocab.items(), key=lambda kv: kv[1])), f,
                      indent=2)
        export_folder(tmp, dst, dtype=dtype)
    print(f"exported {os.path.abspath(workdir)} step {step} (LoRA, if any, merged) → "
          f"{os.path.abspath(dst)}")
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2sa_jax.training.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the run's directory (train.py --workdir)")
    parser.add_argument("--dst", required=True,
                        help="output folder (LISA/M²SA Hugging Face layout)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", choices=dtypes.NAMES, default=None,
                        help="dtype of the written weights (default float32)")
    args = parser.parse_args(argv)
    try:
        export_run(args.workdir, args.dst, step=args.step, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

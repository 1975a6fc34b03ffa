"""LISA / M²SA Hugging Face folders ⇄ m2sa-jax parameters (SPEC §7).

A released folder holds config.json, the tokenizer (with the added ``[SEG]``, ``<im_start>``,
``<im_end>``) and weights (sharded ``pytorch_model-*.bin`` or ``*.safetensors`` with an index)
whose keys are those of LLaVA v1 plus ``model.visual_model.*`` (SAM) and
``model.text_hidden_fcs.0.{0,2}.*``; M²SA adds ``model.visual_model.mask_decoder.compress_vit``.
The table reuses the LLaMA, CLIP, projector and SAM tables with prefixes.

    python -m checkpoints_convert m2sa --src M2SA-7B/ --dst converted/m2sa_7b [--dtype bfloat16]
    python -m checkpoints_convert m2sa --export --src converted/m2sa_7b --dst M2SA-7B-back/
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from checkpoints_convert import io as ckpt_io
from checkpoints_convert.llava import (TOKENIZER_FILES, checkpoint_keys, clip_rules,
                                       lm_head_rules, llama_rules, projector_rules)
from checkpoints_convert.sam import infer_config, sam_rules
from checkpoints_convert.table import ConversionError, Rule, convert, export

# A folder is LISA/M²SA when keys start with each of these.
REQUIRED_PREFIXES = {
    "model.layers.": "the LLaMA decoder layers",
    "model.embed_tokens.": "the token embedding",
    "model.vision_tower.vision_tower.vision_model.": "the CLIP vision tower",
    "model.mm_projector.": "the mm_projector",
    "model.visual_model.image_encoder.": "the SAM image encoder",
    "model.visual_model.prompt_encoder.": "the SAM prompt encoder",
    "model.visual_model.mask_decoder.": "the SAM mask decoder",
    "model.text_hidden_fcs.0.": "text_hidden_fcs (the [SEG] projector)",
}
SAM_PREFIX = "model.visual_model."


def prefixed(rules, target_prefix: str) -> list[Rule]:
    return [r if r.target is None else Rule(r.source, target_prefix + r.target, r.transform,
                                            r.stack) for r in rules]


def m2sa_rules(config, scan: bool = False) -> list[Rule]:
    """The whole table for a LISA/M²SA folder; ``config`` is an M2SAConfig."""
    lm = "llava/language_model/"
    tied = config.llava.text.tie_word_embeddings
    fcs = "model.text_hidden_fcs.0."
    return (llama_rules("model.", scan, target=lm) + lm_head_rules("lm_head.weight", tied, lm)
            + clip_rules("model.vision_tower.vision_tower.vision_model.",
                         target="llava/vision_tower/")
            + projector_rules("model.mm_projector.", config.llava.projector_type,
                              target="llava/mm_projector/")
            + prefixed(sam_rules(SAM_PREFIX), "sam/")
            + [Rule(f"{fcs}0.weight", "text_hidden_fcs/dense_0/kernel", "linear"),
               Rule(f"{fcs}0.bias", "text_hidden_fcs/dense_0/bias"),
               Rule(f"{fcs}2.weight", "text_hidden_fcs/dense_2/kernel", "linear"),
               Rule(f"{fcs}2.bias", "text_hidden_fcs/dense_2/bias")])


def check_layout(keys, folder: str) -> str:
    """'m2sa' or 'lisa'; otherwise an error naming what is missing."""
    keys = list(keys)
    missing = [f"{p}* ({what})" for p, what in REQUIRED_PREFIXES.items()
               if not any(k.startswith(p) for k in keys)]
    if missing:
        raise ConversionError(
            f"{folder}: not a LISA/M²SA checkpoint folder; no weights for:\n  "
            + "\n  ".join(missing)
            + "\nA LLaVA/LLaMA folder converts with `python -m checkpoints_convert llava`, a SAM "
              "checkpoint with `python -m checkpoints_convert sam`.")
    fused = any(k.startswith(f"{SAM_PREFIX}mask_decoder.compress_vit.") for k in keys)
    return "m2sa" if fused else "lisa"


def _shape_stand_ins(folder: str, prefix: str) -> dict:
    """{key: zero-memory array of the tensor's shape} for keys under ``prefix``, read from the
    safetensors headers or memory-mapped pickles (weights_only) without loading tensors."""
    out = {}
    for f in ckpt_io.checkpoint_files(folder):
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as h:
                shapes = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()
                          if k.startswith(prefix)}
        else:
            state = ckpt_io._load_pickle(f)
            shapes = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        for k, shape in shapes.items():
            out[k] = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape,
                                                     (0,) * len(shape))
    return out


def read_folder_config(folder: str):
    """(M2SAConfig, the folder's config.json dict) — the tokenizer gives the [SEG] id."""
    from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
    from m2sa_jax.models import llava
    from m2sa_jax.models.m2sa import M2SAConfig

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{folder}: config.json is missing (the LLaMA/LLaVA "
                                f"architecture); copy it from the release next to the weights")
    with open(p) as f:
        hf = json.load(f)
    keys = checkpoint_keys(folder)
    variant = check_layout(keys, folder)
    sam_config = infer_config(_shape_stand_ins(folder, SAM_PREFIX), prefix=SAM_PREFIX)
    tok_file = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"{folder}: tokenizer.model is missing; LISA/M²SA folders ship "
                                f"the SentencePiece model with the added [SEG] token")
    tokenizer = LegacyLlamaTokenizer.from_pretrained(folder, add_model_tokens=False)
    if "[SEG]" not in tokenizer.added_vocab:
        raise ConversionError(f"{folder}: the tokenizer has no added [SEG] token "
                              f"(added_tokens.json / tokenizer_config.json); this is not a "
                              f"LISA/M²SA tokenizer")
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    return M2SAConfig(llava=llava.llava_config_from_hf(hf), sam=sam_config, seg_token_id=int(seg),
                      variant=variant), hf


def with_scan(config, scan: bool):
    text = dataclasses.replace(config.llava.text, scan_layers=scan)
    return dataclasses.replace(config, llava=dataclasses.replace(config.llava, text=text))


def convert_folder(src: str, *, scan: bool = False, dtype=None):
    from m2sa_jax.models.m2sa import abstract_params

    config, hf = read_folder_config(src)
    config = with_scan(config, scan)
    params = convert(ckpt_io.iter_checkpoint(src), m2sa_rules(config, scan),
                     abstract_params(config), dtype=dtype, name=src)
    return params, config, hf


def config_to_meta(config, hf: dict, dtype: str | None) -> dict:
    return dict(model="m2sa", variant=config.variant, seg_token_id=config.seg_token_id,
                scan_layers=config.llava.text.scan_layers, dtype=dtype or "float32",
                text_config=config.llava.text.to_hf(), vision_config=config.llava.vision.to_hf(),
                projector_type=config.llava.projector_type,
                image_token_index=config.llava.image_token_index,
                vision_feature_layer=config.llava.vision_feature_layer,
                sam_config=config.sam.to_dict(), source_config=hf)


def meta_to_config(meta: dict, **text_overrides):
    from m2sa_jax.models import clip, llama, llava
    from m2sa_jax.models.m2sa import M2SAConfig
    from m2sa_jax.models.sam import SamConfig

    text = llama.LlamaConfig.from_hf(meta["text_config"], scan_layers=meta["scan_layers"],
                                     **text_overrides)
    vision = clip.CLIPVisionConfig.from_hf(meta["vision_config"])
    lv = llava.LlavaConfig(text=text, vision=vision, projector_type=meta["projector_type"],
                           image_token_index=meta["image_token_index"],
                           vision_feature_layer=meta["vision_feature_layer"])
    return M2SAConfig(llava=lv, sam=SamConfig.from_dict(meta["sam_config"]),
                      seg_token_id=meta["seg_token_id"], variant=meta["variant"])


def _np_dtype(name):
    import ml_dtypes

    return {None: None, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
            "float16": np.float16}[name]


def run(src: str, dst: str, *, scan: bool = False, dtype: str | None = None) -> str:
    from m2sa_jax.params_io import save_params

    params, config, hf = convert_folder(src, scan=scan, dtype=_np_dtype(dtype))
    save_params(dst, params, config_to_meta(config, hf, dtype))
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, name))
    return dst


def export_folder(src: str, dst: str, *, dtype: str | None = None,
                  max_shard_bytes: int = 5 * 2**30) -> str:
    """Converted directory → a Hugging Face folder in the LISA/M²SA layout (safetensors shards
    with an index, config.json, tokenizer files)."""
    from safetensors.numpy import save_file

    from m2sa_jax.params_io import load_meta, load_params

    meta = load_meta(src)
    if meta.get("model") != "m2sa":
        raise ValueError(f"{src}: holds a {meta.get('model')!r} model, not LISA/M²SA")
    config = meta_to_config(meta)
    params = load_params(src)
    os.makedirs(dst, exist_ok=True)
    shards, current, size = [], {}, 0
    for key, arr in export(params, m2sa_rules(config, meta["scan_layers"]),
                           dtype=_np_dtype(dtype)):
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = arr
        size += arr.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(dst, name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.nbytes
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(meta["source_config"], f, indent=2)
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, name))
    return dst


def _main(args) -> int:
    if args.export:
        out = export_folder(args.src, args.dst, dtype=args.dtype)
    else:
        out = run(args.src, args.dst, scan=args.scan, dtype=args.dtype)
    print(f"{'exported' if args.export else 'converted'} {args.src} → {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "m2sa", help="LISA or M²SA Hugging Face folder (LLaVA + SAM + [SEG] projector)",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="checkpoint folder (or converted dir with --export)")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="output dtype of floating-point weights (default: keep float32)")
    p.add_argument("--scan", action="store_true", help="stack LLaMA layers for nn.scan")
    p.add_argument("--export", action="store_true",
                   help="the other way: converted directory → LISA/M²SA PyTorch folder")
    p.set_defaults(func=_main)

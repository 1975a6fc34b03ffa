"""Segment Anything checkpoints: the key table between PyTorch state dicts and our parameters.

Source keys are those of segment_anything's ``Sam`` (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``), plus M²SA's ``mask_decoder.compress_vit.{0,1,3}.*``
(0 conv, 1 LayerNorm2d, 2 GELU, 3 conv). A prefix (``model.visual_model.`` in LISA / M²SA
folders) may precede every key.

The command line is ``python -m checkpoints_convert sam`` (checkpoints_convert/sam.py).
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from m2sa_jax.checkpoints.table import ConversionError, Rule, convert, export, skip
from m2sa_jax.checkpoints.torch_io import iter_checkpoint
from m2sa_jax.models.sam import SAM_CONFIGS, SamConfig, abstract_params, sam_config

def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "linear"), Rule(f"{src}.bias", f"{dst}/bias")]


def _conv(src: str, dst: str, bias: bool = True, transform: str = "conv2d") -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", transform)]
    return rules + ([Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/weight"), Rule(f"{src}.bias", f"{dst}/bias")]


def _attention(src: str, dst: str) -> list[Rule]:
    return [r for n in ("q_proj", "k_proj", "v_proj", "out_proj")
            for r in _linear(f"{src}.{n}", f"{dst}/{n}")]


def sam_rules(prefix: str = "") -> list[Rule]:
    """The mapping table for SAM keys, each preceded by ``prefix`` (e.g. ``model.visual_model.``)."""
    ie, pe, md = f"{prefix}image_encoder", f"{prefix}prompt_encoder", f"{prefix}mask_decoder"
    t = f"{md}.transformer"
    rules = [
        *_conv(f"{ie}.patch_embed.proj", "image_encoder/patch_embed"),
        Rule(f"{ie}.pos_embed", "image_encoder/pos_embed"),
        *_norm(f"{ie}.blocks.{{i}}.norm1", "image_encoder/blocks_{i}/norm1"),
        *_norm(f"{ie}.blocks.{{i}}.norm2", "image_encoder/blocks_{i}/norm2"),
        *_linear(f"{ie}.blocks.{{i}}.attn.qkv", "image_encoder/blocks_{i}/attn/qkv"),
        *_linear(f"{ie}.blocks.{{i}}.attn.proj", "image_encoder/blocks_{i}/attn/proj"),
        Rule(f"{ie}.blocks.{{i}}.attn.rel_pos_h", "image_encoder/blocks_{i}/attn/rel_pos_h"),
        Rule(f"{ie}.blocks.{{i}}.attn.rel_pos_w", "image_encoder/blocks_{i}/attn/rel_pos_w"),
        *_linear(f"{ie}.blocks.{{i}}.mlp.lin1", "image_encoder/blocks_{i}/lin1"),
        *_linear(f"{ie}.blocks.{{i}}.mlp.lin2", "image_encoder/blocks_{i}/lin2"),
        *_conv(f"{ie}.neck.0", "image_encoder/neck_conv1", bias=False),
        *_norm(f"{ie}.neck.1", "image_encoder/neck_ln1"),
        *_conv(f"{ie}.neck.2", "image_encoder/neck_conv2", bias=False),
        *_norm(f"{ie}.neck.3", "image_encoder/neck_ln2"),
        Rule(f"{pe}.pe_layer.positional_encoding_gaussian_matrix",
             "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"),
        Rule(f"{pe}.point_embeddings.{{i}}.weight", "prompt_encoder/point_embeddings_{i}"),
        Rule(f"{pe}.not_a_point_embed.weight", "prompt_encoder/not_a_point_embed"),
        Rule(f"{pe}.no_mask_embed.weight", "prompt_encoder/no_mask_embed"),
        *_conv(f"{pe}.mask_downscaling.0", "prompt_encoder/mask_conv0"),
        *_norm(f"{pe}.mask_downscaling.1", "prompt_encoder/mask_ln0"),
        *_conv(f"{pe}.mask_downscaling.3", "prompt_encoder/mask_conv1"),
        *_norm(f"{pe}.mask_downscaling.4", "prompt_encoder/mask_ln1"),
        *_conv(f"{pe}.mask_downscaling.6", "prompt_encoder/mask_conv2"),
        Rule(f"{md}.iou_token.weight", "mask_decoder/iou_token"),
        Rule(f"{md}.mask_tokens.weight", "mask_decoder/mask_tokens"),
        *_attention(f"{t}.layers.{{i}}.self_attn", "mask_decoder/transformer/layers_{i}/self_attn"),
        *_attention(f"{t}.layers.{{i}}.cross_attn_token_to_image",
                    "mask_decoder/transformer/layers_{i}/cross_attn_token_to_image"),
        *_attention(f"{t}.layers.{{i}}.cross_attn_image_to_token",
                    "mask_decoder/transformer/layers_{i}/cross_attn_image_to_token"),
        *_linear(f"{t}.layers.{{i}}.mlp.lin1", "mask_decoder/transformer/layers_{i}/mlp_lin1"),
        *_linear(f"{t}.layers.{{i}}.mlp.lin2", "mask_decoder/transformer/layers_{i}/mlp_lin2"),
        *[r for n in (1, 2, 3, 4)
          for r in _norm(f"{t}.layers.{{i}}.norm{n}", f"mask_decoder/transformer/layers_{{i}}/norm{n}")],
        *_attention(f"{t}.final_attn_token_to_image",
                    "mask_decoder/transformer/final_attn_token_to_image"),
        *_norm(f"{t}.norm_final_attn", "mask_decoder/transformer/norm_final_attn"),
        *_conv(f"{md}.output_upscaling.0", "mask_decoder/upscale_conv0",
               transform="conv_transpose2d"),
        *_norm(f"{md}.output_upscaling.1", "mask_decoder/upscale_ln"),
        *_conv(f"{md}.output_upscaling.3", "mask_decoder/upscale_conv1",
               transform="conv_transpose2d"),
        *_linear(f"{md}.output_hypernetworks_mlps.{{i}}.layers.{{j}}",
                 "mask_decoder/output_hypernetworks_mlps_{i}/layers_{j}"),
        *_linear(f"{md}.iou_prediction_head.layers.{{j}}", "mask_decoder/iou_prediction_head/layers_{j}"),
        *_conv(f"{md}.compress_vit.0", "mask_decoder/compress_vit_conv0"),
        *_norm(f"{md}.compress_vit.1", "mask_decoder/compress_vit_ln"),
        *_conv(f"{md}.compress_vit.3", "mask_decoder/compress_vit_conv1"),
        # Normalisation constants (non-persistent in segment_anything; present in some dumps):
        # preprocessing owns them (m2sa_jax/data/preprocess.py).
        skip(f"{prefix}pixel_mean"),
        skip(f"{prefix}pixel_std"),
    ]
    return rules


def infer_config(state: dict, prefix: str = "", model_type: str = "auto"):
    """SamConfig for a state dict.

    ``auto`` reads every size from the tensors (encoder width, depth, heads from the rel-pos
    head dim, global blocks from the rel-pos table length, image size from pos_embed), so
    narrowed test models convert too; the result is named vit_b/l/h when it is one of them.
    ``use_compress_vit`` follows the presence of ``mask_decoder.compress_vit.*`` keys.
    """
    fuse = any(k.startswith(f"{prefix}mask_decoder.compress_vit.") for k in state)
    if model_type != "auto":
        return sam_config(model_type, use_compress_vit=fuse)
    ie = f"{prefix}image_encoder"
    need = [f"{ie}.patch_embed.proj.weight", f"{ie}.pos_embed", f"{ie}.blocks.0.attn.rel_pos_h"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"cannot infer the SAM config: {missing} missing (is the prefix "
                              f"{prefix!r} right?); pass --model-type vit_b|vit_l|vit_h")
    width, _, patch, _ = np.shape(state[need[0]])
    grid = np.shape(state[need[1]])[1]
    depth = 1 + max(int(k[len(ie) + 8:].split(".")[0]) for k in state
                    if k.startswith(f"{ie}.blocks."))
    head_dim = np.shape(state[need[2]])[1]
    global_idx = tuple(i for i in range(depth)
                       if np.shape(state[f"{ie}.blocks.{i}.attn.rel_pos_h"])[0] == 2 * grid - 1)
    window = (np.shape(state[f"{ie}.blocks.{min(set(range(depth)) - set(global_idx), default=0)}"
                             f".attn.rel_pos_h"])[0] + 1) // 2
    cfg = SamConfig(model_type="custom", encoder_embed_dim=int(width), encoder_depth=depth,
                    encoder_num_heads=int(width // head_dim), global_attn_indexes=global_idx,
                    window_size=int(window), img_size=int(grid * patch), patch_size=int(patch),
                    use_compress_vit=fuse)
    for name, known in SAM_CONFIGS.items():
        if known.replace(use_compress_vit=fuse) == cfg.replace(model_type=name):
            return cfg.replace(model_type=name)
    return cfg


def convert_sam(state_iter: Iterable[tuple[str, np.ndarray]], config, *, prefix: str = "",
                dtype=None, name: str = "SAM checkpoint") -> dict:
    """Streams ``(torch_key, array)`` pairs into SAM parameters for ``config``.

    Other models' keys (anything not starting with ``prefix``) are passed over, so a whole
    LISA / M²SA folder can be streamed through with ``prefix="model.visual_model."``.
    """
    own = ((k, v) for k, v in state_iter if k.startswith(prefix))
    return convert(own, sam_rules(prefix), abstract_params(config), dtype=dtype, name=name)


def export_sam(params, *, prefix: str = "", dtype=None):
    """Parameters → ``(torch_key, array)`` pairs in segment_anything's layout."""
    return export(params, sam_rules(prefix), dtype=dtype)


def convert_file(src: str, *, prefix: str = "", model_type: str = "auto", dtype=None):
    """(params, SamConfig, meta) of a SAM checkpoint file or folder (only keys under ``prefix``
    are kept: a LISA / M²SA folder streams the whole LLM past)."""
    state = {k: v for k, v in iter_checkpoint(src) if k.startswith(prefix)}
    config = infer_config(state, prefix, model_type)
    params = convert_sam(state.items(), config, prefix=prefix, dtype=dtype, name=src)
    meta = {"model": "sam", "model_type": config.model_type,
            "use_compress_vit": config.use_compress_vit,
            "dtype": np.dtype(dtype).name if dtype is not None else "as stored",
            "config": config.to_dict(), "source": os.path.abspath(src)}
    return params, config, meta


def meta_to_config(meta: dict) -> SamConfig:
    """The SamConfig of a converted SAM directory's metadata."""
    return SamConfig.from_dict(meta.get("config") or sam_config(meta["model_type"]).to_dict())

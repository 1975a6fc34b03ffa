"""Shared pieces of the SAM tests: reference PyTorch models with every weight random.

segment_anything initialises rel_pos, pos_embed and LayerNorm to constants; parity tests
need every parameter non-trivial, so all are refilled from a seeded normal distribution.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from m2sa_jax.checkpoints.sam import convert_sam
from m2sa_jax.checkpoints.torch_io import to_numpy
from m2sa_jax.models.sam import SamConfig


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05,
               decoder_std: float | None = None) -> torch.nn.Module:
    """Refills every parameter and the PE gaussian buffer; LayerNorm scales around 1.

    ``decoder_std`` (default ``std``) applies to the prompt encoder and mask decoder, so their
    logits can be made O(1) independently of the encoder's scale.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + [
                (n, b) for n, b in module.named_buffers() if "gaussian" in n]:
            s = std if name.startswith("image_encoder") or decoder_std is None else decoder_std
            noise = torch.randn(p.shape, generator=g) * s
            is_norm_scale = p.ndim == 1 and name.endswith("weight") and (
                "norm" in name or "neck.1" in name or "neck.3" in name
                or "upscaling.1" in name or "downscaling.1" in name
                or "downscaling.4" in name or "compress_vit.1" in name)
            p.copy_(noise + 1.0 if is_norm_scale else noise)
    return module


def torch_sam(cfg: SamConfig, seed: int = 0, std: float = 0.05, decoder_std: float | None = None):
    """segment_anything's Sam for ``cfg`` with random weights (eval mode, float32)."""

    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    g = cfg.image_embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_embed_dim,
            depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads, mlp_ratio=cfg.mlp_ratio,
            out_chans=cfg.prompt_embed_dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(g, g),
            input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth,
                                          embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim,
                                          num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    if cfg.use_compress_vit:
        sam.mask_decoder.compress_vit = compress_vit_module(cfg.encoder_embed_dim,
                                                            cfg.prompt_embed_dim)
    return randomize_(sam, seed, std, decoder_std).eval()


def compress_vit_module(in_dim: int, out_dim: int = 256) -> torch.nn.Sequential:
    """M²SA's early-fusion head (SPEC §1): Conv3×3, LayerNorm2d, GELU, Conv3×3."""
    from segment_anything.modeling.common import LayerNorm2d

    return torch.nn.Sequential(
        torch.nn.Conv2d(in_dim, out_dim, 3, padding=1), LayerNorm2d(out_dim), torch.nn.GELU(),
        torch.nn.Conv2d(out_dim, out_dim, 3, padding=1))


def state_items(module: torch.nn.Module):
    return [(k, to_numpy(v)) for k, v in module.state_dict().items()]


def convert_module(module: torch.nn.Module, cfg: SamConfig):
    return convert_sam(state_items(module), cfg)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

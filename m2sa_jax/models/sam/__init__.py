"""Segment Anything (ViT-B/L/H) in Flax linen, numerically faithful to the PyTorch original.

One network per file, as in segment_anything's ``modeling/``:

* :mod:`.config` — :class:`SamConfig` and the registry of ViT-B/L/H (:func:`sam_config`).
* :mod:`.image_encoder` — :class:`ImageEncoderViT`: ViT with windowed and global attention,
  decomposed relative position embeddings and a conv neck. Returns the image embedding and the
  output of every global-attention block (M²SA's ``early_features`` = the first of them, block 7
  in ViT-H).
* :mod:`.prompt_encoder` — :class:`PromptEncoder`: points, boxes, a low-res mask, and extra
  sparse embeddings (``text_embeds``: one 256-vector per [SEG] in M²SA) appended after points
  and boxes.
* :mod:`.transformer` — the two-way transformer of the mask decoder.
* :mod:`.mask_decoder` — :class:`MaskDecoder`; optionally fuses ``early_features`` through
  ``compress_vit`` (M²SA's early local feature fusion).
* :mod:`.postprocess` — torch-exact bilinear interpolation and :func:`postprocess_masks`.
* :mod:`.sam` — :class:`Sam`, the three under one parameter tree; :func:`abstract_params`,
  :func:`init_params`.
* :mod:`.common` — LayerNorm, MLP, exact GELU, dense/conv constructors.

Layout: everything spatial is channels-last (NHWC). The image embedding is
``[B, 64, 64, 256]`` where PyTorch has ``[B, 256, 64, 64]``; mask logits are ``[B, C, H, W]``
as in PyTorch (C = masks per prompt). Parameters are float32; ``dtype`` selects the compute
dtype (LayerNorm statistics and softmax stay float32).

Numerical choices that differ from Flax defaults are made explicitly: exact (erf) GELU,
LayerNorm eps 1e-6 in the image encoder and every LayerNorm2d, 1e-5 in the two-way
transformer (PyTorch's default).
"""

from m2sa_jax.models.sam.config import SAM_CONFIGS, SamConfig, narrow_config, sam_config
from m2sa_jax.models.sam.image_encoder import ImageEncoderViT, get_rel_pos
from m2sa_jax.models.sam.mask_decoder import MaskDecoder, Upscale2x
from m2sa_jax.models.sam.postprocess import (interpolate_bilinear, postprocess_masks,
                                             postprocess_masks_host, postprocess_masks_padded)
from m2sa_jax.models.sam.prompt_encoder import PromptEncoder
from m2sa_jax.models.sam.sam import Sam, abstract_params, init_params
from m2sa_jax.models.sam.transformer import TwoWayTransformer

__all__ = (
    "SamConfig", "SAM_CONFIGS", "sam_config", "narrow_config", "Sam", "ImageEncoderViT",
    "PromptEncoder", "MaskDecoder", "TwoWayTransformer", "Upscale2x", "postprocess_masks",
    "postprocess_masks_host", "postprocess_masks_padded", "get_rel_pos", "abstract_params",
    "init_params",
    "interpolate_bilinear",
)

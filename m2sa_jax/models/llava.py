"""LLaVA: CLIP image rows projected into the LLaMA embedding sequence at the ``<image>`` token.

The image becomes ``hidden_states[-2][:, 1:]`` of the CLIP tower (256 rows at 224/14), passed
through ``mm_projector`` — a single Linear in LLaVA v1 / LISA / M²SA (``"linear"``), or
LLaVA-1.5's Linear → GELU → Linear (``"mlp2x_gelu"``, also llava-hf's layout) — and replaces the
single image placeholder token of each row.

Placeholder convention: LLaVA v1 and LISA put ``IMAGE_TOKEN_INDEX = -200`` into ``input_ids``
(never a real vocabulary id); llava-hf uses a real added-token id (``image_token_index`` in its
config). Both are just ``LlavaConfig.image_token_index`` here; each row must contain it exactly
once. Batches are right-padded; the expanded sequence has the static length
``T - 1 + num_image_rows`` and its padding stays at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax.models import clip, llama
from m2sa_jax.models.activations import gelu_exact

IMAGE_TOKEN_INDEX = -200  # LLaVA v1 / LISA placeholder id in input_ids
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    text: llama.LlamaConfig
    vision: clip.CLIPVisionConfig
    projector_type: str = "linear"
    image_token_index: int = IMAGE_TOKEN_INDEX
    vision_feature_layer: int = -2

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"mm_projector_type {self.projector_type!r}: expected one of "
                             f"{PROJECTOR_TYPES}")

    @property
    def num_image_rows(self) -> int:
        return self.vision.num_patches


class Projector(nn.Module):
    """CLIP features [B, N, d_clip] → LLM embeddings [B, N, d]."""

    config: LlavaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda name: nn.Dense(cfg.text.hidden_size, dtype=cfg.text.dtype,
                                      param_dtype=cfg.text.param_dtype, name=name)
        x = dense("linear_1")(x.astype(cfg.text.dtype))
        if cfg.projector_type == "mlp2x_gelu":
            x = dense("linear_2")(gelu_exact(x))
        return x  # [B, N, d]


def check_image_tokens(input_ids, image_token_index: int) -> None:
    """Host-side check that every row holds exactly one image placeholder."""
    counts = np.sum(np.asarray(input_ids) == image_token_index, axis=1)
    bad = np.nonzero(counts != 1)[0]
    if bad.size:
        raise ValueError(
            f"input_ids rows {bad.tolist()} hold {counts[bad].tolist()} image tokens "
            f"(id {image_token_index}); each row needs exactly one. Fix: put exactly one "
            f"<image> in every prompt (and check image_token_index in the config).")


def splice_image_rows(text_embeds, input_ids, attention_mask, image_rows, image_token_index):
    """Replaces each row's single placeholder by its image rows (static shapes, jit-safe).

    Args:
      text_embeds: [B, T, d] token embeddings (the placeholder's row is ignored).
      input_ids: [B, T]; attention_mask: [B, T] (right padding).
      image_rows: [B, N, d] projected image features.

    Returns dict: ``inputs_embeds`` [B, T-1+N, d], ``attention_mask`` [B, T-1+N] bool,
    ``positions`` [B, T-1+N], ``text_to_expanded`` [B, T] (where each text token sits in the
    expanded sequence; the placeholder maps to its first image row), ``image_start`` [B].
    """
    b, t = input_ids.shape
    n = image_rows.shape[1]
    e = t - 1 + n
    start = jnp.argmax(input_ids == image_token_index, axis=1).astype(jnp.int32)  # [B]
    j = jnp.arange(e)[None, :]  # [1, E]
    rel = j - start[:, None]  # [B, E] index into the image rows
    in_image = (rel >= 0) & (rel < n)
    text_src = jnp.clip(jnp.where(j < start[:, None], j, j - (n - 1)), 0, t - 1)  # [B, E]
    from_text = jnp.take_along_axis(text_embeds, text_src[..., None], axis=1)
    from_image = jnp.take_along_axis(image_rows.astype(text_embeds.dtype),
                                     jnp.clip(rel, 0, n - 1)[..., None], axis=1)
    embeds = jnp.where(in_image[..., None], from_image, from_text)  # [B, E, d]
    mask = in_image | jnp.take_along_axis(attention_mask.astype(bool), text_src, axis=1)
    ti = jnp.arange(t)[None, :]
    text_to_expanded = jnp.where(ti <= start[:, None], ti, ti + n - 1).astype(jnp.int32)
    return dict(inputs_embeds=embeds, attention_mask=mask,
                positions=llama.positions_from_mask(mask), text_to_expanded=text_to_expanded,
                image_start=start)


class Llava(nn.Module):
    """CLIP tower + projector + LLaMA. Parameters: ``vision_tower``, ``mm_projector``,
    ``language_model``."""

    config: LlavaConfig

    def setup(self):
        self.vision_tower = clip.CLIPVisionModel(self.config.vision)
        self.mm_projector = Projector(self.config)
        self.language_model = llama.LlamaForCausalLM(self.config.text)

    def encode_images(self, pixel_values):
        """pixel_values [B, 224, 224, 3] → dict(clip_features [B, N, d_clip], image_rows [B, N, d])."""
        feats = self.vision_tower(pixel_values, feature_layer=self.config.vision_feature_layer)
        clip_features = feats["features"][:, 1:]  # [B, N, d_clip] without the class token
        return dict(clip_features=clip_features, image_rows=self.mm_projector(clip_features))

    def embed_multimodal(self, input_ids, attention_mask, image_rows):
        """The expanded embedding sequence (see :func:`splice_image_rows`)."""
        ids = jnp.where(input_ids == self.config.image_token_index, 0, input_ids)
        text_embeds = self.language_model.embed(ids)  # [B, T, d]
        return splice_image_rows(text_embeds, input_ids, attention_mask, image_rows,
                                 self.config.image_token_index)

    def __call__(self, input_ids, pixel_values, attention_mask=None, return_all_hidden=False):
        """Teacher-forced multimodal forward. Returns the LLM outputs (logits,
        last_hidden_state over the expanded sequence) plus the splice intermediates."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if not isinstance(input_ids, jax.core.Tracer):
            check_image_tokens(input_ids, self.config.image_token_index)
        images = self.encode_images(pixel_values)
        mm = self.embed_multimodal(input_ids, attention_mask, images["image_rows"])
        out = self.language_model(inputs_embeds=mm["inputs_embeds"],
                                  attention_mask=mm["attention_mask"], positions=mm["positions"],
                                  return_all_hidden=return_all_hidden)
        out.update(mm)
        out.update(images)
        return out


def llava_config_from_hf(cfg: Mapping[str, Any], *, vision: clip.CLIPVisionConfig | None = None,
                         **text_overrides) -> LlavaConfig:
    """LlavaConfig from a ``config.json``: LLaVA v1 / LISA (LLaMA fields at the top level plus
    ``mm_*`` fields) or llava-hf (``text_config`` / ``vision_config``).

    The CLIP tower's architecture is ``vision`` when given (read from the tower's own
    config.json), else ``config.json``'s ``vision_config``; LLaVA v1 / LISA config files name
    the tower (``mm_vision_tower``) without describing it, so one of the two is needed.
    """
    cfg = dict(cfg)
    if "text_config" in cfg:  # llava-hf LlavaForConditionalGeneration
        strategy = cfg.get("vision_feature_select_strategy", "default")
        layer = cfg.get("vision_feature_layer", -2)
        if strategy != "default" or not isinstance(layer, int) \
                or not cfg.get("multimodal_projector_bias", True) \
                or cfg.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"config.json: only llava-hf models with one vision_feature_layer, "
                f"vision_feature_select_strategy 'default', a GELU projector with biases are "
                f"supported (got layer {layer!r}, strategy {strategy!r}, "
                f"projector_hidden_act {cfg.get('projector_hidden_act')!r}, "
                f"multimodal_projector_bias {cfg.get('multimodal_projector_bias', True)!r})")
        text = llama.LlamaConfig.from_hf(cfg["text_config"], **text_overrides)
        vision = vision or clip.CLIPVisionConfig.from_hf(cfg["vision_config"])
        return LlavaConfig(text=text, vision=vision, projector_type="mlp2x_gelu",
                           image_token_index=cfg.get("image_token_index", cfg.get("image_token_id")),
                           vision_feature_layer=layer)
    text = llama.LlamaConfig.from_hf(cfg, **text_overrides)
    if vision is None:
        if "vision_config" not in cfg:
            raise ValueError(
                f"config.json names the CLIP tower (mm_vision_tower "
                f"{cfg.get('mm_vision_tower')!r}) but does not describe it; its architecture "
                f"comes from the tower's own config.json")
        vision = clip.CLIPVisionConfig.from_hf(cfg["vision_config"])
    return LlavaConfig(text=text, vision=vision,
                       projector_type=cfg.get("mm_projector_type", "linear"),
                       image_token_index=cfg.get("image_token_index", IMAGE_TOKEN_INDEX),
                       vision_feature_layer=cfg.get("mm_vision_select_layer", -2))


def param_shapes(config: LlavaConfig) -> dict:
    model = Llava(config)
    v = config.vision
    ids = jnp.full((1, 2), config.image_token_index, jnp.int32).at[0, 1].set(1)

    def init():
        px = jnp.zeros((1, v.image_size, v.image_size, v.num_channels))
        params = model.init(jax.random.key(0), ids, px)["params"]
        # the last CLIP layer and post_layernorm are unused by LLaVA but are in every checkpoint
        full = clip.CLIPVisionModel(v).init(jax.random.key(1), px)["params"]
        return {**params, "vision_tower": full}

    return jax.eval_shape(init)

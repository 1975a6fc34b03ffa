"""CLIP vision transformer (LLaVA's image tower, ViT-L/14 at 224) in Flax linen.

Matches Hugging Face's ``CLIPVisionModel``: patch convolution without bias, class token,
learned position embeddings, ``pre_layrnorm`` (sic, the checkpoint name) before the encoder,
pre-norm encoder layers with quick_gelu MLPs, ``post_layernorm`` on the pooled class token.
LayerNorm eps comes from the config (1e-5 for OpenAI CLIP), not Flax's 1e-6 default.

LLaVA reads ``hidden_states[-2][:, 1:]``: the input of the last encoder layer without the class
token (256 rows at 224/14). ``hidden_states[0]`` is the ``pre_layrnorm`` output, as in
Hugging Face.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2sa_jax.models.activations import gelu_exact


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Fields of Hugging Face's ``CLIPVisionConfig`` (defaults: ViT-L/14 at 224)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported "
                             f"(expected one of {sorted(_ACTIVATIONS)})")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> "CLIPVisionConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        fields = {k: v for k, v in dict(cfg).items() if k in names}
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("dtype", "param_dtype")}

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_exact,
}


class Attention(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, t, d = x.shape
        h = cfg.num_attention_heads
        dense = lambda name: nn.Dense(d, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        q = dense("q_proj")(x).reshape(b, t, h, d // h)  # [B, T, H, Dh]
        k = dense("k_proj")(x).reshape(b, t, h, d // h)
        v = dense("v_proj")(x).reshape(b, t, h, d // h)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // h) ** -0.5  # [B, H, T, T]
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return dense("out_proj")(out)


class EncoderLayer(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype, name=name)
        x = x + Attention(cfg, name="self_attn")(ln("layer_norm1")(x))
        y = ln("layer_norm2")(x)
        y = nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     name="fc1")(y)  # [B, T, F]
        y = _ACTIVATIONS[cfg.hidden_act](y)
        y = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc2")(y)
        return x + y


class CLIPVisionModel(nn.Module):
    """pixel_values [B, H, W, 3] (NHWC, CLIP-normalised) → dict of intermediates.

    ``feature_layer`` (e.g. -2) stops after the layer LLaVA needs and returns ``features``
    (that hidden state); without it, all layers run and ``last_hidden_state``,
    ``pooler_output`` and the full ``hidden_states`` tuple are returned.
    """

    config: CLIPVisionConfig

    def setup(self):
        cfg = self.config
        self.patch_embedding = nn.Conv(
            cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
            padding="VALID", use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(0.02),
                                          (cfg.hidden_size,), cfg.param_dtype)
        self.position_embedding = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=cfg.dtype,
                                           param_dtype=cfg.param_dtype)
        ln = lambda: nn.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.pre_layrnorm = ln()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.post_layernorm = ln()

    def __call__(self, pixel_values, feature_layer: int | None = None):
        cfg = self.config
        x = self.patch_embedding(pixel_values.astype(cfg.dtype))  # [B, H/14, W/14, d]
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.hidden_size)  # [B, N, d] row-major patches, as torch flatten
        cls = jnp.broadcast_to(self.class_embedding.astype(cfg.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)  # [B, N+1, d]
        x = x + self.position_embedding(jnp.arange(x.shape[1]))[None]
        x = self.pre_layrnorm(x)
        hidden = [x]
        n = cfg.num_hidden_layers
        stop = n if feature_layer is None else (feature_layer % (n + 1))
        for layer in self.layers[:stop]:
            x = layer(x)
            hidden.append(x)
        if feature_layer is not None:
            return dict(features=hidden[stop], hidden_states=tuple(hidden))
        return dict(last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0]),
                    hidden_states=tuple(hidden))


def param_shapes(config: CLIPVisionConfig) -> dict:
    model = CLIPVisionModel(config)
    px = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), px))["params"]


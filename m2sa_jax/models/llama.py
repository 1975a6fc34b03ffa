"""LLaMA / Vicuna decoder (the language model of LLaVA and M²SA) in Flax linen.

Matches Hugging Face's ``LlamaForCausalLM`` numerically: RMSNorm computed in float32, rotate-half
RoPE, SwiGLU MLP, grouped-query attention (``num_key_value_heads``), untied ``lm_head`` unless
``tie_word_embeddings``.

Layers are either unrolled (``layers_0 … layers_{N-1}``) or scanned (``nn.scan``, one ``layers``
module whose parameters carry a leading layer axis); both load the same checkpoint through the
conversion table. Projection kernels keep their checkpoint names (``q_proj`` … ``down_proj``) so
a LoRA transform can find them.

Key/value cache. ``init_cache`` allocates static ``[B, max_len, kv_heads, head_dim]`` buffers per
layer plus ``valid`` ([B, max_len], which slots hold real tokens) and ``index`` ([B], the next
slot to write, per row). Each call writes its T new keys at slots ``index .. index+T-1`` of its
row and attends to every valid slot up to its own. Because the write slot is per row, prompts
may be left- or right-padded: padding slots are simply never valid. Positions (RoPE) are passed
explicitly; :func:`positions_from_mask` gives the Hugging Face convention (count of real tokens
before each one) so a padded row sees the same positions as the unpadded one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (from a Hugging Face ``config.json``) plus how to run it."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02  # std of the random init (HF's field); converted weights ignore it
    # how to run it
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32  # activations / compute
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}: expected one of {REMAT_POLICIES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """From a Hugging Face LLaMA ``config.json`` dict (old ``rope_theta``/``rope_scaling``
        fields or the newer ``rope_parameters``)."""
        cfg = dict(cfg)
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling")
        if scaling:
            rope.setdefault("rope_type", scaling.get("rope_type", scaling.get("type")))
        rope_type = rope.get("rope_type", "default")
        if rope_type not in (None, "default"):
            raise ValueError(
                f"config.json: rope type {rope_type!r} is not supported (only the default, "
                f"unscaled rotate-half RoPE that LLaMA/Vicuna use). Fix: remove rope_scaling "
                f"or convert a checkpoint that does not use it.")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        fields = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """The architecture fields as a Hugging Face ``LlamaConfig`` dict."""
        return dict(
            model_type="llama", architectures=["LlamaForCausalLM"],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias, initializer_range=self.initializer_range, hidden_act="silu")


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions of a padded batch: number of real tokens before each one (pads get 0)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache: per layer k/v [B, max_len, kv_heads, head_dim], all slots invalid."""
    dtype = dtype or config.dtype
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    n = config.num_hidden_layers
    if config.scan_layers:
        k = jnp.zeros((n,) + shape, dtype)  # [L, B, S, KVH, D]
        v = jnp.zeros((n,) + shape, dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(n))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(n))
    return dict(k=k, v=v, valid=jnp.zeros((batch, max_len), bool),
                index=jnp.zeros((batch,), jnp.int32))


def _write_rows(buf, new, index):
    """buf [B, S, ...] ← new [B, T, ...] at per-row slot ``index`` [B]."""
    def one(b, n, i):
        return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), (i,) + (0,) * (b.ndim - 1))
    return jax.vmap(one)(buf, new, index)


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 then cast back (as Hugging Face does)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return weight.astype(self.dtype) * y


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos, sin [B, T, head_dim] for rotate-half RoPE at integer ``positions`` [B, T]."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                / head_dim))  # [D/2]
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; rotate-half convention (first half paired with second half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _dense(features, use_bias, cfg: LlamaConfig, name):
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, query_slots, key_valid, layer_cache):
        """x [B, T, d]; query_slots [B, T] cache slot of each query; key_valid [B, S].

        ``layer_cache`` is None (keys are this call's tokens, S = T) or dict(k, v, index) with
        [B, S, KVH, D] buffers; returns (output [B, T, d], updated k, v or None).
        """
        cfg = self.config
        b, t, _ = x.shape
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(h * d, cfg.attention_bias, cfg, "q_proj")(x).reshape(b, t, h, d)
        k = _dense(kvh * d, cfg.attention_bias, cfg, "k_proj")(x).reshape(b, t, kvh, d)
        v = _dense(kvh * d, cfg.attention_bias, cfg, "v_proj")(x).reshape(b, t, kvh, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_k = new_v = None
        if layer_cache is not None:
            k = new_k = _write_rows(layer_cache["k"], k, layer_cache["index"])  # [B, S, KVH, D]
            v = new_v = _write_rows(layer_cache["v"], v, layer_cache["index"])
        s = k.shape[1]
        key_slots = jnp.arange(s)
        allowed = (key_slots[None, None, :] <= query_slots[:, :, None]) & key_valid[:, None, :]
        q = q.reshape(b, t, kvh, h // kvh, d)  # [B, T, KVH, G, D]
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)) / np.sqrt(d).astype(q.dtype)
        scores = scores.astype(jnp.float32)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)  # [B, KVH, G, T, S]
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(cfg.dtype)).reshape(b, t, h * d)
        out = _dense(cfg.hidden_size, cfg.attention_bias, cfg, "o_proj")(out)
        return out, new_k, new_v


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "gate_proj")(x)  # [B, T, F]
        up = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "up_proj")(x)
        return _dense(cfg.hidden_size, cfg.mlp_bias, cfg, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, query_slots, key_valid, layer_cache):
        cfg = self.config
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        attn, new_k, new_v = Attention(cfg, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, query_slots, key_valid, layer_cache)
        x = x + attn
        x = x + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
        return x, new_k, new_v


def _remat(cls, policy: str):
    if policy == "none":
        return cls
    pol = {"nothing_saveable": jax.checkpoint_policies.nothing_saveable,
           "dots_saveable": jax.checkpoint_policies.dots_saveable}[policy]
    return nn.remat(cls, policy=pol, prevent_cse=True)


class _ScanBody(nn.Module):
    """One scanned step: carry = hidden state; xs = this layer's cache slice. Also emits the
    layer input (dead-code eliminated under jit when the caller drops it)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_kv, cos, sin, query_slots, key_valid, index):
        layer_cache = None if layer_kv is None else dict(k=layer_kv[0], v=layer_kv[1], index=index)
        layer = _remat(DecoderLayer, self.config.remat_policy)(self.config, name="layer")
        y, new_k, new_v = layer(x, cos, sin, query_slots, key_valid, layer_cache)
        kv = None if layer_kv is None else (new_k, new_v)
        return y, (kv, x)


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. Returns a dict of named intermediates (see ``__call__``)."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype,
                                     embedding_init=nn.initializers.normal(cfg.initializer_range))
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, False, cfg, "lm_head")
        if cfg.scan_layers:
            self.layers = nn.scan(
                # LoRA factors ("lora" collection, see models/lora.py) are stacked like the
                # weights; each layer draws its own LoRA-dropout mask.
                _ScanBody, variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                         nn.broadcast),
                length=cfg.num_hidden_layers)(cfg)
        else:
            layer_cls = _remat(DecoderLayer, cfg.remat_policy)
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_hidden_layers)]

    def embed(self, input_ids):
        """Token embeddings [B, T, d] (ids must be in range; callers replace placeholders)."""
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
                 positions=None, cache=None, return_all_hidden=False, logits_slice=None):
        """Runs the decoder.

        Args:
          input_ids: [B, T] int (or give ``inputs_embeds`` [B, T, d], the multimodal path).
          attention_mask: [B, T] 1 for real tokens, 0 for padding (default all ones).
          positions: [B, T] RoPE positions (default :func:`positions_from_mask` of the mask,
            offset by what the cache already holds).
          cache: from :func:`init_cache`; the new keys are written at each row's ``index``.
          return_all_hidden: also return every layer's input plus the final-norm output
            (Hugging Face's ``hidden_states`` tuple).
          logits_slice: optional [B] int positions: compute logits only there ([B, 1, V]).

        Returns dict: ``logits`` [B, T, V] (compute dtype), ``last_hidden_state`` [B, T, d]
        (final-norm output), optionally ``hidden_states`` (tuple of L+1), and ``cache``.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        b, t = x.shape[:2]  # x: [B, T, d]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            index = jnp.zeros((b,), jnp.int32)
            key_valid = attention_mask
            past = jnp.zeros((b,), jnp.int32)
        else:
            index = cache["index"]
            key_valid = _write_rows(cache["valid"], attention_mask, index)  # [B, S]
            past = jnp.sum(cache["valid"], axis=-1).astype(jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask) + past[:, None]
        query_slots = index[:, None] + jnp.arange(t)[None, :]  # [B, T]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)

        hidden = []
        if cfg.scan_layers:
            kv = None if cache is None else (cache["k"], cache["v"])
            x, (new_kv, layer_inputs) = self.layers(
                x, kv, cos, sin, query_slots, key_valid, index)
            new_k, new_v = (None, None) if new_kv is None else new_kv
            if return_all_hidden:
                hidden = [layer_inputs[i] for i in range(cfg.num_hidden_layers)]
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                hidden.append(x)
                lc = None if cache is None else dict(k=cache["k"][i], v=cache["v"][i], index=index)
                x, k_i, v_i = layer(x, cos, sin, query_slots, key_valid, lc)
                new_k.append(k_i)
                new_v.append(v_i)
            new_k, new_v = tuple(new_k), tuple(new_v)
        x = self.norm(x)  # [B, T, d]
        out = dict(last_hidden_state=x)
        head_in = x
        if logits_slice is not None:
            head_in = jnp.take_along_axis(x, logits_slice[:, None, None], axis=1)  # [B, 1, d]
        if cfg.tie_word_embeddings:
            out["logits"] = self.embed_tokens.attend(head_in)
        else:
            out["logits"] = self.lm_head(head_in)  # [B, T, V]
        if return_all_hidden:
            out["hidden_states"] = tuple(hidden) + (x,)
        if cache is not None:
            out["cache"] = dict(k=new_k, v=new_v, valid=key_valid, index=index + t)
        return out


def param_shapes(config: LlamaConfig) -> dict:
    """Abstract parameter tree (``jax.eval_shape``), no memory allocated."""
    model = LlamaForCausalLM(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


"""SAM's two-way transformer: prompt tokens and image embedding attend to each other.
LayerNorms here use PyTorch's default eps 1e-5 (the image-side LayerNorm2d's use 1e-6)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2sa_jax.models.sam.common import Dtype, LayerNorm, dense


class DecoderAttention(nn.Module):
    """Attention with q/k/v projections to ``dim // downsample_rate`` (SAM's Attention)."""

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v):
        dim = q.shape[-1]
        inner = dim // self.downsample_rate
        hd = inner // self.num_heads
        split = lambda x: x.reshape(*x.shape[:-1], self.num_heads, hd)  # noqa: E731
        q = split(dense(inner, self.dtype, "q_proj")(q))  # [B, Nq, heads, hd]
        k = split(dense(inner, self.dtype, "k_proj")(k))  # [B, Nk, heads, hd]
        v = split(dense(inner, self.dtype, "v_proj")(v))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
        out = out.reshape(*out.shape[:2], inner)
        return dense(dim, self.dtype, "out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attn, token→image cross-attn, MLP (ReLU), image→token cross-attn."""

    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        dim = queries.shape[-1]
        ln = lambda name: LayerNorm(1e-5, self.dtype, name=name)  # noqa: E731  torch default eps
        self_attn = DecoderAttention(self.num_heads, 1, self.dtype, name="self_attn")
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries)
        queries = ln("norm1")(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = queries + DecoderAttention(self.num_heads, self.downsample_rate, self.dtype,
                                             name="cross_attn_token_to_image")(q, k, keys)
        queries = ln("norm2")(queries)
        y = dense(self.mlp_dim, self.dtype, "mlp_lin1")(queries)
        queries = queries + dense(dim, self.dtype, "mlp_lin2")(nn.relu(y))
        queries = ln("norm3")(queries)
        q, k = queries + query_pe, keys + key_pe
        keys = keys + DecoderAttention(self.num_heads, self.downsample_rate, self.dtype,
                                       name="cross_attn_image_to_token")(k, q, queries)
        keys = ln("norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    depth: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embedding, image_pe, point_embedding):
        """image_embedding, image_pe [B, HW, C]; point_embedding [B, N, C]."""
        queries, keys = point_embedding, image_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads, self.mlp_dim, self.downsample_rate, i == 0, self.dtype,
                name=f"layers_{i}")(queries, keys, point_embedding, image_pe)
        q, k = queries + point_embedding, keys + image_pe
        queries = queries + DecoderAttention(self.num_heads, self.downsample_rate, self.dtype,
                                             name="final_attn_token_to_image")(q, k, keys)
        queries = LayerNorm(1e-5, self.dtype, name="norm_final_attn")(queries)
        return queries, keys

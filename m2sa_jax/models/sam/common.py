"""Layers every SAM network uses, with PyTorch's numerics named where they differ from Flax's:
exact (erf) GELU, LayerNorm with PyTorch's parameter names and float32 statistics."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2sa_jax.models.activations import gelu_exact

Dtype = Any
HIGHEST = jax.lax.Precision.HIGHEST


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU(); Flax's nn.gelu defaults to the tanh form."""
    return gelu_exact(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with PyTorch names (weight, bias); stats in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) / jnp.sqrt(var + self.eps)
        return (y * weight + bias).astype(self.dtype)


def dense(features, dtype, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv(features, kernel, stride, padding, dtype, name, use_bias=True):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(padding, padding)] * 2, use_bias=use_bias, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (SAM's decoder heads)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = dense(self.output_dim if last else self.hidden_dim, self.dtype, f"layers_{i}")(x)
            if not last:
                x = nn.relu(x)
        return x

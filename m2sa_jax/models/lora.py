"""LoRA for the LLM's projections, kept outside the model code.

The LoRA factors live in their own tree, ``{<path to a Dense>: {"lora_a": [..., in, r],
"lora_b": [..., r, out]}}``, mirroring the parameter paths of the targeted Dense layers (a
leading layer axis when the layers are scanned). Two ways to use them:

* :func:`lora_interceptor` — for training: a Flax method interceptor adds
  ``scale · dropout(x) @ A @ B`` to the output of each targeted Dense (PEFT's formulation,
  dropout on the LoRA branch's input), reading the factors from the ``"lora"`` variable
  collection so that scanned layers see their own slice.
* :func:`merge` — a parameter transform: ``kernel + scale · A @ B``; what inference and export
  use. With dropout off, merged and unmerged outputs are equal.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2sa_jax.tree import flatten, unflatten

COLLECTION = "lora"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Sequence[str] = ("q_proj", "v_proj")
    # Modules whose Dense layers never get LoRA even when named like a target: the public
    # code's find_linear_layers skips the vision tower, SAM, mm_projector and the [SEG]
    # projector, so LoRA lives in the LLM alone (CLIP and SAM also have q_proj/v_proj).
    exclude: Sequence[str] = ("vision_tower", "sam", "mm_projector", "text_hidden_fcs")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                    targets=list(self.targets), exclude=list(self.exclude))

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoraConfig | None":
        """From a config's ``train.lora`` (or :meth:`to_dict`); None when the rank is 0 (no
        LoRA)."""
        d = dict(d)
        if not d.get("rank"):
            return None
        extra = {"exclude": tuple(d["exclude"])} if "exclude" in d else {}
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]), **extra)


def target_paths(params: Mapping, cfg: LoraConfig) -> list[str]:
    """'/'-joined paths of the Dense modules (holding a 'kernel') whose name is a target,
    outside the excluded modules."""
    out = []
    for path in flatten(params):
        *module, leaf = path.split("/")
        if (leaf == "kernel" and module and module[-1] in cfg.targets
                and not set(module) & set(cfg.exclude)):
            out.append("/".join(module))
    return sorted(out)


def init(rng, params: Mapping, cfg: LoraConfig) -> dict:
    """A ~ PEFT's kaiming-uniform(a=√5) (bound 1/√in), B = 0: the model starts unchanged."""
    flat = flatten(params)
    out = {}
    paths = target_paths(params, cfg)
    if not paths:
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no Dense kernel in the model")
    for i, module in enumerate(paths):
        kernel = flat[f"{module}/kernel"]
        *lead, d_in, d_out = kernel.shape
        bound = 1.0 / math.sqrt(d_in)
        key = jax.random.fold_in(rng, i)
        out[f"{module}/lora_a"] = jax.random.uniform(
            key, (*lead, d_in, cfg.rank), jnp.float32, -bound, bound)
        out[f"{module}/lora_b"] = jnp.zeros((*lead, cfg.rank, d_out), jnp.float32)
    return unflatten(out)


def merge(params: Mapping, lora: Mapping, cfg: LoraConfig) -> dict:
    """kernel ← kernel + scale · A @ B for every LoRA'd Dense (the parameter transform)."""
    flat = dict(flatten(params))
    lflat = flatten(lora)
    for path in {p.rsplit("/", 1)[0] for p in lflat}:
        a, b = lflat[f"{path}/lora_a"], lflat[f"{path}/lora_b"]
        k = flat[f"{path}/kernel"]
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * cfg.scale
        flat[f"{path}/kernel"] = (k.astype(jnp.float32) + delta).astype(k.dtype)
    return unflatten(flat)


def lora_interceptor(cfg: LoraConfig, *, deterministic: bool):
    """Interceptor adding the LoRA branch to targeted Dense calls (use with nn.intercept_methods).

    The module must be applied with ``{"params": ..., "lora": lora_tree}`` (and, unless
    deterministic, a ``"dropout"`` rng); nn.scan'ed layers must carry the ``"lora"`` collection
    along their layer axis and split the ``"dropout"`` rng.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or module.name not in cfg.targets or not module.has_variable(COLLECTION, "lora_a")):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        a = module.get_variable(COLLECTION, "lora_a")
        b = module.get_variable(COLLECTION, "lora_b")
        if not deterministic and cfg.dropout > 0:
            key = module.make_rng("dropout")
            keep = jax.random.bernoulli(key, 1 - cfg.dropout, x.shape)
            x = jnp.where(keep, x / (1 - cfg.dropout), 0).astype(x.dtype)
        dtype = y.dtype
        return y + ((x @ a.astype(dtype)) @ b.astype(dtype)) * jnp.asarray(cfg.scale, dtype)

    return interceptor

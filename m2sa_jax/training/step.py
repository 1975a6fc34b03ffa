"""The jitted train step: forward, losses, gradients of the trainable set only, AdamW.

State is a dict ``{"step", "variables": {"params": ..., "lora": ...}, "opt_state", "rng",
"nonfinite"}``. Gradients are taken with respect to the trainable leaves alone (the frozen SAM
and CLIP encoders are never differentiated); the optimizer is ``optax.multi_transform`` over
the whole tree with ``set_to_zero`` for the frozen group, and updates are applied to the
trainable leaves only, so frozen weights stay bit-identical. Gradient accumulation scans over
the leading micro-batch axis. A non-finite loss or gradient skips the update and counts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m2sa_jax.tree import flatten, unflatten
from m2sa_jax.models import lora as lora_lib
from m2sa_jax.models.m2sa import M2SA
from m2sa_jax.training.losses import compute_losses
from m2sa_jax.training.optim import TRAINABLE


def split_trainable(tree: Mapping, labels: Mapping):
    flat, lab = flatten(tree), flatten(labels)
    train = {k: v for k, v in flat.items() if lab[k] == TRAINABLE}
    frozen = {k: v for k, v in flat.items() if lab[k] != TRAINABLE}
    return train, frozen


def make_loss_fn(model: M2SA, loss_weights: Mapping[str, float],
                 lora_cfg: lora_lib.LoraConfig | None, deterministic: bool = False):
    def loss_fn(train_flat, frozen_flat, batch, rng):
        variables = unflatten({**train_flat, **frozen_flat})
        ctx = (nn.intercept_methods(lora_lib.lora_interceptor(lora_cfg, deterministic=deterministic))
               if lora_cfg is not None and "lora" in variables else contextlib.nullcontext())
        with ctx:
            out = model.apply(variables, batch, method=M2SA.forward_batch,
                              rngs={"dropout": rng})
        total, terms = compute_losses(out, batch, **loss_weights)
        return total, terms

    return loss_fn


def make_train_step(model: M2SA, optimizer: optax.GradientTransformation, labels: Mapping,
                    loss_weights: Mapping[str, float], lora_cfg=None, grad_accum: int = 1):
    loss_fn = make_loss_fn(model, loss_weights, lora_cfg)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: dict, batch: Mapping[str, Any]):
        train, frozen = split_trainable(state["variables"], labels)
        rng = jax.random.fold_in(state["rng"], state["step"])
        if grad_accum == 1:
            (loss, terms), grads = grad_fn(train, frozen, batch, rng)
        else:
            def micro(carry, xs):
                i, mb = xs
                (l, t), g = grad_fn(train, frozen, mb, jax.random.fold_in(rng, i))
                acc_g, acc_l, acc_t = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l,
                        jax.tree.map(jnp.add, acc_t, t)), None

            zeros = jax.tree.map(jnp.zeros_like, train)
            t0 = {k: jnp.zeros((), jnp.float32) for k in ("ce", "bce", "dice", "mask", "total")}
            (grads, loss, terms), _ = jax.lax.scan(
                micro, (zeros, jnp.zeros((), jnp.float32), t0),
                (jnp.arange(grad_accum), batch))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss = loss / grad_accum
            terms = jax.tree.map(lambda t: t / grad_accum, terms)
        full_grads = unflatten({**grads, **{k: jnp.zeros_like(v) for k, v in frozen.items()}})
        updates, new_opt = optimizer.update(full_grads, state["opt_state"], state["variables"])
        upd = flatten(updates)
        new_train = {k: (v + upd[k].astype(v.dtype)).astype(v.dtype) for k, v in train.items()}
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = dict(
            step=state["step"] + 1,
            variables=unflatten({**keep(new_train, train), **frozen}),
            opt_state=keep(new_opt, state["opt_state"]),
            rng=state["rng"],
            nonfinite=jnp.where(finite, 0, state["nonfinite"] + 1),
        )
        metrics = dict(terms, loss=loss, grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return step

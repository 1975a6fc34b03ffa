"""Quantized weights on disk: a converted directory (``params/`` orbax tree +
``m2sa_meta.json``) whose quantized kernels are ``{"qvalue": int8|int4, "scale": float}``
sub-trees and whose metadata has ``"quantization": {"scheme", "parts", "group_size"}``
(:mod:`m2sa_jax.quantization` defines the schemes). Restoring it reads the integer values and
scales as stored: no float copy of those weights is ever made.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from m2sa_jax.checkpoints.converted import load_meta, load_params, save_params
from m2sa_jax.quantization import (META_KEY, QArray, QuantSpec, WithAux, as_spec,
                                   group_size_for, how_to_quantize, is_quantized_leaf,
                                   quantize_params, spec_of, target_paths)
from m2sa_jax.tree import flatten, unflatten


def to_stored(params) -> dict:
    """Quantized leaves → ``{"qvalue", "scale"}`` sub-trees of plain arrays (orbax-savable)."""
    def one(x):
        if is_quantized_leaf(x):
            return {"qvalue": x.array.qvalue, "scale": x.array.scale}
        return x

    return jax.tree.map(one, params, is_leaf=is_quantized_leaf)


def from_stored(stored, spec: QuantSpec, *, source: str = "the parameters"):
    """Inverse of :func:`to_stored`, checked against ``spec``: every layer the spec quantizes
    must be stored quantized (values of the scheme's type, scales of the matching shape), and
    nothing else."""
    flat = flatten(stored)
    quantized = {p.rsplit("/", 1)[0] for p in flat if p.endswith("/qvalue")}
    kernels = {p: None for p in quantized}
    expected = set(target_paths(kernels, spec))
    if quantized != expected or not expected:
        raise ValueError(
            f"{source}: the stored quantized layers do not match {spec.describe()}: "
            f"missing {sorted(expected - quantized)[:5]}, unexpected "
            f"{sorted(quantized - expected)[:5]}{'' if expected else ' (none stored)'}")
    out = {p: v for p, v in flat.items()
           if not (p.endswith("/qvalue") or p.endswith("/scale")) or
           p.rsplit("/", 1)[0] not in quantized}
    want = jnp.dtype(spec.qtype)
    for path in sorted(quantized):
        qvalue, scale = flat[path + "/qvalue"], flat[path + "/scale"]
        group = group_size_for(spec, qvalue.shape[-2], path)
        rows = qvalue.shape[-2] // group if group else 1
        ok_scale = tuple(scale.shape) == tuple(qvalue.shape[:-2]) + (rows, qvalue.shape[-1])
        if jnp.dtype(qvalue.dtype) != want or not ok_scale:
            raise ValueError(f"{source}: {path} holds {qvalue.dtype} {tuple(qvalue.shape)} "
                             f"values with {tuple(scale.shape)} scales, not {spec.describe()}")
        out[path] = WithAux(QArray(jnp.asarray(qvalue), jnp.asarray(scale), qtype=want),
                            how_to_quantize(spec, group))
    return unflatten(out)


def save(directory: str, params, meta: Mapping[str, Any]) -> str:
    """A quantized tree as a converted directory: ``params/`` (orbax) + ``m2sa_meta.json``
    with ``meta`` plus ``"quantization"``."""
    spec = spec_of(params)
    if spec is None:
        raise ValueError("save(): the parameters are not quantized; use "
                         "m2sa_jax.checkpoints.converted.save_params for float trees")
    return save_params(directory, to_stored(params), {**dict(meta), META_KEY: spec.to_meta()})


def stored_spec(meta: Mapping[str, Any]) -> QuantSpec | None:
    """The QuantSpec a directory's metadata records (None for float weights)."""
    return QuantSpec.from_meta(meta[META_KEY]) if meta.get(META_KEY) else None


def check_request(directory: str, meta: Mapping[str, Any], quantize, *, vision: bool = False
                  ) -> QuantSpec | None:
    """What loading ``directory`` with ``quantize`` gives: the stored spec, or the requested
    one for float weights. A stored tree quantized another way is refused; the same way is a
    no-op that says so."""
    requested = as_spec(quantize, vision=vision)
    held = stored_spec(meta)
    if held is None or requested is None:
        return held or requested
    if requested != held:
        raise ValueError(
            f"{directory}: the weights are stored quantized as {held.describe()}; they cannot "
            f"be loaded as {requested.describe()} (that would re-quantize rounded weights). "
            f"Load it without quantize (or with quantize={held.scheme!r}), or quantize the "
            f"float checkpoint: python -m checkpoints_convert m2sa --src HF_FOLDER --dst NEW_DIR "
            f"--quantize {requested.scheme}")
    warnings.warn(f"{directory}: already quantized as {held.describe()}; loading it as stored",
                  stacklevel=2)
    return held


def restore(directory: str, *, quantize=None, vision: bool = False, scale_dtype=None):
    """(params, spec, meta) of a converted directory.

    A directory stored quantized is restored as stored (integer values + scales, never a float
    copy of those weights); ``quantize`` must then name its scheme or be None. A float directory
    with ``quantize`` is restored and then quantized (float weights materialise once, in host
    memory, before their integer form replaces them; ``scale_dtype`` as in
    :func:`quantize_params`).
    """
    meta = load_meta(directory)
    spec = check_request(directory, meta, quantize, vision=vision)
    params = load_params(directory)
    held = stored_spec(meta)
    if held is not None:
        params = from_stored(params, held, source=directory)
    elif spec is not None:
        params = quantize_params(params, spec, scale_dtype=scale_dtype)
    return params, spec, meta

"""Small utilities on parameter trees (nested dicts of arrays), shared by every layer.

Paths are ``/``-joined key sequences (``"llava/language_model/lm_head/kernel"``): the names the
conversion tables, the LoRA and freezing patterns and the sharding rules all speak.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dict → ``{'a/b/c': leaf}``."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    """``{'a/b/c': leaf}`` → nested dict (the inverse of :func:`flatten`)."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays or ``ShapeDtypeStruct``s."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))

"""Sharding by rules: a (data, fsdp, tensor) device mesh, logical axis names for parameters from
one table of path patterns, and one table mapping logical names to mesh axes.

Parameters are placed by :func:`param_shardings` (a tree of NamedShardings the jitted init or
the checkpoint restore writes into directly), batches are split along their leading axis over
(data, fsdp). A dimension is only sharded when the mesh axis divides it; otherwise it stays
replicated (small test models on 8 devices).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from checkpoints_convert.table import flatten, unflatten

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter path (regex, fullmatch on the '/'-joined path without the collection) → logical
# names of its dimensions, leading (scan) dimensions excluded. First match wins.
PARAM_RULES: Sequence[tuple[str, tuple[str | None, ...]]] = (
    (r".*language_model/embed_tokens/embedding", ("vocab", "embed")),
    (r".*language_model/lm_head/kernel", ("embed", "vocab")),
    (r".*language_model/.*self_attn/(q_proj|k_proj|v_proj)/kernel", ("embed", "heads")),
    (r".*language_model/.*self_attn/o_proj/kernel", ("heads", "embed")),
    (r".*language_model/.*mlp/(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r".*language_model/.*mlp/down_proj/kernel", ("mlp", "embed")),
    (r".*lora_a", ("embed", None)),
    (r".*lora_b", (None, None)),
)

# Logical name → mesh axis (None: replicated).
LOGICAL_TO_MESH: Mapping[str, str | None] = {
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "mlp": "tensor", "batch": "data",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over all (or the given) devices; ``-1`` takes what the other axes leave."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into fsdp·tensor = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for pattern, names in PARAM_RULES:
        if re.fullmatch(pattern, path):
            lead = ndim - len(names)
            if lead < 0:
                break
            return (None,) * lead + tuple(names)
    return (None,) * ndim


def spec_for(path: str, shape, mesh: Mesh) -> P:
    axes = []
    for name, dim in zip(logical_axes(path, len(shape)), shape):
        axis = LOGICAL_TO_MESH.get(name) if name else None
        if axis is not None and (mesh.shape[axis] == 1 or dim % mesh.shape[axis]):
            axis = None
        axes.append(axis)
    return P(*axes)


def param_shardings(tree: Mapping, mesh: Mesh) -> dict:
    """NamedSharding per leaf of a (possibly abstract) parameter tree."""
    return unflatten({p: NamedSharding(mesh, spec_for(p, np.shape(v), mesh))
                      for p, v in flatten(tree).items()})


def batch_sharding(batch: Mapping, mesh: Mesh) -> dict:
    """Leading axis over (data, fsdp) when divisible, else replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        shape = np.shape(v)
        spec = P(("data", "fsdp")) if shape and shape[0] % n == 0 and n > 1 else P()
        out[k] = NamedSharding(mesh, spec)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

"""Sharding by rules: a (data, fsdp, tensor) device mesh, logical axis names for parameters from
one table of path patterns, and a table mapping logical names to mesh axes, chosen by name
(``config.mesh.rules``, one of :data:`RULES`).

* Parameters (and their LoRA factors and Adam moments) are laid out by :func:`param_shardings`
  / :func:`state_shardings`: a tree of NamedShardings that loaded weights are put into
  (:func:`put_global`), that jitted initialisers write into (``jax.jit(optimizer.init,
  out_shardings=...)``), that the checkpoint restore targets, and that the donated train step
  takes and returns unchanged.
* Under the ``"fsdp_tensor"`` rules (every config's), ``fsdp`` shards the model dimension
  ("embed") of every large matrix — the LLM, the CLIP tower and the SAM ViT — so frozen
  weights, trainable weights and Adam moments are all split; XLA gathers a layer's weights
  where it is used. ``tensor`` splits heads / MLP width / vocabulary (Megatron-style). ``data``
  replicates. ``"fsdp"`` leaves out the tensor split; ``"replicated"`` shards no parameter
  (pure data parallelism).
* Batches are split along their leading (example) axis over (data, fsdp); with gradient
  accumulation the leading axis is the micro-batch axis and the second is split. Training
  hosts each build their own part of the global batch (:func:`put_host_batch` assembles it).
* A dimension is sharded only when the mesh axis divides it; otherwise it stays replicated
  (the vocabulary of 32,003 rows; small test models).

Scanned layers (``LlamaConfig.scan_layers``) carry a leading layer axis: the rules name the
trailing dimensions only, so leading axes stay unsharded. The mesh uses ``jax.sharding.Mesh``
with Auto axes (the compiler propagates shardings inside the step; ``jax.make_mesh`` would
give Explicit axes).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2sa_jax.tree import flatten, unflatten

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter path (regex, fullmatch on the '/'-joined path, collection included: "params/…",
# "lora/…") → logical names of its trailing dimensions. First match wins; unmatched leaves
# (norms, biases, small convs, the SAM prompt encoder and mask decoder) are replicated.
PARAM_RULES: Sequence[tuple[str, tuple[str | None, ...]]] = (
    # LLaMA / Vicuna (embed = d_model, heads = H·head_dim, mlp = FFN width)
    (r".*language_model/embed_tokens/embedding", ("vocab", "embed")),
    (r".*language_model/lm_head/kernel", ("embed", "vocab")),
    (r".*language_model/.*self_attn/(q_proj|k_proj|v_proj)/kernel", ("embed", "heads")),
    (r".*language_model/.*self_attn/o_proj/kernel", ("heads", "embed")),
    (r".*language_model/.*mlp/(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r".*language_model/.*mlp/down_proj/kernel", ("mlp", "embed")),
    # LoRA factors of the LLM projections: A [.., in, r] follows the kernel's input; B is tiny.
    (r"lora/.*/lora_a", ("embed", None)),
    (r"lora/.*/lora_b", (None, None)),
    # CLIP ViT-L/14 (frozen, 303M)
    (r".*vision_tower/.*self_attn/(q_proj|k_proj|v_proj)/kernel", ("embed", "heads")),
    (r".*vision_tower/.*self_attn/out_proj/kernel", ("heads", "embed")),
    (r".*vision_tower/.*fc1/kernel", ("embed", "mlp")),
    (r".*vision_tower/.*fc2/kernel", ("mlp", "embed")),
    (r".*mm_projector/.*kernel", (None, "embed")),
    # SAM ViT-H image encoder (frozen, 637M)
    (r".*sam/image_encoder/.*attn/qkv/kernel", ("embed", "heads")),
    (r".*sam/image_encoder/.*attn/proj/kernel", ("heads", "embed")),
    (r".*sam/image_encoder/.*lin1/kernel", ("embed", "mlp")),
    (r".*sam/image_encoder/.*lin2/kernel", ("mlp", "embed")),
    (r".*sam/image_encoder/pos_embed", ("embed",)),
    # compress_vit's first conv reads the ViT width (3×3×1280×256, trainable)
    (r".*sam/mask_decoder/compress_vit_conv0/kernel", ("embed", None)),
    # [SEG] projector Linear d→d, Linear d→256 (trainable, 17M at 7B)
    (r".*text_hidden_fcs/dense_0/kernel", ("embed", "mlp")),
    (r".*text_hidden_fcs/dense_2/kernel", ("embed", None)),
)

# The logical-axis rules by name: logical name → mesh axis (absent or None: replicated).
RULES: Mapping[str, Mapping[str, str | None]] = {
    "fsdp_tensor": {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "mlp": "tensor",
                    "batch": "data"},
    "fsdp": {"embed": "fsdp", "batch": "data"},
    "replicated": {"batch": "data"},
}
DEFAULT_RULES = "fsdp_tensor"

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over all (or the given) devices; ``-1`` takes what the other axes leave."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one of data/fsdp/tensor may be -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh: {len(devices)} devices do not divide into the other "
                             f"axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs "
                         f"{int(np.prod(sizes))} devices, have {len(devices)}; fix the sizes or "
                         f"set one axis to -1")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_from_config(mesh_cfg: Mapping, devices=None) -> Mesh:
    """:func:`make_mesh` from a config's ``mesh`` (its sizes; ``rules`` is read by the
    shardings)."""
    return make_mesh(mesh_cfg["data"], mesh_cfg["fsdp"], mesh_cfg["tensor"], devices=devices)


def rules_named(name: str) -> Mapping[str, str | None]:
    """The logical-axis rules table registered as ``name``."""
    if name not in RULES:
        raise ValueError(f"config.mesh.rules={name!r}: unknown sharding rules; choose one of "
                         f"{', '.join(RULES)}")
    return RULES[name]


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical names of a leaf's dimensions (leading scan axes and unmatched leaves: None)."""
    for pattern, names in PARAM_RULES:
        if re.fullmatch(pattern, path):
            lead = ndim - len(names)
            if lead < 0:
                break
            return (None,) * lead + tuple(names)
    return (None,) * ndim


def spec_for(path: str, shape, mesh: Mesh, rules: str = DEFAULT_RULES) -> P:
    """The PartitionSpec of one parameter under the named rules (a mesh axis that does not
    divide its dimension is dropped)."""
    table = rules_named(rules)
    axes = []
    for name, dim in zip(logical_axes(path, len(shape)), shape):
        axis = table.get(name) if name else None
        if axis is not None and (mesh.shape[axis] == 1 or dim % mesh.shape[axis]):
            axis = None
        axes.append(axis)
    return P(*axes)


def param_shardings(tree: Mapping, mesh: Mesh, rules: str = DEFAULT_RULES) -> dict:
    """NamedSharding per leaf of a (possibly abstract) variables tree ({"params", "lora"})."""
    return unflatten({p: NamedSharding(mesh, spec_for(p, np.shape(v), mesh, rules))
                      for p, v in flatten(tree).items()})


def _dict_path(keypath) -> str:
    return "/".join(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(opt_state, variables: Mapping, var_shardings: Mapping, mesh: Mesh):
    """Optimizer-state leaves laid out like the parameter they belong to (Adam's mu/nu sit under
    the parameter's own path inside optax's states); counters and the like are replicated."""
    shapes = {p: np.shape(v) for p, v in flatten(variables).items()}
    shards = flatten(var_shardings)
    rep = replicated(mesh)

    def one(keypath, leaf):
        parts = _dict_path(keypath).split("/")
        for i in range(len(parts)):
            var_path = "/".join(parts[i:])
            if var_path in shards and shapes[var_path] == np.shape(leaf):
                return shards[var_path]
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_state)


def state_shardings(state: Mapping, mesh: Mesh, rules: str = DEFAULT_RULES) -> dict:
    """The explicit layout of a train state ``{step, variables, opt_state, rng, nonfinite}``
    (abstract or live): the jitted init's out_shardings and the step's in/out shardings."""
    var_sh = param_shardings(state["variables"], mesh, rules)
    rep = replicated(mesh)
    return dict(step=rep, variables=var_sh, rng=rep, nonfinite=rep,
                opt_state=opt_state_shardings(state["opt_state"], state["variables"], var_sh,
                                              mesh))


def batch_spec(shape, mesh: Mesh, micro: bool = False) -> P:
    """Example axis (the leading one, or the second under gradient accumulation) over
    (data, fsdp) when divisible; everything else replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    axis = 1 if micro else 0
    if n == 1 or len(shape) <= axis or shape[axis] % n:
        return P()
    return P(*([None] * axis), BATCH_AXES)


def batch_sharding(batch: Mapping, mesh: Mesh, micro: bool = False) -> dict:
    return {k: NamedSharding(mesh, batch_spec(np.shape(v), mesh, micro)) for k, v in batch.items()}


def put_global(tree, shardings):
    """Host arrays holding the *global* value (the same on every process) → global jax.Arrays
    in the given layout. One process: ``device_put``; several: each process fills only the
    shards of its own devices (``make_array_from_callback``), nothing crosses hosts."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sh):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == sh else jax.device_put(x, sh)    # already global
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def put_batch(batch: Mapping, mesh: Mesh, micro: bool = False) -> dict:
    """A global host batch → arrays split over (data, fsdp) (see :func:`put_global`)."""
    return put_global(dict(batch), batch_sharding(batch, mesh, micro))


def host_block(global_shape, sharding: NamedSharding, axis: int) -> tuple[int, int]:
    """(start, stop) of this process's part of ``axis`` under ``sharding``: the span its
    devices' shards cover. Raises if that span is not one block that no other process holds."""
    spans = sorted({(idx[axis].start or 0, global_shape[axis] if idx[axis].stop is None
                     else idx[axis].stop)
                    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start or (stop - start) * jax.process_count() != global_shape[axis]:
        raise ValueError(f"the batch axis of shape {tuple(global_shape)} is not split into one "
                         f"contiguous block per process under {sharding.spec} (this process: "
                         f"{spans}); use a mesh whose (data, fsdp) axes run over the processes "
                         "(tensor within a host)")
    return start, stop


def put_host_batch(local: Mapping, mesh: Mesh, micro: bool = False) -> dict:
    """This host's part of a global batch → the global arrays split over (data, fsdp).

    The part is what ``data.train_stream.TrainStream`` builds on each host: ``1/processes`` of
    the images and conversations, image indices local to it. One process: the part is the whole
    batch (:func:`put_batch`). Several: each field's example axis is assembled from the
    processes' parts (``jax.make_array_from_process_local_data``; a process's part is the block
    its devices hold), and ``conv_image_index`` is shifted by the global position of the host's
    first image, so every conversation still points at its own image."""
    if jax.process_count() == 1:
        return put_batch(local, mesh, micro)
    axis = 1 if micro else 0
    out = {}
    shardings = {}
    for k, v in local.items():
        shape = list(np.shape(v))
        shape[axis] *= jax.process_count()
        spec = batch_spec(shape, mesh, micro)
        if spec == P():
            raise ValueError(f"batch field {k!r} of global shape {tuple(shape)}: its example "
                             f"axis is not divisible by the {mesh.shape['data'] * mesh.shape['fsdp']} "
                             "(data, fsdp) devices; make images and conversations per batch "
                             "multiples of them")
        shardings[k] = (NamedSharding(mesh, spec), tuple(shape))
    first_image = host_block(shardings["sam_images"][1], shardings["sam_images"][0], axis)[0]
    for k, v in local.items():
        sh, shape = shardings[k]
        host_block(shape, sh, axis)
        v = np.asarray(v)
        if k == "conv_image_index":
            v = v + np.int32(first_image)
        out[k] = jax.make_array_from_process_local_data(sh, v, shape)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

"""Per-device memory of a train step, from XLA's memory analysis, without any weights.

The state (float32 master weights, LoRA factors, Adam moments of the trainable set) and a batch
are described by ShapeDtypeStructs carrying their shardings (the rules of
:mod:`m2sa_jax.sharding`); the same train step the loop runs
(:func:`m2sa_jax.training.step.make_train_step`, state donated) is lowered and compiled ahead of
time for the mesh, and ``compiled.memory_analysis()`` gives the per-device buffer sizes of the
partitioned program. Nothing is allocated, so a 13B plan runs on a laptop's CPU with fake
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax is imported).

What the figures are: *argument* (state + batch shards), *output* (new state + metrics),
*alias* (output bytes that reuse donated argument buffers), *temp* (activations, gradients,
gathered weights: everything live inside the step at its peak), *code*. Peak ≈ argument +
output − alias + temp. They come from XLA's CPU compiler: the GPU compiler fuses and schedules
differently, so treat them as a plan (±20 %), not a measurement.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax import sharding
from m2sa_jax.data.pipeline import BatchShapes
from m2sa_jax.models import lora as lora_lib
from m2sa_jax.models.m2sa import M2SA, M2SAConfig, abstract_params
from m2sa_jax.training import optim, setup
from m2sa_jax.training.step import make_train_step

GB = 1e9
# LLaVA v1's 32,000 SentencePiece pieces + [SEG], <im_start>, <im_end> (SPEC §1: vocab 32,003).
PAPER_VOCAB, PAPER_SEG_ID = 32003, 32000


def model_config(cfg, vocab_size: int = PAPER_VOCAB, seg_token_id: int = PAPER_SEG_ID) -> M2SAConfig:
    """The model a config describes, from its sizes (``model.llm`` / ``clip`` / ``sam``)."""
    return setup.model_config_from_sizes(cfg, seg_token_id, vocab_size)


def train_parts(cfg, config: M2SAConfig):
    """(abstract variables, labels, optimizer, LoRA config, loss weights) of a config: the same
    pieces ``training.loop`` builds from concrete weights."""
    lora_cfg = lora_lib.LoraConfig.from_dict(cfg.train.lora)
    variables = {"params": abstract_params(config)}
    if lora_cfg is not None:
        variables["lora"] = jax.eval_shape(
            lambda: lora_lib.init(jax.random.key(0), variables["params"], lora_cfg))
    patterns = tuple(cfg.train.trainable) + (("lora/.*",) if lora_cfg else ())
    labels = optim.label_tree(variables, patterns)
    optimizer, _ = optim.make_optimizer(
        labels, lr=cfg.train.lr, warmup_steps=cfg.train.warmup_steps,
        total_steps=cfg.train.steps, b1=cfg.train.b1, b2=cfg.train.b2,
        weight_decay=cfg.train.weight_decay, clip_norm=cfg.train.clip_norm)
    weights = dict(ce_weight=cfg.train.ce_weight, bce_weight=cfg.train.bce_weight,
                   dice_weight=cfg.train.dice_weight)
    return variables, labels, optimizer, lora_cfg, weights


def abstract_state(variables, optimizer) -> dict:
    """ShapeDtypeStructs of the loop's train state (float32 master weights)."""
    f32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), variables)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return dict(step=scalar, variables=f32, opt_state=jax.eval_shape(optimizer.init, f32),
                rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
                nonfinite=scalar)


def batch_shapes(cfg, images: int, tokens: int | None = None) -> BatchShapes:
    """Static batch of ``images`` images (each with up to data.max_questions questions)."""
    buckets = tuple(cfg.data.token_buckets)
    return BatchShapes(images=images, conversations=images * cfg.data.max_questions,
                       token_buckets=(tokens or max(buckets),), max_targets=cfg.data.max_targets,
                       mask_hw=tuple(cfg.data.mask_hw))


def abstract_batch(shapes: BatchShapes, config: M2SAConfig, grad_accum: int = 1) -> dict:
    """ShapeDtypeStructs of a ``data.pipeline.collate`` batch (a leading micro-batch axis when
    accumulating gradients)."""
    i, q, n, t = shapes.images, shapes.conversations, shapes.max_targets, max(shapes.token_buckets)
    s, c = config.sam.img_size, config.llava.vision.image_size
    mh, mw = shapes.mask_hw
    fields = {
        "sam_images": ((i, s, s, 3), jnp.float32), "clip_images": ((i, c, c, 3), jnp.float32),
        "resized_hw": ((i, 2), jnp.int32), "original_hw": ((i, 2), jnp.int32),
        "image_valid": ((i,), jnp.bool_), "input_ids": ((q, t), jnp.int32),
        "labels": ((q, t), jnp.int32), "attention_mask": ((q, t), jnp.bool_),
        "conv_image_index": ((q,), jnp.int32), "conv_valid": ((q,), jnp.bool_),
        "gt_masks": ((q, n, mh, mw), jnp.bool_), "target_valid": ((q, n), jnp.bool_),
    }
    lead = (grad_accum,) if grad_accum > 1 else ()
    return {k: jax.ShapeDtypeStruct(lead + shape, dt) for k, (shape, dt) in fields.items()}


def with_shardings(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        tree, shardings)


@dataclasses.dataclass
class StepMemory:
    """Per-device bytes of one compiled train step (module doc)."""

    argument: int
    output: int
    alias: int
    temp: int
    code: int
    compile_seconds: float

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    def row(self) -> dict:
        return dict(argument_gb=self.argument / GB, output_gb=self.output / GB,
                    alias_gb=self.alias / GB, temp_gb=self.temp / GB, code_mb=self.code / 1e6,
                    peak_gb=self.peak / GB, compile_s=self.compile_seconds)


@dataclasses.dataclass
class ShardedStep:
    """The loop's train step jitted for a mesh: state and batch shardings from the rules, the
    state donated; ``abstract_state`` / ``abstract_batch`` carry those shardings."""

    fn: Any
    state_shardings: dict
    batch_shardings: dict
    abstract_state: dict
    abstract_batch: dict
    optimizer: Any

    def lower(self):
        return self.fn.lower(self.abstract_state, self.abstract_batch)


def sharded_step(cfg, config: M2SAConfig, mesh, batch: Mapping) -> ShardedStep:
    """``batch``: a host batch or its ShapeDtypeStructs (only shapes and dtypes are read)."""
    variables, labels, optimizer, lora_cfg, weights = train_parts(cfg, config)
    state = abstract_state(variables, optimizer)
    state_sh = sharding.state_shardings(state, mesh, cfg.mesh.rules)
    accum = int(cfg.train.grad_accum)
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in batch.items()}
    batch_sh = sharding.batch_sharding(batch, mesh, micro=accum > 1)
    step = make_train_step(M2SA(config), optimizer, labels, weights, lora_cfg, accum)
    fn = jax.jit(step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    return ShardedStep(fn, state_sh, batch_sh, with_shardings(state, state_sh),
                       with_shardings(batch, batch_sh), optimizer)


def lower_train_step(cfg, config: M2SAConfig, mesh, images_per_device: int,
                     tokens: int | None = None):
    """The train step for ``mesh`` lowered with a batch of ``images_per_device`` per device."""
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    per_replica = images_per_device * mesh.size // n_batch
    shapes = batch_shapes(cfg, per_replica * n_batch, tokens)
    batch = abstract_batch(shapes, config, int(cfg.train.grad_accum))
    return sharded_step(cfg, config, mesh, batch).lower()


def memory_of(compiled, seconds: float = 0.0) -> StepMemory:
    m = compiled.memory_analysis()
    return StepMemory(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                      alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
                      code=int(m.generated_code_size_in_bytes), compile_seconds=seconds)


def step_memory(cfg, config: M2SAConfig, mesh, images_per_device: int = 2,
                tokens: int | None = None) -> StepMemory:
    lowered = lower_train_step(cfg, config, mesh, images_per_device, tokens)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return memory_of(compiled, time.perf_counter() - t0)


def state_bytes_per_device(cfg, config: M2SAConfig, mesh) -> dict:
    """Exact per-device bytes of the sharded state by part (weights, LoRA, Adam moments), from
    the shardings alone: a check on the compiled argument size."""
    variables, labels, optimizer, _, _ = train_parts(cfg, config)
    state = abstract_state(variables, optimizer)
    sh = sharding.state_shardings(state, mesh, cfg.mesh.rules)
    return dict(params=shard_bytes(state["variables"]["params"], sh["variables"]["params"]),
                lora=shard_bytes(state["variables"].get("lora", {}),
                                 sh["variables"].get("lora", {})),
                opt_state=shard_bytes(state["opt_state"], sh["opt_state"]))


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` laid out by ``shardings`` (same structure)."""
    total = 0
    for s, shd in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = shd.shard_shape(s.shape) if s.shape else ()
        total += int(np.prod(shape)) * np.dtype(s.dtype).itemsize
    return total

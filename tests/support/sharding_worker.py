"""Subprocess body of tests/test_sharding.py: one train step of a tiny random M²SA on device
meshes, written to an .npz for the test to compare.

Fake CPU devices must be configured before jax is imported, so the tests run this file in a
fresh interpreter:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.support.sharding_worker \\
        meshes OUT.npz 1,1,1 2,4,1 2,1,4 8,1,1
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.support.sharding_worker \\
        process OUT.npz --process_id 0 --num_processes 2 --port 12345 --mesh 2,2,1

Each mesh runs the training code paths the loop uses: parameters, LoRA factors and Adam moments
created under ``jax.jit(..., out_shardings=...)`` straight into the rules' layout
(:func:`sharding.state_shardings`), the batch placed with :func:`sharding.put_batch` (with
several processes, each process's part of it with :func:`sharding.put_host_batch`), and
:func:`step.make_train_step` jitted with those shardings and the state donated. For each mesh
the file holds the loss (``<mesh>/loss``) and every leaf of the updated state gathered to the
host (``<mesh>/<path>``).
"""

from __future__ import annotations

import argparse
import os
import time
import zlib

import numpy as np

from tests.support import CONFIGS


VOCAB, SEG = 64, 60
IMAGES, TOKENS, TARGETS, MASK_HW = 8, 16, 2, (24, 24)


def tiny_config():
    """The synthetic config shrunk to compile fast, with the paper's trainable set, LoRA with
    dropout, scanned + rematerialised LLM layers and M²SA's compress_vit fusion."""
    from m2sa_jax import config_file
    from m2sa_jax.training import optim

    c = config_file.load(os.path.join(CONFIGS, "synthetic.py"))
    c.model.llm = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                       max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                       scan_layers=True, remat_policy="nothing_saveable")
    c.model.clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=32, patch_size=8)
    c.model.sam = dict(model_type="vit_b", encoder_embed_dim=32, encoder_depth=2,
                       encoder_num_heads=4, global_attn_indexes=(1,), window_size=2,
                       img_size=64, prompt_embed_dim=32, decoder_mlp_dim=64,
                       decoder_num_heads=4, iou_head_hidden_dim=32)
    c.train.lr = 1e-3
    c.train.warmup_steps = 0            # the first step must move the weights
    c.train.steps = 10
    c.train.lora = dict(rank=4, alpha=8.0, dropout=0.05, targets=("q_proj", "v_proj"))
    c.train.trainable = optim.M2SA_TRAINABLE
    c.data.token_buckets = (TOKENS,)
    c.data.max_targets = TARGETS
    c.data.mask_hw = MASK_HW
    return c


def synthetic_batch(seed: int = 0) -> dict:
    """A collate-shaped batch: one question per image with 1–2 [SEG]s, random masks."""
    rng = np.random.default_rng(seed)
    q = IMAGES
    ids = rng.integers(3, SEG, (q, TOKENS)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1] = -200                                               # the image placeholder
    attention = np.zeros((q, TOKENS), bool)
    labels = np.full((q, TOKENS), -100, np.int32)
    target_valid = np.zeros((q, TARGETS), bool)
    for i in range(q):
        length = int(rng.integers(9, TOKENS + 1))
        attention[i, :length] = True
        n = 1 + i % TARGETS
        ids[i, length - 1 - np.arange(n) * 2] = SEG
        ids[i, length:] = 0
        labels[i, 5:length] = ids[i, 5:length]
        target_valid[i, :n] = True
    original = rng.integers(12, MASK_HW[0] + 1, (IMAGES, 2)).astype(np.int32)
    resized = np.round(original * 64 / original.max(1, keepdims=True)).astype(np.int32)
    masks = rng.random((q, TARGETS, *MASK_HW)) < 0.3
    ys, xs = np.arange(MASK_HW[0]), np.arange(MASK_HW[1])
    inside = (ys[None, :, None] < original[:, 0, None, None]) & (xs[None, None, :] < original[:, 1, None, None])
    masks &= inside[:, None] & target_valid[:, :, None, None]
    return dict(
        sam_images=rng.normal(size=(IMAGES, 64, 64, 3)).astype(np.float32),
        clip_images=rng.normal(size=(IMAGES, 32, 32, 3)).astype(np.float32),
        resized_hw=resized, original_hw=original, image_valid=np.ones(IMAGES, bool),
        input_ids=ids, labels=labels, attention_mask=attention,
        conv_image_index=np.arange(q, dtype=np.int32), conv_valid=np.ones(q, bool),
        gt_masks=masks, target_valid=target_valid)


def initial_value(path: str, shape) -> np.ndarray:
    """The starting value of the leaf at ``path`` ("params/…", "lora/…"): N(0, 0.02²) (norm
    gains 1 + N(0, 0.02²)) from a seed of its own path, so tests can redraw it (LoRA B is non-zero too, so that LoRA A gets a
    gradient on the first step)."""
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    value = rng.normal(size=shape) * 0.02
    if path.rsplit("/", 1)[-1] in ("weight", "scale") and len(shape) == 1:
        value += 1.0                     # norm gains near 1, so signals keep their scale
    return value.astype(np.float32)


def host_variables(abstract) -> dict:
    """Host values for every leaf (what a loaded checkpoint would give)."""
    from m2sa_jax.tree import flatten, unflatten

    return unflatten({p: initial_value(p, s.shape) for p, s in flatten(abstract).items()})


def run_step(mesh, memory: bool = False) -> tuple[float, dict]:
    """One train step on ``mesh``; returns (loss, flat host copy of the new state). With
    ``memory``, also the compiled step's memory analysis (``memory/<field>`` entries)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from m2sa_jax.tree import flatten
    from m2sa_jax import sharding
    from m2sa_jax.training import memory_plan

    cfg = tiny_config()
    config = memory_plan.model_config(cfg, VOCAB, SEG)
    host_batch = synthetic_batch()
    step = memory_plan.sharded_step(cfg, config, mesh, host_batch)
    state_sh = step.state_shardings
    t0 = time.perf_counter()
    v = sharding.put_global(host_variables(step.abstract_state["variables"]),
                            state_sh["variables"])
    state = dict(step=jnp.zeros((), jnp.int32), variables=v,
                 opt_state=jax.jit(step.optimizer.init, out_shardings=state_sh["opt_state"])(v),
                 rng=jax.random.key_data(jax.random.key(2)), nonfinite=jnp.zeros((), jnp.int32))
    state = sharding.put_global(state, state_sh)
    if jax.process_count() > 1:
        # each process builds only its part of the global batch, image indices local, as
        # TrainStream does on each host; put_host_batch assembles (and re-indexes) the whole
        p, n = jax.process_index(), jax.process_count()
        part = {k: np.split(v, n)[p] for k, v in host_batch.items()}
        part["conv_image_index"] = part["conv_image_index"] - np.int32(p * IMAGES // n)
        batch = sharding.put_host_batch(part, mesh)
    else:
        batch = sharding.put_batch(host_batch, mesh)
    t1 = time.perf_counter()
    new_state, metrics = step.fn(state, batch)
    loss = float(metrics["loss"])
    print(f"  init {t1 - t0:.1f} s, step (compile + run) {time.perf_counter() - t1:.1f} s",
          flush=True)
    if not all(x.is_deleted() for x in jax.tree.leaves(state["variables"])):
        raise AssertionError("the train step did not consume (donate) its input state")
    got, want = flatten(new_state["variables"]), flatten(state_sh["variables"])
    for path, leaf in got.items():
        if not leaf.sharding.is_equivalent_to(want[path], leaf.ndim):
            raise AssertionError(f"{path}: step returned {leaf.sharding}, expected {want[path]}")
    out = {}
    if memory:
        t2 = time.perf_counter()
        m = memory_plan.memory_of(step.lower().compile())
        print(f"  memory analysis {time.perf_counter() - t2:.1f} s", flush=True)
        expect = memory_plan.shard_bytes(step.abstract_state, state_sh)
        out.update({"memory/argument": m.argument, "memory/alias": m.alias,
                    "memory/temp": m.temp, "memory/output": m.output,
                    "memory/state_shard_bytes": expect,
                    "memory/batch_shard_bytes": memory_plan.shard_bytes(
                        step.abstract_batch, step.batch_shardings)})
    tree = dict(variables=new_state["variables"], opt_state=new_state["opt_state"])
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[jax.tree_util.keystr(keypath)] = np.asarray(leaf)
    return loss, out


def mesh_of(spec: str, devices):
    from m2sa_jax import sharding

    d, f, t = (int(x) for x in spec.split(","))
    return sharding.make_mesh(d, f, t, devices=devices[:d * f * t])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["meshes", "process"])
    ap.add_argument("out")
    ap.add_argument("meshes", nargs="*")
    ap.add_argument("--process_id", type=int, default=0)
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mesh", default="2,2,1")
    ap.add_argument("--memory", default="", help="mesh whose compiled memory is recorded")
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    results = {}
    if args.mode == "process":
        jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                                   num_processes=args.num_processes, process_id=args.process_id)
        specs = [args.mesh]
    else:
        specs = args.meshes
    for spec in specs:
        mesh = mesh_of(spec, jax.devices())
        loss, host = run_step(mesh, memory=spec == args.memory)
        results[f"{spec}/loss"] = np.asarray(loss)
        results.update({f"{spec}/{k}": v for k, v in host.items()})
        print(f"mesh {spec}: loss {loss:.6f}", flush=True)
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    if args.mode == "process":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""``train(config, workdir)``: the whole run — data, model, sharding, then a short loop over
steps around which named hooks (training/hooks.py) write metrics, save checkpoints and decide
when to stop; the held-out evaluation before and after is a hook its caller hands in.

Resuming is automatic: if ``workdir/checkpoints`` holds a step, parameters, optimizer state,
step, RNG and the data iterator's position are restored and the run continues where it
stopped, producing the same subsequent losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax import sharding
from m2sa_jax.data import mixed, synthetic
from m2sa_jax.data.mmr import MMRDataset, mmr_split_path, training_split
from m2sa_jax.data.pipeline import BatchShapes
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.train_stream import StreamConfig, TrainStream
from m2sa_jax.models import lora as lora_lib
from m2sa_jax.models.m2sa import M2SA, M2SAConfig
from m2sa_jax.checkpoints import runs
from m2sa_jax.checkpoints.runs import RunCheckpoints, abstract_like
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.training import hooks, optim, setup
from m2sa_jax.training.step import make_train_step


# data.kind: the generated demo data, one MMR split, or the paper's four-group mixture
DATA_KINDS = ("synthetic", "mmr", "mixture")


def check_data_kind(cfg) -> str:
    if cfg.data.kind not in DATA_KINDS:
        raise ValueError(f"unknown data.kind {cfg.data.kind!r}; choose one of {DATA_KINDS}")
    return cfg.data.kind


def data_roots(cfg) -> tuple[str, str]:
    """The MMR split folder and its image root for a non-synthetic config
    (:func:`m2sa_jax.data.mixed.mmr_roots`): the held-out split is read from there, and so is
    the training split for ``data.kind = "mmr"`` and the mixture's MMR group. Without a root
    they stay as set (eval.py and the export build a model from a paper config without any
    training data)."""
    check_data_kind(cfg)
    return mixed.mmr_roots(cfg.data)


class Built(NamedTuple):
    """What a run starts from."""

    config: M2SAConfig
    params: dict
    tokenizer: LegacyLlamaTokenizer
    root: str                   # the MMR split folder (the held-out split is read from there)
    images: str                 # its image root
    tokenizer_folder: str
    source_config: dict         # config.json of the initial checkpoint ({} if none)


def build(cfg) -> Built:
    """Model config, initial parameters, tokenizer and data roots for a config."""
    if check_data_kind(cfg) == "synthetic":
        root, tok_dir = synthetic.prepare(cfg.data)
        images = os.path.join(root, "images")
    else:
        (root, images), tok_dir = data_roots(cfg), None
    if cfg.model.init == "random":
        if tok_dir is None:
            raise ValueError("model.init=random needs a tokenizer folder (data.kind=synthetic "
                             "builds one)")
        tokenizer = setup.load_tokenizer(tok_dir, cfg.data.model_max_length)
        config = setup.model_config_from_sizes(cfg, tokenizer.seg_token_id, len(tokenizer))
        params = setup.random_params(config, cfg.seed)
        source = {}
    else:
        config, params, tok_dir, source = setup.init_from_checkpoints(cfg, cfg.seed)
        tokenizer = setup.load_tokenizer(tok_dir, cfg.data.model_max_length)
    return Built(config, params, tokenizer, root, images, tok_dir, source)


def batch_shapes(cfg, conversations=None, images=None) -> BatchShapes:
    ipb = images or cfg.data.images_per_batch
    return BatchShapes(images=ipb, conversations=conversations or ipb * cfg.data.max_questions,
                       token_buckets=tuple(cfg.data.token_buckets),
                       max_targets=cfg.data.max_targets, mask_hw=tuple(cfg.data.mask_hw))


def init_state(cfg, config, params, mesh):
    lora_cfg = lora_lib.LoraConfig.from_dict(cfg.train.lora)
    variables = {"params": params}
    if lora_cfg is not None:
        variables["lora"] = lora_lib.init(jax.random.key(cfg.seed + 7), params, lora_cfg)
    patterns = tuple(cfg.train.trainable) + (("lora/.*",) if lora_cfg else ())
    labels = optim.label_tree(variables, patterns)
    optimizer, schedule = optim.make_optimizer(
        labels, lr=cfg.train.lr, warmup_steps=cfg.train.warmup_steps,
        total_steps=cfg.train.steps, b1=cfg.train.b1, b2=cfg.train.b2,
        weight_decay=cfg.train.weight_decay, clip_norm=cfg.train.clip_norm)
    var_sh = sharding.param_shardings(variables, mesh, cfg.mesh.rules)
    variables = sharding.put_global(jax.tree.map(lambda x: np.asarray(x, np.float32), variables),
                                    var_sh)
    opt_state = jax.jit(optimizer.init)(variables)
    rep = sharding.replicated(mesh)
    state = dict(step=jnp.zeros((), jnp.int32), variables=variables, opt_state=opt_state,
                 rng=jax.random.key_data(jax.random.key(cfg.seed)),
                 nonfinite=jnp.zeros((), jnp.int32))
    # One explicit layout for every leaf, used as the step's in- and out-shardings, so the
    # donated state comes back exactly as it went in (no retracing between steps).
    state_sh = dict(step=rep, variables=var_sh, rng=rep, nonfinite=rep,
                    opt_state=jax.tree.map(lambda x: _opt_sharding(x, mesh), opt_state))
    state = sharding.put_global(state, state_sh)
    return state, state_sh, optimizer, schedule, labels, lora_cfg


def _opt_sharding(leaf, mesh):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
        return sh
    return sharding.replicated(mesh)


def _train_stream(cfg, config, tokenizer, root, images, skips, *, shard_index=None,
                  shard_count=None):
    """The training batches: one MMR split (``root``/MMR_train.json) or, for
    ``data.kind = "mixture"``, the paper's mixture under ``data.root`` (its MMR group read from
    ``root`` and ``images``)."""
    shapes = batch_shapes(cfg)
    if check_data_kind(cfg) == "mixture":
        if not cfg.data.get("root"):
            raise ValueError("data.kind=mixture needs --config.data.root=DIR (one dataset root "
                             "laid out as docs/datasets.md says)")
        # One pass of distinct draws, each a pure function of (seed, draw): twice what the run
        # consumes, so that examples skipped for not fitting the batch shapes (and, on several
        # hosts, the split of draws between hosts) cannot exhaust it. The size costs nothing.
        hosts = shard_count if shard_count is not None else jax.process_count()
        draws = 2 * cfg.train.steps * cfg.train.grad_accum * shapes.images * hosts
        dataset = mixed.training_mixture(
            cfg.data.root, seed=cfg.seed, draws_per_epoch=max(draws, shapes.images * hosts),
            ratios=dict(cfg.data.ratios), sem_seg=tuple(cfg.data.sem_seg),
            refer_seg=tuple(cfg.data.refer_seg), vqa_data=cfg.data.vqa_data,
            mmr_root=root, mmr_format=cfg.data.mmr_format, mmr_image_root=images,
            allow_no_target=cfg.data.allow_no_target, max_questions=cfg.data.max_questions,
            released_pairing=cfg.data.released_pairing)
        epochs = 1
    elif cfg.data.kind == "synthetic":        # generated, valid by construction: read once
        dataset = MMRDataset(mmr_split_path(root, "train"), images,
                             max_questions=cfg.data.max_questions, prompt="train",
                             released_pairing=cfg.data.released_pairing, skips=skips)
    else:
        # read record by record in either format (data.mmr_format): the same samples in the
        # same order; a bad record is skipped and counted when it is drawn
        dataset = training_split(root, images, "train", fmt=cfg.data.mmr_format,
                                 max_questions=cfg.data.max_questions, prompt="train",
                                 released_pairing=cfg.data.released_pairing,
                                 allow_no_target=cfg.data.allow_no_target)
    if cfg.data.kind != "mixture":
        per_epoch = max(1, len(dataset) // shapes.images)
        epochs = max(1, math.ceil(cfg.train.steps * cfg.train.grad_accum / per_epoch) + 1)
    return TrainStream(dataset, tokenizer, StreamConfig(
        shapes=shapes, sam_size=config.sam.img_size, clip_size=config.llava.vision.image_size,
        max_length=cfg.data.model_max_length, read_threads=cfg.data.read_threads),
        seed=cfg.seed, epochs=epochs, skips=skips, shard_index=shard_index,
        shard_count=shard_count)


def _next_batch(stream, grad_accum):
    if grad_accum == 1:
        return next(stream)
    micro = [next(stream) for _ in range(grad_accum)]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def train(cfg, workdir: str, *, evaluator: Callable | None = None, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Trains (resuming if possible) for ``train.steps`` steps; with ``evaluator``, scores the
    model before (a fresh run, if ``eval.before_training``) and after. Returns a summary dict.
    Past ``train.max_minutes`` (when set) the run saves its state and raises
    :class:`~m2sa_jax.training.hooks.TimeLimitExceeded`: it never ends early with fewer steps.

    ``evaluator(label, model, params, built, overlay_dir, progress) -> dict`` is the end-of-run
    evaluation hook (train.py passes :func:`m2sa_jax.evaluation.teacher_forced.split_evaluator`).
    ``stop_after``: leave the loop after this many steps of *this* process (tests use it to
    emulate a killed run; the checkpoint is saved as on SIGTERM).
    """
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    mesh = sharding.mesh_from_config(cfg.mesh)
    built = build(cfg)
    model = M2SA(built.config)
    state, state_sh, optimizer, schedule, labels, lora_cfg = init_state(cfg, built.config,
                                                                        built.params, mesh)
    built = built._replace(params=None)
    if jax.process_index() == 0:     # the workdir describes its model: it loads on its own
        runs.describe_run(workdir, built.config, lora_cfg, built.tokenizer_folder,
                          experiment=cfg.to_dict(), source_config=built.source_config)
    counts = optim.count_by_label(state["variables"], labels)
    weights = dict(ce_weight=cfg.train.ce_weight, bce_weight=cfg.train.bce_weight,
                   dice_weight=cfg.train.dice_weight)
    step_fn = jax.jit(make_train_step(model, optimizer, labels, weights, lora_cfg,
                                      cfg.train.grad_accum),
                      in_shardings=(state_sh, None),
                      out_shardings=(state_sh, sharding.replicated(mesh)),
                      donate_argnums=(0,))

    skips = SkipCounter()
    stream = _train_stream(cfg, built.config, built.tokenizer, built.root, built.images, skips)
    ckpts = RunCheckpoints(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    start_step = 0
    if ckpts.latest_step() is not None:
        state, data_state = ckpts.restore(ckpts.latest_step(), abstract_like(state))
        stream.set_state(data_state)
        start_step = int(state["step"])
        print(f"resumed from {ckpts.directory} at step {start_step}")
    summary = dict(trainable_params=counts[optim.TRAINABLE], frozen_params=counts[optim.FROZEN],
                   start_step=start_step)
    print(f"model: {built.config.variant}, trainable {counts[optim.TRAINABLE]:,} / frozen "
          f"{counts[optim.FROZEN]:,} parameters; mesh {dict(mesh.shape)}")

    def evaluate(label, overlay_dir=None):
        params = merged_params(state, lora_cfg)
        return evaluator(label, model, params, built, overlay_dir, progress)

    if evaluator is not None and start_step == 0 and cfg.eval.before_training:
        summary["untrained"] = evaluate("untrained")

    writer = hooks.MetricsWriter(workdir, cfg.train.steps, start_step, cfg.train.log_every,
                                 schedule, progress)
    saver = hooks.Checkpointer(ckpts, cfg.train.checkpoint_every, start_step, stream)
    rules = hooks.StopRules(cfg, start_step, t_start, stop_after, ckpts, skips, stream)
    step, stopped = start_step, None
    try:
        while step < cfg.train.steps and stopped is None:
            batch = _next_batch(stream, cfg.train.grad_accum)
            # examples split over (data, fsdp): the data-parallel part of the mesh
            state, m = step_fn(state, sharding.put_host_batch(batch, mesh, cfg.train.grad_accum > 1))
            step += 1
            m = jax.device_get(m)
            writer.on_step(step, state, m, batch)
            stopped = rules.on_step(step, state)
            if stopped is None:
                saver.on_step(step, state)
    finally:
        writer.close()
        rules.close()
    saver.on_end(step, state)
    summary.update(steps=step, losses=writer.losses, stopped=stopped, skipped=dict(skips.counts),
                   skipped_by_source=skips.per_source(),
                   train_seconds=writer.seconds())
    if skips.total:
        print(skips.summary())
    if writer.nonfinite_steps:
        summary["nonfinite_steps"] = writer.nonfinite_steps
    if stopped in ("SIGTERM", "SIGINT", "stop_after"):
        return summary
    if evaluator is not None:
        summary["trained"] = evaluate("trained", os.path.join(workdir, "overlays"))
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "losses"}, f, indent=2)
    summary["total_seconds"] = time.perf_counter() - t_start
    return summary


def merged_params(state, lora_cfg):
    variables = state["variables"]
    if lora_cfg is None or "lora" not in variables:
        return variables["params"]
    return lora_lib.merge(variables["params"], variables["lora"], lora_cfg)

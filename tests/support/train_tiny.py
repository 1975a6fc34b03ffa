"""A tiny synthetic training run shared by the training tests: the synthetic config's CI
variant shrunk so that one compile and a step take seconds on 2 CPU cores.

``OVERRIDES`` are dotted config paths → values; :func:`flags` renders them for ``train.py``
and :func:`config` applies them in-process, so subprocess runs and in-process checks build the
same model on the same data.
"""

from __future__ import annotations

import os
import sys

from m2sa_jax import config_file
from tests.support import CONFIGS, REPO

OVERRIDES = {
    "data.train_images": 8,
    "data.val_images": 2,
    "data.images_per_batch": 2,
    "data.max_questions": 2,
    "data.max_targets": 2,
    "data.read_threads": 1,
    "train.steps": 8,
    "train.warmup_steps": 2,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 10,
    "train.log_every": 1,
    "train.max_minutes": 0.0,
    "eval.before_training": False,
    "model.sam.img_size": 128,
    "model.sam.encoder_depth": 2,
    "model.sam.global_attn_indexes": (1,),
    "model.sam.encoder_embed_dim": 32,
    "model.sam.encoder_num_heads": 2,
    "model.sam.window_size": 4,
    "model.sam.prompt_embed_dim": 32,
    "model.sam.decoder_mlp_dim": 64,
    "model.sam.decoder_num_heads": 2,
    "model.sam.iou_head_hidden_dim": 32,
    "model.llm.hidden_size": 32,
    "model.llm.intermediate_size": 64,
    "model.llm.num_attention_heads": 2,
    "model.llm.num_key_value_heads": 2,
    "model.clip.hidden_size": 32,
    "model.clip.intermediate_size": 64,
    "model.clip.num_attention_heads": 2,
}


def _render(value) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def flags(data_root: str, **extra) -> list[str]:
    """``--config.a.b=value`` flags for train.py (``extra`` keys use '__' for '.')."""
    items = {**OVERRIDES, "data.root": data_root,
             **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"--config.{k}={_render(v)}" for k, v in items.items()]


def config(data_root: str, **extra):
    """The same run's config, built in-process (``extra`` keys use '__' for '.')."""
    cfg = config_file.load(os.path.join(CONFIGS, "synthetic.py") + ":ci")
    items = {**OVERRIDES, "data.root": data_root,
             **{k.replace("__", "."): v for k, v in extra.items()}}
    for key, value in items.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def train_command(workdir: str, data_root: str, **extra) -> list[str]:
    return [sys.executable, os.path.join(REPO, "train.py"),
            "--config", os.path.join(CONFIGS, "synthetic.py") + ":ci",
            "--workdir", workdir, *flags(data_root, **extra)]


def env(cache_dir: str) -> dict:
    """Subprocess environment: one CPU thread pool, a shared persistent compilation cache so
    every run after the first loads the compiled step instead of compiling it again."""
    out = dict(os.environ)
    out.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return out

"""A trained run → a LISA/M²SA PyTorch folder, so a JAX-trained model goes back to PyTorch.

Restores a step of ``workdir/checkpoints`` (the latest unless ``--step``), merges the LoRA
factors into the LLM's kernels (``models.lora.merge``), and writes the released layout through
the M²SA exporter (``checkpoints_convert.m2sa.export_folder``: safetensors shards with an
index, config.json, tokenizer files with the added [SEG] / <im_start> / <im_end>). The run's
experiment config rebuilds the model config and the state's structure, as for eval.py:

    python -m m2sa_jax.training.export --config configs/synthetic.py --workdir outputs/synthetic \\
        --dst outputs/synthetic_hf [--config.a.b=value ...] [--step N] [--dtype bfloat16]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import jax

from checkpoints_convert.llava import TOKENIZER_FILES
from checkpoints_convert.m2sa import config_to_meta, export_folder
from m2sa_jax.dtypes import NAMES


def tokenizer_folder(cfg) -> str:
    """Where the run's tokenizer files are (the synthetic set's, or the initial checkpoint's)."""
    if cfg.data.kind == "synthetic":
        return os.path.join(cfg.data.root, "tokenizer")
    return cfg.model.checkpoint or cfg.model.llava_checkpoint


def hf_config(cfg, config) -> dict:
    """config.json of the exported folder: LLaMA fields of the trained model (the vocabulary
    grown by the added tokens) plus the LISA fields; kept from the initial checkpoint's
    config.json where the run started from one."""
    from m2sa_jax.params_io import load_meta

    source = {}
    start = cfg.model.checkpoint or cfg.model.llava_checkpoint
    if cfg.model.init != "random" and start:
        source = dict(load_meta(start).get("source_config") or {})
    text, vision = config.llava.text, config.llava.vision
    out = {**source, **text.to_hf()}
    out.update(architectures=["LISAForCausalLM"], mm_use_im_start_end=True,
               mm_vision_select_layer=config.llava.vision_feature_layer,
               mm_projector_type=config.llava.projector_type, out_dim=config.out_dim,
               vision_config=vision.to_hf())
    return out


def restore_merged(cfg, workdir: str, step: int | None = None):
    """(M2SAConfig, merged float32 params on the host, tokenizer, step) of a run's checkpoint."""
    from m2sa_jax.training import checkpoint as ckpt_lib
    from m2sa_jax import sharding
    from m2sa_jax.training import loop

    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpts = ckpt_lib.RunCheckpoints(ckpt_dir, async_save=False) if os.path.isdir(ckpt_dir) else None
    step = step if step is not None else (ckpts.latest_step() if ckpts else None)
    if step is None or step not in ckpts.manager.all_steps():
        raise FileNotFoundError(
            f"{os.path.abspath(ckpt_dir)}: no saved step"
            f"{'' if step is None else f' {step}'} to export. Train first (python train.py "
            f"--config ... --workdir {workdir}) or pick one of the saved steps with --step.")
    config, params, tokenizer, _, _ = loop.build(cfg)
    mesh = sharding.mesh_from_config(cfg.mesh)
    state, _, _, _, _, lora_cfg = loop.init_state(cfg, config, params, mesh)
    del params
    restored, _ = ckpts.restore(step, ckpt_lib.abstract_like(state))
    ckpts.close()
    merged = jax.device_get(loop.merged_params(restored, lora_cfg))
    return config, merged, tokenizer, step


def export_run(cfg, workdir: str, dst: str, *, step: int | None = None,
               dtype: str | None = None) -> str:
    """Writes the LISA/M²SA folder ``dst`` from the run in ``workdir`` (module doc)."""
    from m2sa_jax.params_io import save_params

    config, params, tokenizer, step = restore_merged(cfg, workdir, step)
    with tempfile.TemporaryDirectory(prefix="m2sa_export_") as converted:
        save_params(converted, params, config_to_meta(config, hf_config(cfg, config), dtype))
        tok_dir = tokenizer_folder(cfg)
        for name in TOKENIZER_FILES:
            p = os.path.join(tok_dir, name)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(converted, name))
        # the ids the model was trained with, whatever the source folder listed
        with open(os.path.join(converted, "added_tokens.json"), "w") as f:
            json.dump(dict(sorted(tokenizer.added_vocab.items(), key=lambda kv: kv[1])), f,
                      indent=2)
        export_folder(converted, dst, dtype=dtype)
    print(f"exported {os.path.abspath(workdir)} step {step} (LoRA, if any, merged) → {os.path.abspath(dst)}")
    return dst


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    from m2sa_jax.config_file import flags_parser

    config_flag = config_flags.DEFINE_config_file("config", None, "the run's experiment config")
    workdir = flags.DEFINE_string("workdir", None, "the run's directory (holds checkpoints/)")
    dst = flags.DEFINE_string("dst", None, "output folder (LISA/M²SA Hugging Face layout)")
    step = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    dtype = flags.DEFINE_enum("dtype", None, list(NAMES),
                              "dtype of the written weights (default float32)")
    flags.mark_flags_as_required(["config", "workdir", "dst"])

    def run(argv):
        del argv
        export_run(config_flag.value, workdir.value, dst.value, step=step.value,
                   dtype=dtype.value)
        return 0

    app.run(run, argv=argv, flags_parser=flags_parser(program=__name__))
    return 0


if __name__ == "__main__":
    sys.exit(main())

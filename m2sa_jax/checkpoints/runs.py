"""A training run's directory: orbax checkpoints of the state plus a description of the model.

``workdir/checkpoints/<step>/`` holds the state (parameters, LoRA, optimizer, step, RNG) and the
data iterator's position, saved asynchronously every N steps and on SIGTERM, the last k kept.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save (even with SIGKILL) leaves the previous checkpoint intact; restoring picks the latest
complete step.

``workdir/model.json`` (the architecture, the LoRA settings, the run's experiment config) and
``workdir/tokenizer/`` (the run's tokenizer files) are written when the run starts, so that a
workdir alone is a model: :func:`restore_model` rebuilds it (latest or a chosen step, LoRA merged)
without the experiment config file.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.models import lora as lora_lib
from m2sa_jax.models.m2sa import M2SAConfig

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1


class RunCheckpoints:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: bytes, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"loader": data_state.decode("utf-8")})), force=force)

    def restore(self, step: int, abstract_state):
        """(state laid out like ``abstract_state`` — shardings included, data_state bytes)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]["loader"].encode("utf-8")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a live tree, for a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)), tree)


# --- the run's description --------------------------------------------------------------------

def describe_run(workdir: str, config: M2SAConfig, lora: lora_lib.LoraConfig | None,
                 tokenizer_folder: str, experiment: dict | None = None,
                 source_config: dict | None = None) -> None:
    """Writes ``model.json``, ``tokenizer/`` and ``config.json`` into ``workdir`` (each replaced
    atomically, so a run killed while starting never leaves a half-written description).
    ``source_config``: the config.json of the checkpoint the run started from, if any (an
    export keeps its fields)."""
    os.makedirs(workdir, exist_ok=True)
    tok_tmp = os.path.join(workdir, f".{TOKENIZER_DIR}.tmp")
    shutil.rmtree(tok_tmp, ignore_errors=True)
    os.makedirs(tok_tmp)
    for name in os.listdir(tokenizer_folder):
        if name.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
            shutil.copy2(os.path.join(tokenizer_folder, name), tok_tmp)
    tok_dir = os.path.join(workdir, TOKENIZER_DIR)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tok_tmp, tok_dir)
    model = dict(format=FORMAT, model=config.to_meta(),
                 lora=None if lora is None else lora.to_dict(),
                 tokenizer=TOKENIZER_DIR, source_config=source_config or {},
                 written_by=f"m2sa-jax {importlib.metadata.version('m2sa-jax')}")
    _write_json(os.path.join(workdir, MODEL_FILE), model)
    if experiment is not None:
        _write_json(os.path.join(workdir, CONFIG_FILE), experiment)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)) or \
        os.path.isfile(os.path.join(path, MODEL_FILE))


def read_description(workdir: str) -> dict:
    p = os.path.join(workdir, MODEL_FILE)
    if not os.path.isfile(p):
        raise FileNotFoundError(
            f"{os.path.abspath(workdir)}: a training workdir without {MODEL_FILE} (the model "
            f"description train.py writes when a run starts; runs started by older versions "
            f"lack it). Fix: run the same train.py command once more — it resumes the finished "
            f"run, writes the description and re-evaluates — or evaluate it with eval.py "
            f"--config <its experiment config>.")
    with open(p) as f:
        desc = json.load(f)
    if desc.get("format") != FORMAT:
        raise ValueError(f"{p}: format {desc.get('format')!r}, this version reads {FORMAT}")
    return desc


def _manager(workdir: str):
    """(read-only manager, finished steps) of a workdir's checkpoints."""
    ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        return None, []
    mgr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                                item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                               "data": ocp.JsonCheckpointHandler()})
    return mgr, sorted(mgr.all_steps())


def finished_step(workdir: str, step: int | None = None) -> int:
    """The latest finished step (or checks that ``step`` is one); a clear error if none."""
    mgr, steps = _manager(workdir)
    if mgr is not None:
        mgr.close()
    ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
    if not steps:
        raise FileNotFoundError(
            f"{ckpt_dir}: no finished checkpoint yet (a step appears there when the run saves: "
            f"every train.checkpoint_every steps, on SIGTERM and at the end). Wait for the "
            f"first save, or train first: python train.py --config ... --workdir {workdir}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{ckpt_dir}: no finished step {step}; saved steps: {steps}")
    return steps[-1] if step is None else step


def restore_variables(workdir: str, step: int | None = None) -> tuple[dict, int]:
    """(``{"params", "lora"?}`` as float32 host arrays, step) of a finished checkpoint, read
    without the optimizer state."""
    step = finished_step(workdir, step)
    mgr, _ = _manager(workdir)
    tree = mgr.item_metadata(step)["state"]
    variables = getattr(tree, "tree", tree)["variables"]
    item = {"variables": jax.tree.map(lambda m: np.zeros((), np.float32), variables)}
    args = {"variables": jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32), variables)}
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True)))
    mgr.close()
    return out["state"]["variables"], step


def restore_model(workdir: str, step: int | None = None):
    """(M2SAConfig, merged float32 params, tokenizer, step) of a training workdir."""
    step = finished_step(workdir, step)
    desc = read_description(workdir)
    config = M2SAConfig.from_meta(desc["model"])
    variables, step = restore_variables(workdir, step)
    params = variables["params"]
    if desc.get("lora") and "lora" in variables:
        lora = lora_lib.LoraConfig.from_dict(desc["lora"])
        params = jax.device_get(lora_lib.merge(params, variables["lora"], lora))
    tokenizer = LegacyLlamaTokenizer.from_pretrained(
        os.path.join(workdir, desc.get("tokenizer", TOKENIZER_DIR)), add_model_tokens=False)
    return config, jax.tree.map(np.asarray, params), tokenizer, step


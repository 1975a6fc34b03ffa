"""Saving and loading converted parameter trees (orbax) with a small JSON of metadata.

A converted model directory holds ``params/`` (an orbax PyTree checkpoint) and
``m2sa_meta.json`` (what model and config the parameters belong to). Loading is strict: the
caller may pass the expected abstract tree, and any missing or unexpected name fails with the
list of them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

META_FILE = "m2sa_meta.json"
PARAMS_DIR = "params"


def save_params(directory: str, params: Mapping, meta: Mapping[str, Any]) -> str:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, PARAMS_DIR)
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(target, jax.tree.map(np.asarray, dict(params)), force=True)
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(dict(meta), f, indent=2, sort_keys=True)
    return directory


def load_meta(directory: str) -> dict:
    p = os.path.join(directory, META_FILE)
    if not os.path.isfile(p):
        raise FileNotFoundError(
            f"{directory}: not a converted m2sa-jax model directory ({META_FILE} is missing). "
            f"Convert a PyTorch checkpoint first, e.g. "
            f"`python -m checkpoints_convert sam --src sam_vit_h_4b8939.pth --dst {directory}`.")
    with open(p) as f:
        return json.load(f)


def load_params(directory: str, expected: Mapping | None = None) -> dict:
    """Restores the parameter tree; with ``expected`` (abstract tree), checks names and shapes."""
    import orbax.checkpoint as ocp

    from m2sa_jax.tree import flatten

    directory = os.path.abspath(directory)
    target = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"{directory}: no {PARAMS_DIR}/ folder with parameters")
    params = ocp.PyTreeCheckpointer().restore(target)
    if expected is not None:
        got, want = flatten(params), flatten(expected)
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        bad = sorted(p for p in set(got) & set(want)
                     if tuple(np.shape(got[p])) != tuple(want[p].shape))
        if missing or unexpected or bad:
            raise ValueError(
                f"{directory}: parameters do not match the model.\n"
                f"  missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
                f"  unexpected: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}\n"
                f"  wrong shape: {[(p, np.shape(got[p]), want[p].shape) for p in bad[:20]]}")
    return params

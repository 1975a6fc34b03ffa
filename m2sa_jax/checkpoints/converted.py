"""Converted model directories: parameters (orbax) plus a small JSON of metadata.

A converted directory holds ``params/`` (an orbax PyTree checkpoint), ``m2sa_meta.json`` (what
model and config the parameters belong to, and where they came from) and, for language models,
the tokenizer files. Loading is strict: the caller may pass the expected abstract tree, and any
missing or unexpected name fails with the list of them.

Directories are written atomically (:func:`atomic_directory`): everything goes into a hidden
sibling folder that is renamed into place at the end, so a conversion interrupted half-way
(even by SIGKILL) never leaves a directory that looks complete under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from m2sa_jax.tree import flatten, unflatten

META_FILE = "m2sa_meta.json"
PARAMS_DIR = "params"


class OutputExistsError(FileExistsError):
    """The output directory exists and is not empty, and overwriting was not asked for."""


def is_converted(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, META_FILE)) and \
        os.path.isdir(os.path.join(directory, PARAMS_DIR))


@contextlib.contextmanager
def atomic_directory(dst: str, *, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[str]:
    """Yields a temporary sibling of ``dst`` to write into; renames it to ``dst`` on success.

    ``dst`` must be absent or empty unless ``overwrite`` (its old contents are then replaced
    only once the new directory is complete). On an exception the temporary folder is removed.
    """
    dst = os.path.abspath(dst)
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise OutputExistsError(
            f"{dst}: exists and is not empty; choose an empty or new folder, or pass {flag} to "
            f"replace its contents")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise OutputExistsError(f"{dst}: exists and is not a directory")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def write_meta(directory: str, meta: Mapping[str, Any]) -> None:
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(dict(meta), f, indent=2, sort_keys=True)


def save_params(directory: str, params: Mapping, meta: Mapping[str, Any]) -> str:
    """Writes ``params/`` and then ``m2sa_meta.json`` (last: its presence marks completion)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, PARAMS_DIR)
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(target, jax.tree.map(np.asarray, dict(params)), force=True)
    write_meta(directory, meta)
    return directory


def save_streaming(dst: str, params, meta) -> None:
    """Writes the same orbax checkpoint as :func:`save_params`, one array at a time.

    orbax's default numpy handler deep-copies every host array and writes them all
    concurrently, so saving needs about twice the tree in anonymous memory (52 GB for 13B in
    bfloat16). Here the arrays (memory-mapped files) are neither copied nor written
    concurrently: resident memory stays near one array.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    class _SequentialNumpyHandler(th.NumpyHandler):
        async def _background_serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            for value, info, arg in zip(values, infos, args):
                await super()._background_serialize([value], [info], [arg])

    registry = th.create_type_handler_registry(
        (np.ndarray, _SequentialNumpyHandler(deepcopy_host_arrays=False)),
        (np.number, th.ScalarHandler()), (int, th.ScalarHandler()),
        (float, th.ScalarHandler()), (jax.Array, th.ArrayHandler()))
    dst = os.path.abspath(dst)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    checkpointer.save(os.path.join(dst, PARAMS_DIR), params, force=True)
    write_meta(dst, meta)


class MemmapAllocator:
    """Output leaves as memory-mapped files, so a converted tree need not fit in RAM."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def __call__(self, path: str, shape, dtype):
        # raw files (no .npy header): the .npy format cannot describe bfloat16
        fname = os.path.join(self.folder, path.replace("/", "__") + ".raw")
        return np.memmap(fname, mode="w+", dtype=dtype, shape=tuple(shape))


def reopen_readonly(tree):
    """Flushes and drops the writable mappings (their pages leave the process) and maps the
    files again read-only; pages are then only resident while they are streamed out."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = reopen_readonly(v)
        elif isinstance(v, np.memmap) and v.filename:
            v.flush()
            fname, dtype, shape = v.filename, v.dtype, v.shape
            del v
            out[k] = np.memmap(fname, mode="r", dtype=dtype, shape=shape)
        else:
            out[k] = v
    return out


def load_meta(directory: str) -> dict:
    p = os.path.join(directory, META_FILE)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{directory}: not a converted m2sa-jax directory ({META_FILE} "
                                f"is missing)")
    with open(p) as f:
        return json.load(f)


def check_tree(got: Mapping, want: Mapping, name: str) -> None:
    """Strict merge check: same names, same shapes; fails with the lists of differences."""
    got, want = flatten(got), flatten(want)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    bad = sorted(p for p in set(got) & set(want)
                 if tuple(np.shape(got[p])) != tuple(want[p].shape))
    if missing or unexpected or bad:
        raise ValueError(
            f"{name}: parameters do not match the model.\n"
            f"  missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}\n"
            f"  wrong shape: {[(p, np.shape(got[p]), want[p].shape) for p in bad[:20]]}")


def load_params(directory: str, expected: Mapping | None = None, *, dtypes=None) -> dict:
    """Restores the parameter tree as host arrays; with ``expected`` (abstract tree), checks
    names and shapes. ``dtypes``: optional ``path → dtype`` function; each leaf is restored
    directly in that dtype (e.g. bfloat16 for the language model), never as a float32 copy."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    target = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"{directory}: no {PARAMS_DIR}/ folder with parameters")
    ckptr = ocp.PyTreeCheckpointer()
    if dtypes is None:
        params = ckptr.restore(target)
    else:
        meta = ckptr.metadata(target)
        meta = getattr(meta, "item_metadata", meta)        # StepMetadata → the tree's
        tree = getattr(meta, "tree", meta)
        flat = flatten(tree)

        restore_args = unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray,
                                                     dtype=dtypes(p) or m.dtype)
                                  for p, m in flat.items()})
        params = ckptr.restore(target, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    if expected is not None:
        check_tree(params, expected, directory)
    return params

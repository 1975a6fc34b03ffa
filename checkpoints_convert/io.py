"""Reading PyTorch checkpoints safely, one tensor file at a time.

Pickle-based files (``.pth``, ``.bin``, ``.pt``) are opened only with
``torch.load(weights_only=True)``: a file that needs full unpickling is refused with an error
that says so, and its code never runs. ``.safetensors`` files need no pickle at all.

Folders with ``*.index.json`` are read shard by shard so peak memory stays near one shard.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Iterator

import numpy as np

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class UnsafeCheckpointError(RuntimeError):
    """A pickle checkpoint holds objects other than tensors; it was not unpickled."""


def to_numpy(t) -> np.ndarray:
    """torch tensor → numpy, keeping bfloat16 as ml_dtypes.bfloat16 (no float32 detour)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def _load_pickle(path: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if isinstance(e, RuntimeError) and "Weights only load failed" not in str(e) \
                and "weights_only" not in str(e):
            raise RuntimeError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
        raise UnsafeCheckpointError(
            f"{path}: refused to load. The file contains pickled objects other than tensors, "
            f"and unpickling them could run arbitrary code, so it was opened with "
            f"torch.load(weights_only=True) and rejected. Fix: re-save the state dict from a "
            f"trusted environment as .safetensors (safetensors.torch.save_file) or as a plain "
            f"dict of tensors. Detail: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise RuntimeError(f"{path}: expected a state dict (name → tensor), got {type(obj).__name__}")
    return obj


def iter_file(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(key, numpy array)`` from one .safetensors or pickle checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield key, to_numpy(f.get_tensor(key))
        return
    if path.endswith(PICKLE_SUFFIXES):
        state = _load_pickle(path)
        for key in list(state.keys()):
            yield key, to_numpy(state.pop(key))
        del state
        return
    raise ValueError(f"{path}: unknown checkpoint format (expected .safetensors, .pth, .bin, .pt)")


def checkpoint_files(folder: str) -> list[str]:
    """The tensor files of a Hugging Face folder, in index order (or the single file)."""
    for index in INDEX_FILES:
        p = os.path.join(folder, index)
        if os.path.isfile(p):
            with open(p) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise FileNotFoundError(f"{p} names shards that are not in {folder}: {missing}")
            return [os.path.join(folder, f) for f in files]
    for single in SINGLE_FILES:
        p = os.path.join(folder, single)
        if os.path.isfile(p):
            return [p]
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for {', '.join(INDEX_FILES + SINGLE_FILES)})")


def iter_checkpoint(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Streams tensors from a file or a Hugging Face folder, shard by shard."""
    files = checkpoint_files(path) if os.path.isdir(path) else [path]
    for f in files:
        yield from iter_file(f)

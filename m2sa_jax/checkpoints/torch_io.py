"""Reading PyTorch checkpoints safely, one tensor file at a time.

Pickle-based files (``.pth``, ``.bin``, ``.pt``) are opened only with
``torch.load(weights_only=True)``: a file that needs full unpickling is refused with an error
that says so, and its code never runs. ``.safetensors`` files need no pickle at all.

Folders with ``*.index.json`` are read shard by shard so peak memory stays near one shard.
A truncated or corrupt file, or an index that names a shard that is not there, fails with an
error that names the file and says what to do.
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


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read: truncated, corrupt, or not a checkpoint at all."""


def _corrupt(path: str, what: str, detail: str) -> CorruptCheckpointError:
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return CorruptCheckpointError(
        f"{path}: {what} ({size:,} bytes; {detail}). The file is probably truncated (an "
        f"interrupted download or copy) or corrupt. Fix: download or copy it again and compare "
        f"its size and sha256 with the release's.")


def to_numpy(t) -> np.ndarray:
    """torch tensor → numpy, keeping bfloat16 as ml_dtypes.bfloat16 (no float32 detour)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def load_pickle(path: str) -> dict:
    """A pickle checkpoint's state dict, through ``torch.load(weights_only=True)`` only."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError,
            ValueError) as e:
        text = str(e)
        unsafe = ("Weights only load failed" in text
                  or isinstance(e, (AttributeError, TypeError))
                  or isinstance(e, pickle.UnpicklingError) and "truncated" not in text)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused to load. The file contains pickled objects other than "
                f"tensors, and unpickling them could run arbitrary code, so it was opened with "
                f"torch.load(weights_only=True) and rejected. Fix: re-save the state dict from "
                f"a trusted environment as .safetensors (safetensors.torch.save_file) or as a "
                f"plain dict of tensors. Detail: {text.splitlines()[0] if text else type(e).__name__}"
            ) from None
        raise _corrupt(path, "cannot be read as a PyTorch checkpoint",
                       text.splitlines()[0] if text else type(e).__name__) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(
            f"{path}: expected a state dict (name → tensor), got {type(obj).__name__}")
    return obj


def safetensors_keys_and_shapes(path: str) -> dict[str, tuple]:
    """``{key: shape}`` from a safetensors header, without reading any tensor."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (not exported stably)
        if isinstance(e, OSError) and not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file") from None
        raise _corrupt(path, "has no valid safetensors header", str(e).splitlines()[0]) from None


def iter_file(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(key, numpy array)`` from one .safetensors or pickle checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        safetensors_keys_and_shapes(path)           # a corrupt header fails here, named
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, to_numpy(f.get_tensor(key))
        except (OSError, RuntimeError, ValueError) as e:
            raise _corrupt(path, "could not be read to the end", str(e).splitlines()[0]) from None
        return
    if path.endswith(PICKLE_SUFFIXES):
        state = load_pickle(path)
        try:
            for key in list(state.keys()):
                yield key, to_numpy(state.pop(key))
        except RuntimeError as e:       # a memory-mapped tensor past the end of a cut file
            raise _corrupt(path, "could not be read to the end", str(e).splitlines()[0]) from None
        del state
        return
    raise ValueError(f"{path}: unknown checkpoint format (expected .safetensors, .pth, .bin, .pt)")


def read_index(folder: str) -> tuple[str, dict] | None:
    """``(index path, weight_map)`` of a sharded folder, or None when it has no index."""
    for index in INDEX_FILES:
        p = os.path.join(folder, index)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(
                    f"{p}: not a valid Hugging Face weight index ({e}); it must be JSON with a "
                    f"'weight_map' of tensor name → shard file. Download it again.") from None
            return p, weight_map
    return None


def checkpoint_files(folder: str) -> list[str]:
    """The tensor files of a Hugging Face folder, in index order (or the single file)."""
    found = read_index(folder)
    if found is not None:
        index, weight_map = found
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(
                f"{index} names {len(missing)} shard(s) that are not in {folder}: {missing}. "
                f"Fix: download or copy the missing shard(s) next to the index (a partial "
                f"download leaves the index but not every shard).")
        return [os.path.join(folder, f) for f in files]
    for single in SINGLE_FILES:
        p = os.path.join(folder, single)
        if os.path.isfile(p):
            return [p]
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for {', '.join(INDEX_FILES + SINGLE_FILES)})")


def checkpoint_keys(folder: str) -> list[str]:
    """Tensor names of a folder without loading tensors (index, safetensors header, or mmap)."""
    found = read_index(folder)
    if found is not None:
        checkpoint_files(folder)                     # every shard named must be there
        return list(found[1])
    (path,) = checkpoint_files(folder)
    if path.endswith(".safetensors"):
        return list(safetensors_keys_and_shapes(path))
    return list(load_pickle(path).keys())


def iter_checkpoint(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Streams tensors from a file or a Hugging Face folder, shard by shard."""
    files = checkpoint_files(path) if os.path.isdir(path) else [path]
    for f in files:
        yield from iter_file(f)


def checkpoint_shapes(folder: str, prefixes: tuple[str, ...] = ("",)) -> dict[str, tuple]:
    """``{key: shape}`` of a folder's tensors under any of ``prefixes``, read from safetensors
    headers or memory-mapped pickles (weights_only) without loading tensors."""
    out = {}
    for f in checkpoint_files(folder):
        if f.endswith(".safetensors"):
            shapes = safetensors_keys_and_shapes(f)
        else:
            shapes = {k: tuple(v.shape) for k, v in load_pickle(f).items()}
        out.update({k: s for k, s in shapes.items() if k.startswith(prefixes)})
    return out


def shape_stand_ins(shapes: dict[str, tuple]) -> dict:
    """``{key: zero-memory array of that shape}``, for code that reads ``.shape`` only."""
    return {k: np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), s, (0,) * len(s))
            for k, s in shapes.items()}

"""The floating-point dtypes by name, in their numpy (ml_dtypes) and jax forms, in one table."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

NAMES = ("float32", "bfloat16", "float16")
_NUMPY = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_JAX = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check(name: str) -> str:
    if name not in _NUMPY:
        raise ValueError(f"unknown dtype {name!r}: expected one of {NAMES}")
    return name


def numpy_dtype(name: str | None):
    """``"bfloat16"`` → ``np.dtype(ml_dtypes.bfloat16)``; None stays None (keep as stored)."""
    return None if name is None else _NUMPY[_check(name)]


def jax_dtype(name: str | None, default=jnp.float32):
    """``"bfloat16"`` → ``jnp.bfloat16``; None gives ``default``."""
    return default if name is None else _JAX[_check(name)]


def name_of(dtype) -> str:
    """The table's name of a numpy/jax dtype (``jnp.bfloat16`` → ``"bfloat16"``)."""
    return np.dtype(dtype).name

"""Floating-point dtypes by the names configs and command lines use.

One table gives each name its JAX compute dtype (what a Flax module's ``dtype=`` takes) and its
NumPy storage dtype (what converted weights are written as; bfloat16 is ml_dtypes', since NumPy
has none).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

# name → (JAX compute dtype, NumPy storage dtype)
_TABLE = {
    "float32": (jnp.float32, np.dtype(np.float32)),
    "bfloat16": (jnp.bfloat16, np.dtype(ml_dtypes.bfloat16)),
    "float16": (jnp.float16, np.dtype(np.float16)),
}
NAMES = tuple(_TABLE)


def _entry(name: str):
    if name not in _TABLE:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(NAMES)}")
    return _TABLE[name]


def compute_dtype(name: str | None):
    """The JAX dtype a model computes in; ``None`` means float32."""
    return _entry(name or "float32")[0]


def storage_dtype(name: str | None) -> np.dtype | None:
    """The NumPy dtype weights are stored as; ``None`` keeps each array's own dtype."""
    return None if name is None else _entry(name)[1]

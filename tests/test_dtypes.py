"""The dtype table: one name gives the JAX compute dtype and the NumPy storage dtype."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from m2sa_jax import dtypes


def test_compute_and_storage_dtypes_of_each_name():
    assert dtypes.compute_dtype(None) is jnp.float32
    assert dtypes.compute_dtype("bfloat16") is jnp.bfloat16
    assert dtypes.storage_dtype(None) is None
    assert dtypes.storage_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    for name in dtypes.NAMES:
        assert np.dtype(dtypes.compute_dtype(name)) == dtypes.storage_dtype(name) == np.dtype(name)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        dtypes.compute_dtype("fp8")

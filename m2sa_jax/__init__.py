"""m2sa-jax: M²SA (multi-target, multi-granularity reasoning segmentation) in JAX/Flax."""

__version__ = "0.1.0"


def load(path: str, **kwargs):
    """A LISA/M²SA predictor from a converted directory (see :mod:`m2sa_jax.pipeline`)."""
    # Imported on use: every ``import m2sa_jax.<module>`` runs this file first, and the
    # predictor pulls in every model.
    from m2sa_jax.pipeline import load as _load

    return _load(path, **kwargs)

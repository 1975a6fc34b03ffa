"""m2sa-jax: M²SA (multi-target, multi-granularity reasoning segmentation) in JAX/Flax."""

__version__ = "0.1.0"


def load(source: str, **kwargs):
    """A LISA/M²SA predictor from any model source: a converted directory, a LISA/M²SA PyTorch
    folder, a training workdir or a Hugging Face id in the local cache (see
    :func:`m2sa_jax.inference.predictor.load` for the options)."""
    # Imported on use: every ``import m2sa_jax.<module>`` runs this file first, and the
    # predictor pulls in every model.
    from m2sa_jax.inference.predictor import load as _load

    return _load(source, **kwargs)

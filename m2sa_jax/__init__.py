"""m2sa-jax: M²SA (multi-target, multi-granularity reasoning segmentation) in JAX/Flax."""

__version__ = "0.1.0"

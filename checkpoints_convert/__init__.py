"""PyTorch → JAX checkpoint conversion (and back), one mapping table per model."""

"""TFDS builder for the MMR dataset (array_record files, readable without TensorFlow)."""

from m2sa_jax.data.tfds_mmr.mmr import SPLIT_FILES, Mmr, data_source, decode_example

__all__ = ["Mmr", "SPLIT_FILES", "data_source", "decode_example"]

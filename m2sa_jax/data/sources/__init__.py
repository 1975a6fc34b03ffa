"""Training sources besides MMR, read from their upstream on-disk layouts (docs/datasets.md).

Every source is a random-access collection of images with ``len(source)`` and
``source.sample(index, rng) -> Sample``; the random generator picks classes, sentences and
templates so a sample is a pure function of (index, rng state).
"""

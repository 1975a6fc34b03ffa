"""Inference for users and services (layer 2: imports models, data and checkpoints only).

* :mod:`.predictor` — ``M2SAPredictor`` and ``load``: generate-then-segment and teacher forcing
  for any model source (``m2sa_jax.load``).
* :mod:`.decode` — the jitted greedy / nucleus decoder (static KV cache, prompt buckets).
* :mod:`.sam_predictor` — segment_anything's ``SamPredictor`` for SAM alone.
* :mod:`.overlay` — masks tinted on the image with a legend.
* :mod:`.engine`, :mod:`.batching`, :mod:`.api`, :mod:`.page`, :mod:`.formats`, :mod:`.server`
  — the web server: fixed-shape batched segmentation, the request queue, the HTTP API, the page.
"""

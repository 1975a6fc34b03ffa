"""Inference for users and services: the fixed-shape batched segmenter and the web server."""

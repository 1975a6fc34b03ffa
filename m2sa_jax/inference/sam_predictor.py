"""Prompted segmentation of one image with SAM, the interface of segment_anything's SamPredictor.

``set_image`` runs the image encoder once (jitted); ``predict`` takes points / a box / a
low-res mask (and, for M²SA-style prompting, extra sparse ``text_embeds``) in original image
pixel coordinates and returns masks at the original size. Coordinates are rescaled exactly
like ``ResizeLongestSide.apply_coords`` / ``apply_boxes``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax.data.preprocess import resize_longest_side_shape, sam_preprocess
from m2sa_jax.dtypes import compute_dtype
from m2sa_jax.models.sam import Sam, SamConfig, abstract_params, postprocess_masks, sam_config
from m2sa_jax.checkpoints.converted import load_meta, load_params


class SamPredictor:
    """Holds parameters and the current image's embedding."""

    mask_threshold = 0.0

    def __init__(self, params, config: SamConfig, dtype: Optional[str] = None):
        self.config = config
        self.model = Sam(config, compute_dtype(dtype))
        self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
        self._encode = jax.jit(
            lambda p, x: self.model.apply({"params": p}, x, method=Sam.encode_image))
        self._decode = jax.jit(self._decode_fn, static_argnames=("multimask_output",))
        self._postprocess = jax.jit(postprocess_masks, static_argnums=(1, 2, 3))
        self.reset_image()

    @classmethod
    def from_pretrained(cls, directory: str, dtype: Optional[str] = None) -> "SamPredictor":
        """Loads a directory written by ``python -m checkpoints_convert sam``."""
        meta = load_meta(directory)
        if meta.get("model") != "sam":
            raise ValueError(f"{directory}: holds a {meta.get('model')!r} model, not SAM; convert "
                             f"a SAM checkpoint with `python -m checkpoints_convert sam`")
        if "config" in meta:
            config = SamConfig.from_dict(meta["config"])
        else:
            config = sam_config(meta["model_type"], use_compress_vit=meta.get("use_compress_vit", False))
        params = load_params(directory, expected=abstract_params(config))
        return cls(params, config, dtype)

    def reset_image(self) -> None:
        self.features = None
        self.original_size = None
        self.input_size = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def set_image(self, image: np.ndarray) -> None:
        """image: RGB uint8 [H, W, 3]. Computes and keeps the image embedding."""
        x, self.input_size, self.original_size = sam_preprocess(image, self.config.img_size)
        self.input_size, self.original_size = tuple(self.input_size), tuple(self.original_size)
        self.features = self._encode(self.params, jnp.asarray(x)[None])

    def get_image_embedding(self):
        """[1, 64, 64, 256] (channels last)."""
        self._require_image()
        return self.features["image_embeddings"]

    def _require_image(self):
        if not self.is_image_set:
            raise RuntimeError("no image set: call set_image(image) before predict()")

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Original-image (x, y) → model-input pixel coordinates (ResizeLongestSide)."""
        old_h, old_w = self.original_size
        new_h, new_w = resize_longest_side_shape(old_h, old_w, self.config.img_size)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2)).reshape(-1, 4)

    def _decode_fn(self, params, features, points, boxes, masks, text_embeds, multimask_output):
        early = features["early_features"] if self.config.use_compress_vit else None
        return self.model.apply({"params": params}, features["image_embeddings"], points, boxes,
                                masks, text_embeds, multimask_output, early,
                                method=Sam.decode)

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output: bool = True, return_logits: bool = False, text_embeds=None):
        """Masks for the current image.

        Args:
          point_coords: [N, 2] (x, y) in original pixels; point_labels: [N] (1 fg, 0 bg).
          box: [4] (x0, y0, x1, y1) in original pixels. mask_input: [1, 256, 256] logits
            from a previous call. text_embeds: [k, 256] extra sparse prompt embeddings.
          multimask_output: three masks instead of one.
          return_logits: float logits instead of booleans.

        Returns:
          masks [C, H, W], iou_predictions [C], low_res_logits [C, 256, 256] (numpy).
        """
        self._require_image()
        points = boxes = masks = embeds = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = self.apply_coords(point_coords).astype(np.float32)
            points = (jnp.asarray(coords)[None], jnp.asarray(np.asarray(point_labels, np.int32))[None])
        if box is not None:
            boxes = jnp.asarray(self.apply_boxes(box).astype(np.float32))  # [1, 4]
        if mask_input is not None:
            masks = jnp.asarray(np.asarray(mask_input, np.float32))[..., None]  # [1, 256, 256, 1]
        if text_embeds is not None:
            embeds = jnp.asarray(np.asarray(text_embeds, np.float32))[None]
        out = self._decode(self.params, self.features, points, boxes, masks, embeds,
                           multimask_output=multimask_output)
        low_res = out["low_res_masks"]  # [1, C, 256, 256]
        full = self._postprocess(low_res, self.input_size, self.original_size,
                                 self.config.img_size)[0]
        masks_out = np.asarray(full) if return_logits else np.asarray(full > self.mask_threshold)
        return masks_out, np.asarray(out["iou_predictions"][0]), np.asarray(low_res[0])

"""The assembled SAM (image encoder, prompt encoder, mask decoder under one parameter tree),
its parameter shapes and a random initialisation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax.models.sam.common import Dtype
from m2sa_jax.models.sam.config import SamConfig
from m2sa_jax.models.sam.image_encoder import ImageEncoderViT
from m2sa_jax.models.sam.mask_decoder import MaskDecoder
from m2sa_jax.models.sam.prompt_encoder import PromptEncoder
from m2sa_jax.tree import flatten, unflatten


# Batches of images with at least this many grid tokens each are encoded one image at a time on
# the CPU (see Sam.encode_image).
ONE_IMAGE_AT_A_TIME_TOKENS = 64 * 64


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder under one parameter tree.

    Call it through its methods with ``apply(..., method=...)``: :meth:`encode_image`,
    :meth:`decode` (prompt encoder + mask decoder), or ``__call__`` (both, for init).
    """

    config: SamConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.image_encoder = ImageEncoderViT(self.config, self.dtype)
        self.prompt_encoder = PromptEncoder(self.config)
        self.mask_decoder = MaskDecoder(self.config, self.dtype)

    def encode_image(self, images):
        """images [B, 1024, 1024, 3] (normalised, padded) → encoder dict.

        On the CPU, a batch of full-size images (a grid of at least
        :data:`ONE_IMAGE_AT_A_TIME_TOKENS`) is encoded one image after another in a loop (the same
        function): each image's activations then stay in the cache, and a batch of 4 images of
        a 256-wide, 12-block encoder takes 8.0 s instead of 12.8 s (docs/performance.md).
        Accelerators, small grids (the demo's) and initialisation take the batch whole.
        """
        grid = self.config.image_embedding_size
        if (images.shape[0] > 1 and grid * grid >= ONE_IMAGE_AT_A_TIME_TOKENS
                and jax.default_backend() == "cpu" and not self.is_initializing()):
            def one_image(encoder, carry, image):
                return carry, jax.tree.map(lambda a: a[0], encoder(image[None]))

            loop = nn.scan(one_image, variable_broadcast="params", split_rngs={"params": False},
                           in_axes=0, out_axes=0)
            return loop(self.image_encoder, None, images)[1]
        return self.image_encoder(images)

    def decode(self, image_embeddings, points=None, boxes=None, masks=None, text_embeds=None,
               multimask_output: bool = False, early_features=None, image_index=None):
        """Prompts → {low_res_masks [B, C, 256, 256], iou_predictions [B, C], ...}."""
        prompts = self.prompt_encoder(points, boxes, masks, text_embeds)
        out = self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(),
                                prompts["sparse_embeddings"], prompts["dense_embeddings"],
                                multimask_output, early_features=early_features,
                                image_index=image_index)
        return {**out, **prompts}

    def __call__(self, images, points=None, boxes=None, masks=None, text_embeds=None,
                 multimask_output: bool = False):
        enc = self.encode_image(images)
        early = enc["early_features"] if self.config.use_compress_vit else None
        if points is None and boxes is None and masks is None and text_embeds is None:
            points = (jnp.zeros((images.shape[0], 1, 2)), jnp.ones((images.shape[0], 1), jnp.int32))
        dec = self.decode(enc["image_embeddings"], points, boxes, masks, text_embeds,
                          multimask_output, early_features=early)
        return {**enc, **dec}


def abstract_params(config: SamConfig):
    """Parameter shapes of ``Sam(config)`` without allocating them (jax.eval_shape)."""
    model = Sam(config)
    b = 1
    images = jax.ShapeDtypeStruct((b, config.img_size, config.img_size, 3), jnp.float32)
    masks = jax.ShapeDtypeStruct((b, 4 * config.image_embedding_size,
                                  4 * config.image_embedding_size, 1), jnp.float32)
    pts = (jax.ShapeDtypeStruct((b, 1, 2), jnp.float32), jax.ShapeDtypeStruct((b, 1), jnp.int32))
    boxes = jax.ShapeDtypeStruct((b, 4), jnp.float32)
    shapes = jax.eval_shape(
        lambda i, p, bx, m: model.init(jax.random.PRNGKey(0), i, p, bx, m), images, pts, boxes,
        masks)
    return shapes["params"]


def init_params(config: SamConfig, seed: int = 0):
    """Random parameters of ``Sam(config)`` (tests, demo). Small image → fast init."""
    flat = flatten(abstract_params(config))
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flat.items():
        x = rng.normal(0.0, 0.02, s.shape).astype(np.float32)
        if path.endswith("/weight"):  # LayerNorm scales around 1
            x += 1.0
        out[path] = jnp.asarray(x)
    return unflatten(out)

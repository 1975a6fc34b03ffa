"""SAM's prompt encoder: points, boxes and extra sparse embeddings (M²SA's [SEG] embeddings,
``text_embeds``), and the dense embedding of a low-res mask prompt."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from m2sa_jax.models.sam.common import HIGHEST, LayerNorm, conv, gelu
from m2sa_jax.models.sam.config import SamConfig


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding; the gaussian matrix is a converted buffer."""

    num_pos_feats: int = 128

    def setup(self):
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix", nn.initializers.normal(1.0),
            (2, self.num_pos_feats), jnp.float32)

    def encode(self, coords):
        """coords in [0, 1], [..., 2] (x, y) → [..., 2·num_pos_feats] (sin then cos)."""
        coords = 2 * coords - 1
        coords = jnp.einsum("...i,ij->...j", coords, self.positional_encoding_gaussian_matrix,
                            precision=HIGHEST)
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def grid(self, h: int, w: int):
        """Dense PE of an h×w grid: [h, w, 2·num_pos_feats]."""
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        xy = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self.encode(xy)

    def with_coords(self, coords, image_size: tuple[int, int]):
        """Pixel coords [..., 2] (x, y) in an image of ``image_size`` (h, w) → PE."""
        norm = coords.astype(jnp.float32) / jnp.array([image_size[1], image_size[0]], jnp.float32)
        return self.encode(norm)


class PromptEncoder(nn.Module):
    """Sparse (points, boxes, extra embeddings) and dense (mask) prompt embeddings.

    Sparse embeddings are concatenated in the order points, boxes, ``text_embeds``; a padding
    point is appended to points when no boxes are given, as in SAM. With no prompt at all the
    sparse part is empty ([B, 0, 256]).
    """

    config: SamConfig

    def setup(self):
        cfg = self.config
        d = cfg.prompt_embed_dim
        emb = nn.initializers.normal(1.0)
        self.pe_layer = PositionEmbeddingRandom(d // 2)
        self.point_embeddings = [self.param(f"point_embeddings_{i}", emb, (1, d), jnp.float32)
                                 for i in range(4)]
        self.not_a_point_embed = self.param("not_a_point_embed", emb, (1, d), jnp.float32)
        self.no_mask_embed = self.param("no_mask_embed", emb, (1, d), jnp.float32)
        m = cfg.mask_in_chans
        self.mask_conv0 = conv(m // 4, 2, 2, 0, jnp.float32, None)
        self.mask_ln0 = LayerNorm(1e-6)
        self.mask_conv1 = conv(m, 2, 2, 0, jnp.float32, None)
        self.mask_ln1 = LayerNorm(1e-6)
        self.mask_conv2 = conv(d, 1, 1, 0, jnp.float32, None)

    @property
    def _input_size(self):
        return (self.config.img_size, self.config.img_size)

    def get_dense_pe(self):
        g = self.config.image_embedding_size
        return self.pe_layer.grid(g, g)[None]  # [1, 64, 64, 256]

    def _embed_points(self, coords, labels, pad: bool):
        coords = coords.astype(jnp.float32) + 0.5  # pixel centres
        if pad:
            b = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
        pe = self.pe_layer.with_coords(coords, self._input_size)  # [B, N, 256]
        lab = labels[..., None]
        pe = jnp.where(lab == -1, self.not_a_point_embed[0], pe)
        pe = pe + jnp.where(lab == 0, self.point_embeddings[0][0], 0.0)
        pe = pe + jnp.where(lab == 1, self.point_embeddings[1][0], 0.0)
        return pe

    def _embed_boxes(self, boxes):
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        pe = self.pe_layer.with_coords(corners, self._input_size)  # [B, 2, 256]
        corner = jnp.concatenate([self.point_embeddings[2], self.point_embeddings[3]], axis=0)
        return pe + corner[None]

    def _embed_masks(self, masks):
        x = gelu(self.mask_ln0(self.mask_conv0(masks)))
        x = gelu(self.mask_ln1(self.mask_conv1(x)))
        return self.mask_conv2(x)  # [B, 64, 64, 256]

    def __call__(self, points=None, boxes=None, masks=None, text_embeds=None):
        """points: (coords [B, N, 2] (x, y) in 1024-space, labels [B, N]); boxes [B, 4]
        (x0, y0, x1, y1); masks [B, 256, 256, 1] logits; text_embeds [B, k, 256].

        Returns ``{"sparse_embeddings": [B, n, 256], "dense_embeddings": [B, 64, 64, 256]}``.
        """
        d, g = self.config.prompt_embed_dim, self.config.image_embedding_size
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        elif text_embeds is not None:
            bs = text_embeds.shape[0]
        else:
            bs = 1
        sparse = [jnp.zeros((bs, 0, d), jnp.float32)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        if text_embeds is not None:
            sparse.append(text_embeds.astype(jnp.float32))
        sparse = jnp.concatenate(sparse, axis=1)
        if masks is not None:
            dense = self._embed_masks(masks.astype(jnp.float32))
        else:
            dense = jnp.broadcast_to(self.no_mask_embed[0], (bs, g, g, d))
        return {"sparse_embeddings": sparse, "dense_embeddings": dense}

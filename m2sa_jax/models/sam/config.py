"""SAM's sizes: :class:`SamConfig`, the registry of the released variants (ViT-B/L/H) and
narrowed copies for tests."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Sizes of one SAM variant. ``global_attn_indexes`` are the blocks without windows."""

    model_type: str = "vit_h"
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    img_size: int = 1024
    patch_size: int = 16
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_compress_vit: bool = False

    @property
    def image_embedding_size(self) -> int:
        return self.img_size // self.patch_size  # 64

    def replace(self, **kw) -> "SamConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamConfig":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if "global_attn_indexes" in d:
            d["global_attn_indexes"] = tuple(d["global_attn_indexes"])
        return cls(**d)


SAM_CONFIGS = {
    "vit_b": SamConfig("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
}


def sam_config(model_type: str = "vit_h", **overrides) -> SamConfig:
    """A named SAM config, optionally with fields replaced (e.g. ``use_compress_vit=True``)."""
    if model_type not in SAM_CONFIGS:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose from {sorted(SAM_CONFIGS)}")
    return SAM_CONFIGS[model_type].replace(**overrides)


def narrow_config(model_type: str = "vit_h", embed_dim: int = 64, num_heads: int = 4,
                  **overrides) -> SamConfig:
    """Same depth and global-attention wiring as ``model_type``, narrower encoder (tests)."""
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    return sam_config(model_type, encoder_embed_dim=embed_dim, encoder_num_heads=num_heads,
                      **overrides)

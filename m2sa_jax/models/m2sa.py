"""M²SA: LLaVA and SAM joined by the [SEG] projector, one mask per [SEG] (SPEC §1).

Parameters: ``llava`` (vision_tower, mm_projector, language_model), ``sam`` (image_encoder,
prompt_encoder, mask_decoder — with ``compress_vit`` for M²SA, without for LISA) and
``text_hidden_fcs`` (Linear d→d, ReLU, Linear d→256).

Batches have static shapes. ``I`` images, ``Q`` questions (rows of ``input_ids``, each with one
image placeholder; ``image_of_question`` [Q] says whose), and at most ``M`` targets: the [SEG]s
of all questions, taken in row-major order (question, then position) exactly as the PyTorch
code's ``last_hidden_state[seg_token_mask]``. Each image is encoded once by SAM and once by CLIP,
however many questions refer to it, and all [SEG]s are decoded in one mask-decoder call.

Masks come out at each image's original size inside a static ``[M, Hmax, Wmax]`` canvas
(``original_sizes`` carried along; the rest of the canvas is 0 and masked in losses/metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2sa_jax.models import clip, llama
from m2sa_jax.models import llava as llava_lib
from m2sa_jax.models import sam as sam_lib

VARIANTS = ("m2sa", "lisa")


@dataclasses.dataclass(frozen=True)
class M2SAConfig:
    llava: llava_lib.LlavaConfig
    sam: sam_lib.SamConfig
    seg_token_id: int
    variant: str = "m2sa"          # "m2sa" fuses SAM's first global block; "lisa" does not
    dtype: Any = jnp.float32       # compute dtype of the SAM half (the LLM has its own)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}: expected one of {VARIANTS}")
        if self.sam.use_compress_vit != (self.variant == "m2sa"):
            object.__setattr__(self, "sam",
                               self.sam.replace(use_compress_vit=self.variant == "m2sa"))

    @property
    def out_dim(self) -> int:
        return self.sam.prompt_embed_dim

    def to_meta(self) -> dict:
        """The architecture as JSON-able metadata (a converted directory's ``m2sa_meta.json``
        and a training run's ``model.json`` carry it); :meth:`from_meta` reads it back."""
        lv = self.llava
        return dict(model="m2sa", variant=self.variant, seg_token_id=self.seg_token_id,
                    scan_layers=lv.text.scan_layers, text_config=lv.text.to_hf(),
                    vision_config=lv.vision.to_hf(), projector_type=lv.projector_type,
                    image_token_index=lv.image_token_index,
                    vision_feature_layer=lv.vision_feature_layer, sam_config=self.sam.to_dict())

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], **text_overrides) -> "M2SAConfig":
        if meta.get("model") != "m2sa":
            raise ValueError(f"metadata of a {meta.get('model')!r} model, not LISA/M²SA")
        text = llama.LlamaConfig.from_hf(meta["text_config"],
                                         scan_layers=meta["scan_layers"], **text_overrides)
        vision = clip.CLIPVisionConfig.from_hf(meta["vision_config"])
        lv = llava_lib.LlavaConfig(text=text, vision=vision, projector_type=meta["projector_type"],
                                   image_token_index=meta["image_token_index"],
                                   vision_feature_layer=meta["vision_feature_layer"])
        return cls(llava=lv, sam=sam_lib.SamConfig.from_dict(meta["sam_config"]),
                   seg_token_id=meta["seg_token_id"], variant=meta["variant"])


class TextHiddenFcs(nn.Module):
    """The [SEG] projector: Linear d→d, ReLU, Linear d→out (dropout 0 in the public code)."""

    hidden: int
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32, name="dense_0")(x)
        x = nn.relu(x)
        return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                        name="dense_2")(x)


def seg_slots(input_ids, seg_token_id: int, targets_per_question: int):
    """Where the [SEG]s are: the position *before* each one, ``N`` slots per question.

    Slot ``q * N + k`` holds the k-th [SEG] of question q (row-major order, as the PyTorch
    code's ``last_hidden_state[seg_token_mask]``, with padding slots interleaved). Returns
    (question [Q·N], text_position [Q·N], valid [Q·N], per-question counts [Q]); a count above
    N means targets were dropped — the batcher never lets that happen, and callers check it.
    """
    q, t = input_ids.shape
    n = targets_per_question
    before_seg = jnp.concatenate(
        [input_ids[:, 1:] == seg_token_id, jnp.zeros((q, 1), bool)], axis=1)  # [Q, T]
    counts = before_seg.sum(axis=1)                                           # [Q]
    pos = jax.vmap(lambda row: jnp.nonzero(row, size=n, fill_value=0)[0])(before_seg)  # [Q, N]
    valid = jnp.arange(n)[None, :] < counts[:, None]                           # [Q, N]
    question = jnp.broadcast_to(jnp.arange(q)[:, None], (q, n))
    return question.reshape(-1), pos.reshape(-1), valid.reshape(-1), counts


class M2SA(nn.Module):
    config: M2SAConfig

    def setup(self):
        cfg = self.config
        self.llava = llava_lib.Llava(cfg.llava)
        self.sam = sam_lib.Sam(cfg.sam, cfg.dtype)
        self.text_hidden_fcs = TextHiddenFcs(cfg.llava.text.hidden_size, cfg.out_dim,
                                             cfg.llava.text.dtype)

    # --- pieces ---------------------------------------------------------------------------

    def encode_images(self, images_sam, images_clip):
        """Both encoders, once per image. images_sam [I, S, S, 3]; images_clip [I, 224, 224, 3]."""
        enc = self.sam.encode_image(images_sam)
        rows = self.llava.encode_images(images_clip)["image_rows"]  # [I, 256, d]
        return dict(image_embeddings=enc["image_embeddings"],       # [I, 64, 64, 256]
                    early_features=enc["early_features"],           # [I, 64, 64, C]
                    image_rows=rows)

    def language(self, input_ids, attention_mask, image_rows_per_question):
        mm = self.llava.embed_multimodal(input_ids, attention_mask, image_rows_per_question)
        out = self.llava.language_model(inputs_embeds=mm["inputs_embeds"],
                                        attention_mask=mm["attention_mask"],
                                        positions=mm["positions"])
        return {**out, **mm}

    def decode_masks(self, seg_embeddings, seg_image, image_embeddings, early_features):
        """[SEG] embeddings [M, 256] → SAM's low-res mask logits [M, 256, 256], each decoded on
        the encodings of its image (``seg_image`` [M])."""
        early = early_features if self.config.sam.use_compress_vit else None
        dec = self.sam.decode(image_embeddings, text_embeds=seg_embeddings[:, None],
                              multimask_output=False, early_features=early,
                              image_index=seg_image)
        return dec["low_res_masks"][:, 0]                                   # [M, 256, 256]

    def segment(self, seg_embeddings, seg_image, image_embeddings, early_features,
                resized_sizes, original_sizes, mask_size):
        """[SEG] embeddings [M, 256] → low-res [M, 256, 256] and full-size [M, Hmax, Wmax]."""
        low_res = self.decode_masks(seg_embeddings, seg_image, image_embeddings, early_features)
        img = self.config.sam.img_size
        full = jax.vmap(lambda m, r, o: sam_lib.postprocess_masks_padded(
            m, r, o, mask_size, img_size=img))(
            low_res, resized_sizes[seg_image], original_sizes[seg_image])  # [M, Hmax, Wmax]
        return low_res, full

    def masks_from_hidden(self, hidden, seg_image, image_embeddings, early_features,
                          resized_hw, original_hw, mask_hw: tuple[int, int]):
        """Generate-then-segment's second half: the hidden states that produced [SEG]
        ([M, d]) → text_hidden_fcs → masks, each on its image's encodings (``seg_image``)."""
        seg_embeddings = self.text_hidden_fcs(hidden).astype(jnp.float32)    # [M, 256]
        low_res, full = self.segment(seg_embeddings, seg_image, image_embeddings,
                                     early_features, resized_hw, original_hw, mask_hw)
        return dict(seg_embeddings=seg_embeddings, low_res_masks=low_res, mask_logits=full)

    def low_res_masks_from_hidden(self, hidden, seg_image, image_embeddings, early_features):
        """:meth:`masks_from_hidden` without the resize to image size, whose output shape
        follows the images: a server keeps its compiled shapes fixed and resizes on the host
        (``sam.postprocess_masks_host``)."""
        seg_embeddings = self.text_hidden_fcs(hidden).astype(jnp.float32)    # [M, 256]
        low_res = self.decode_masks(seg_embeddings, seg_image, image_embeddings, early_features)
        return dict(seg_embeddings=seg_embeddings, low_res_masks=low_res)

    # --- the teacher-forced forward (training and the paper's evaluation) -------------------

    def __call__(self, sam_images, clip_images, input_ids, attention_mask, conv_image_index,
                 resized_hw, original_hw, *, targets_per_question: int,
                 mask_hw: tuple[int, int]):
        """Teacher-forced forward over a batch (the names of ``data.pipeline.collate``).

        sam_images [I, S, S, 3], clip_images [I, 224, 224, 3], input_ids / attention_mask
        [Q, T] (one image placeholder per row, right-padded), conv_image_index [Q],
        resized_hw / original_hw [I, 2]. With M = Q·N target slots, returns: ``logits``
        [Q, E, V] over the expanded sequence, ``seg_embeddings`` [M, 256], ``seg_valid`` [M],
        ``seg_question`` / ``seg_image`` [M], ``seg_counts`` [Q], ``low_res_masks``
        [M, 256, 256], ``mask_logits`` [M, Hmax, Wmax] and the encoders' intermediates.
        """
        enc = self.encode_images(sam_images, clip_images)
        lm = self.language(input_ids, attention_mask, enc["image_rows"][conv_image_index])
        seg_q, seg_t, seg_valid, seg_counts = seg_slots(
            input_ids, self.config.seg_token_id, targets_per_question)
        pos = lm["text_to_expanded"][seg_q, seg_t]                          # [M]
        hidden = lm["last_hidden_state"][seg_q, pos]                         # [M, d]
        seg_embeddings = self.text_hidden_fcs(hidden).astype(jnp.float32)   # [M, 256]
        seg_image = conv_image_index[seg_q]
        low_res, full = self.segment(seg_embeddings, seg_image, enc["image_embeddings"],
                                     enc["early_features"], resized_hw, original_hw, mask_hw)
        return dict(logits=lm["logits"], last_hidden_state=lm["last_hidden_state"],
                    text_to_expanded=lm["text_to_expanded"],
                    seg_embeddings=seg_embeddings, seg_valid=seg_valid, seg_question=seg_q,
                    seg_image=seg_image, seg_counts=seg_counts, low_res_masks=low_res,
                    mask_logits=full, image_embeddings=enc["image_embeddings"],
                    early_features=enc["early_features"])

    def forward_batch(self, batch: Mapping[str, Any]):
        """``__call__`` on a ``data.pipeline.collate`` batch (static sizes from its shapes)."""
        q, n, mh, mw = batch["gt_masks"].shape
        return self(batch["sam_images"], batch["clip_images"], batch["input_ids"],
                    batch["attention_mask"], batch["conv_image_index"], batch["resized_hw"],
                    batch["original_hw"], targets_per_question=n, mask_hw=(mh, mw))


def abstract_params(config: M2SAConfig) -> dict:
    """The full parameter tree's shapes (``jax.eval_shape``), as a checkpoint holds it."""
    llava_shapes = llava_lib.param_shapes(config.llava)
    sam_shapes = sam_lib.abstract_params(config.sam)
    d, out = config.llava.text.hidden_size, config.out_dim
    fcs = jax.eval_shape(lambda: TextHiddenFcs(d, out).init(
        jax.random.key(0), jnp.zeros((1, d))))["params"]
    return {"llava": llava_shapes, "sam": sam_shapes, "text_hidden_fcs": fcs}


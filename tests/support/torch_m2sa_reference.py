"""A PyTorch reference of M²SA composed from upstream modules plus the glue written from SPEC.

Built from segment-anything's ``Sam`` (image encoder, prompt encoder, mask decoder),
transformers' ``LlamaForCausalLM`` and ``CLIPVisionModel``, and the pieces M²SA adds:
``mm_projector`` (Linear), ``text_hidden_fcs`` (Linear, ReLU, Linear, Dropout(0)) and the
early-fusion ``compress_vit`` (Conv3×3, LayerNorm2d, GELU, Conv3×3) on the output of the first
global-attention block of the SAM encoder. Its ``state_dict()`` has exactly the key layout of
released LISA/M²SA Hugging Face folders (SPEC §7), so it doubles as a checkpoint writer.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)
from segment_anything.modeling.common import LayerNorm2d
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

IMAGE_TOKEN_INDEX = -200


class _VisionTowerHolder(nn.Module):
    """Gives the CLIP tower the ``model.vision_tower.vision_tower.*`` key prefix of LISA."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)


def build_sam(embed_dim, depth, num_heads, global_attn_indexes, img_size=1024, patch=16,
              window=14, prompt_dim=256, use_compress_vit=True, decoder_mlp_dim=2048,
              decoder_num_heads=8, iou_head_hidden_dim=256) -> Sam:
    """segment_anything's Sam at the given sizes (the decoder defaults are SAM's own)."""
    grid = img_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
            norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), num_heads=num_heads,
            patch_size=patch, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=global_attn_indexes, window_size=window, out_chans=prompt_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim,
                                          mlp_dim=decoder_mlp_dim, num_heads=decoder_num_heads),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    if use_compress_vit:
        sam.mask_decoder.compress_vit = nn.Sequential(
            nn.Conv2d(embed_dim, prompt_dim, kernel_size=3, padding=1),
            LayerNorm2d(prompt_dim),
            nn.GELU(),
            nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1))
    return sam


class TorchM2SA(nn.Module):
    """LISA (``use_compress_vit=False``) or M²SA, in the released checkpoints' key layout."""

    def __init__(self, llama_config: LlamaConfig, clip_config: CLIPVisionConfig, sam: Sam,
                 seg_token_id: int, num_image_rows: int, select_layer: int = -2):
        super().__init__()
        self.llm = LlamaForCausalLM(llama_config)
        d = llama_config.hidden_size
        core = self.llm.model
        core.vision_tower = _VisionTowerHolder(clip_config)
        core.mm_projector = nn.Linear(clip_config.hidden_size, d)
        core.visual_model = sam
        out_dim = sam.prompt_encoder.embed_dim
        core.text_hidden_fcs = nn.ModuleList([nn.Sequential(
            nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, out_dim), nn.Dropout(0.0))])
        self.seg_token_id = seg_token_id
        self.num_image_rows = num_image_rows
        self.select_layer = select_layer

    # The released checkpoints' keys are those of the LlamaForCausalLM with the extra modules.
    # transformers ≥ 5 dropped the ``vision_model.`` level inside CLIPVisionModel; the released
    # (transformers 4.31) checkpoints have it, so it is put back here.
    def state_dict(self, *args, **kwargs):
        tower = "model.vision_tower.vision_tower."
        out = {}
        for k, v in self.llm.state_dict(*args, **kwargs).items():
            if k.startswith(tower) and not k.startswith(tower + "vision_model."):
                k = tower + "vision_model." + k[len(tower):]
            out[k] = v
        return out

    @property
    def sam(self) -> Sam:
        return self.llm.model.visual_model

    def image_rows(self, images_clip):                       # [B, 3, 224, 224]
        tower = self.llm.model.vision_tower.vision_tower
        hidden = tower(images_clip, output_hidden_states=True).hidden_states[self.select_layer]
        return self.llm.model.mm_projector(hidden[:, 1:])    # [B, 256, d]

    def embed(self, input_ids, image_rows):
        """Splices the image rows in place of the single IMAGE_TOKEN_INDEX of each row."""
        embed = self.llm.model.embed_tokens
        out = []
        for ids, rows in zip(input_ids, image_rows):
            pos = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
            before = embed(ids[:pos])
            after = embed(ids[pos + 1:])
            out.append(torch.cat([before, rows, after], 0))
        return torch.stack(out)

    def forward(self, images_sam, images_clip, input_ids, attention_mask, image_of_question,
                resize_list, original_sizes, labels=None):
        """Teacher-forced forward as the public code runs it.

        images_sam: [I, 3, 1024, 1024] normalised and padded; images_clip: [I, 3, 224, 224];
        input_ids: [Q, T] with one IMAGE_TOKEN_INDEX each, right-padded; image_of_question: [Q]
        (sorted: questions of image 0 first); resize_list / original_sizes: per image (h, w).
        """
        sam = self.sam
        x = sam.image_encoder.patch_embed(images_sam)
        if sam.image_encoder.pos_embed is not None:
            x = x + sam.image_encoder.pos_embed
        early = None
        first_global = None
        for i, blk in enumerate(sam.image_encoder.blocks):
            x = blk(x)
            if blk.window_size == 0 and first_global is None:
                first_global, early = i, x                  # [I, 64, 64, C]
        image_embeddings = sam.image_encoder.neck(x.permute(0, 3, 1, 2))  # [I, 256, 64, 64]

        rows = self.image_rows(images_clip)[image_of_question]            # [Q, 256, d]
        inputs_embeds = self.embed(input_ids, rows)
        n_extra = self.num_image_rows - 1
        attn = torch.cat([attention_mask[:, :1].expand(-1, n_extra), attention_mask], 1)
        # The last hidden state (after the final norm: LISA's output_hidden_states[-1]) and the
        # logits, without output_hidden_states: transformers 5 captures hidden states with hooks
        # installed on the first such call on every matching submodule of the decoder — which
        # here holds the CLIP tower too — and later calls then come out wrong.
        last = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attn).last_hidden_state
        out = types.SimpleNamespace(logits=self.llm.lm_head(last))         # [Q, T', V]

        # The hidden state of the token before each [SEG], in the expanded sequence.
        seg_mask = input_ids[:, 1:] == self.seg_token_id
        seg_mask = torch.cat([seg_mask, torch.zeros_like(seg_mask[:, :1])], 1)
        seg_mask = torch.cat([torch.zeros_like(seg_mask[:, :1]).expand(-1, n_extra), seg_mask], 1)
        seg_embeddings = self.llm.model.text_hidden_fcs[0](last)[seg_mask]  # [S, 256]
        seg_question = torch.arange(len(input_ids)).unsqueeze(1).expand_as(seg_mask)[seg_mask]
        seg_image = image_of_question[seg_question]

        pe = sam.prompt_encoder
        mask_logits, low_res = [], []
        for i in range(len(images_sam)):
            emb = seg_embeddings[seg_image == i]                          # [k, 256]
            k = emb.shape[0]
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                k, -1, pe.image_embedding_size[0], pe.image_embedding_size[1])
            fused = image_embeddings[i:i + 1]
            if hasattr(sam.mask_decoder, "compress_vit"):
                fused = fused + sam.mask_decoder.compress_vit(early[i:i + 1].permute(0, 3, 1, 2))
            lr, _ = sam.mask_decoder(image_embeddings=fused, image_pe=pe.get_dense_pe(),
                                     sparse_prompt_embeddings=emb.unsqueeze(1),
                                     dense_prompt_embeddings=dense, multimask_output=False)
            low_res.append(lr[:, 0])
            mask_logits.append(sam.postprocess_masks(
                lr, input_size=tuple(resize_list[i]), original_size=tuple(original_sizes[i]))[:, 0])
        result = {"logits": out.logits, "seg_embeddings": seg_embeddings,
                  "mask_logits": mask_logits, "low_res_logits": low_res,
                  "early_features": early, "image_embeddings": image_embeddings,
                  "first_global_block": first_global}
        if labels is not None:
            result["ce"] = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                _expand_labels(labels, input_ids, n_extra)[:, 1:].reshape(-1), ignore_index=-100)
        return result


def _expand_labels(labels, input_ids, n_extra):
    """Labels in the expanded sequence: the image rows (at the image token) are -100."""
    out = []
    for row, ids in zip(labels, input_ids):
        pos = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
        pad = torch.full((n_extra,), -100, dtype=row.dtype)
        out.append(torch.cat([row[:pos], pad, row[pos:]]))
    return torch.stack(out)


def mask_loss_terms(pred_masks, gt_masks):
    """BCE and Dice exactly as the public code accumulates them (before weighting)."""
    def dice(inputs, targets, num_masks, scale=1000, eps=1e-6):
        inputs = inputs.sigmoid().flatten(1, 2)
        targets = targets.flatten(1, 2)
        numerator = 2 * (inputs / scale * targets).sum(-1)
        denominator = (inputs / scale).sum(-1) + (targets / scale).sum(-1)
        return (1 - (numerator + eps) / (denominator + eps)).sum() / (num_masks + 1e-8)

    def bce(inputs, targets, num_masks):
        loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        return loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)

    b = d = 0.0
    n = 0
    for pred, gt in zip(pred_masks, gt_masks):
        b = b + bce(pred, gt, gt.shape[0]) * gt.shape[0]
        d = d + dice(pred, gt, gt.shape[0]) * gt.shape[0]
        n += gt.shape[0]
    return b / (n + 1e-8), d / (n + 1e-8)

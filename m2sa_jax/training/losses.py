"""M²SA's training losses (SPEC §4): text cross-entropy + mask BCE + mask Dice.

Static shapes: masks arrive padded to ``[M, H, W]`` (M = max targets per batch, H×W = the
largest original size) with ``valid`` ([M] bool: a real target) and ``pixel_valid``
([M, H, W] bool: inside that target's image). Padded targets and pixels contribute nothing.

The arithmetic follows the public PyTorch code (LISA/M²SA) term by term so that losses agree to
float rounding: per image, ``sum_i loss_i / (n + 1e-8) * n`` is accumulated, and the total is
divided by ``(N + 1e-8)`` (N = number of masks in the batch), then weighted.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from m2sa_jax.data.types import IGNORE_INDEX


def causal_lm_loss(logits, labels):
    """Mean token cross-entropy of next-token prediction (Hugging Face's shift, -100 ignored).

    logits: [B, T, V]; labels: [B, T] int (IGNORE_INDEX where unsupervised).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, logz - picked, 0.0)
    return nll.sum() / jnp.maximum(mask.sum(), 1)


def per_mask_bce(logits, targets, pixel_valid):
    """Pixel-mean BCE-with-logits of each mask over its valid pixels. → [M]."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    # BCE with logits, the numerically stable form: max(x,0) - x*t + log(1 + exp(-|x|)).
    loss = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    loss = jnp.where(pixel_valid, loss, 0.0)
    count = pixel_valid.reshape(pixel_valid.shape[0], -1).sum(-1)
    return loss.reshape(loss.shape[0], -1).sum(-1) / jnp.maximum(count, 1)


def per_mask_dice(logits, targets, pixel_valid, scale=1000.0, eps=1e-6):
    """1 - Dice of sigmoid probabilities, with the public code's scale and eps. → [M]."""
    probs = jnp.where(pixel_valid, jax.nn.sigmoid(logits.astype(jnp.float32)), 0.0)
    targets = jnp.where(pixel_valid, targets.astype(jnp.float32), 0.0)
    probs = probs.reshape(probs.shape[0], -1)
    targets = targets.reshape(targets.shape[0], -1)
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def mask_losses(logits, targets, valid, pixel_valid, image_index, num_images):
    """BCE and Dice averaged over masks, grouped per image as the PyTorch code does.

    logits, targets, pixel_valid: [M, H, W]; valid: [M] bool; image_index: [M] int (the image
    each mask belongs to); num_images: static int. Returns (bce, dice) scalars.
    """
    bce = per_mask_bce(logits, targets, pixel_valid)
    dice = per_mask_dice(logits, targets, pixel_valid)
    valid_f = valid.astype(jnp.float32)
    seg = lambda x: jax.ops.segment_sum(x * valid_f, image_index, num_segments=num_images)
    n_per_image = seg(jnp.ones_like(valid_f))                                  # [num_images]
    # Per image: (sum_i l_i) / (n + 1e-8) * n — the public code's sigmoid_ce_loss/dice_loss
    # (reduced with num_masks = n) multiplied back by n.
    bce_img = seg(bce) / (n_per_image + 1e-8) * n_per_image
    dice_img = seg(dice) / (n_per_image + 1e-8) * n_per_image
    total = valid_f.sum()
    return bce_img.sum() / (total + 1e-8), dice_img.sum() / (total + 1e-8)


def m2sa_loss(logits, labels, mask_logits, gt_masks, valid, pixel_valid, image_index,
              num_images, *, ce_weight, bce_weight, dice_weight):
    """Total loss and its terms: ce·CE + bce·BCE + dice·Dice."""
    ce = causal_lm_loss(logits, labels)
    bce, dice = mask_losses(mask_logits, gt_masks, valid, pixel_valid, image_index, num_images)
    terms = {"ce": ce_weight * ce, "bce": bce_weight * bce, "dice": dice_weight * dice}
    total = terms["ce"] + terms["bce"] + terms["dice"]
    return total, {**terms, "mask": terms["bce"] + terms["dice"], "total": total}


def expand_labels(labels, text_to_expanded, expanded_len: int):
    """Text labels [Q, T] → labels of the expanded sequence [Q, E] (image rows are -100)."""
    q = labels.shape[0]
    out = jnp.full((q, expanded_len), IGNORE_INDEX, labels.dtype)
    rows = jnp.arange(q)[:, None]
    return out.at[rows, text_to_expanded].set(labels)


def pixel_valid_mask(original_sizes, seg_image, mask_size):
    """[M, Hmax, Wmax] bool: inside the original image of each target."""
    hw = original_sizes[seg_image]                                          # [M, 2]
    ys = jnp.arange(mask_size[0])[None, :, None] < hw[:, 0, None, None]
    xs = jnp.arange(mask_size[1])[None, None, :] < hw[:, 1, None, None]
    return ys & xs


def mask_targets(gt_masks):
    """Ground truth as float32 in [0, 1]: bool masks, or uint8 coverage (255 = inside; the
    grid-reduced masks of images larger than the canvas, ``data.pipeline.grid_masks``)."""
    if gt_masks.dtype == jnp.uint8:
        return gt_masks.astype(jnp.float32) / 255.0
    return gt_masks.astype(jnp.float32)


def compute_losses(outputs, batch: Mapping[str, Any], *, ce_weight: float, bce_weight: float,
                   dice_weight: float):
    """SPEC §4 losses of a forward on a collated batch. Targets are ``gt_masks`` [Q, N, H, W]
    (bool, or uint8 coverage: :func:`mask_targets`) with ``target_valid`` [Q, N] in [SEG]
    order; padded conversations carry no labels. A batch without any target (every answer
    without [SEG], e.g. LLaVA-Instruct or a no-target MMR question) has BCE = Dice = 0: the
    per-image sums are empty and divided by 0 + 1e-8, as in the public code."""
    q, n, mh, mw = batch["gt_masks"].shape
    exp_labels = expand_labels(batch["labels"], outputs["text_to_expanded"],
                               outputs["logits"].shape[1])
    valid = batch["target_valid"].reshape(-1) & outputs["seg_valid"]
    pv = pixel_valid_mask(batch["original_hw"], outputs["seg_image"], (mh, mw))
    return m2sa_loss(
        outputs["logits"], exp_labels, outputs["mask_logits"],
        mask_targets(batch["gt_masks"]).reshape(q * n, mh, mw), valid, pv, outputs["seg_image"],
        batch["sam_images"].shape[0], ce_weight=ce_weight, bce_weight=bce_weight,
        dice_weight=dice_weight)

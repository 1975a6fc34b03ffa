"""M²SA's training losses (SPEC §4): text cross-entropy + mask BCE + mask Dice.

Static shapes: masks arrive padded to ``[M, H, W]`` (M = max targets per batch, H×W = the
largest original size) with ``valid`` ([M] bool: a real target) and ``pixel_valid``
([M, H, W] bool: inside that target's image). Padded targets and pixels contribute nothing.

The arithmetic follows the public PyTorch code (LISA/M²SA) term by term so that losses agree to
float rounding: per image, ``sum_i loss_i / (n + 1e-8) * n`` is accumulated, and the total is
divided by ``(N + 1e-8)`` (N = number of masks in the batch), then weighted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


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

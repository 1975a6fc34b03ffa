"""What trains and how (SPEC §4): the trainable set as path patterns → a label tree → optax.

The trainable set is declared once, as regular expressions over '/'-joined parameter paths.
:func:`label_tree` turns it into a tree of labels ("trainable" / "frozen"), and
:func:`make_optimizer` builds ``optax.multi_transform`` with ``set_to_zero`` for frozen
groups, so frozen parameters get no Adam moments at all.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import jax
import optax

from m2sa_jax.tree import flatten, unflatten

TRAINABLE, FROZEN = "trainable", "frozen"

# SPEC §4: LoRA factors, the full token embedding and lm_head, the SAM mask decoder (with
# compress_vit) and text_hidden_fcs train; CLIP, mm_projector, the SAM image and prompt
# encoders and every other LLM weight are frozen. Paths are those of m2sa_jax.models.m2sa.
M2SA_TRAINABLE = (
    r"lora/.*",
    r"params/llava/language_model/embed_tokens/.*",
    r"params/llava/language_model/lm_head/.*",
    r"params/sam/mask_decoder/.*",
    r"params/text_hidden_fcs/.*",
)


def label_tree(tree: Mapping, trainable: Iterable[str]) -> dict:
    """Same structure as ``tree``; each leaf "trainable" if its path fully matches a pattern."""
    patterns = [re.compile(p) for p in trainable]
    flat = flatten(tree)
    return unflatten({p: TRAINABLE if any(r.fullmatch(p) for r in patterns) else FROZEN
                      for p in flat})


def warmup_linear_decay(peak_lr: float, warmup_steps: int, total_steps: int):
    """DeepSpeed's WarmupDecayLR with linear warmup: 0 → peak over warmup, then linear → 0."""
    warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    decay = optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(labels: Mapping, *, lr: float, warmup_steps: int, total_steps: int,
                   b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.0,
                   clip_norm: float = 1.0, eps: float = 1e-8):
    """AdamW with global-norm clipping over the trainable group; frozen groups are zeroed."""
    schedule = warmup_linear_decay(lr, warmup_steps, total_steps)
    trainable = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()},
                                 labels), schedule


def count_by_label(tree: Mapping, labels: Mapping) -> dict[str, int]:
    out = {TRAINABLE: 0, FROZEN: 0}
    for (_, leaf), (_, label) in zip(sorted(flatten(tree).items()), sorted(flatten(labels).items())):
        out[label] += int(jax.numpy.size(leaf))
    return out

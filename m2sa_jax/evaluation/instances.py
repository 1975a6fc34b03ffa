"""Instance separation: when a question asks for several instances of one kind ("the shade of
the lamp on the left and the shade of the lamp on the right"), does each mask pick out its own?

gIoU rewards a mask that covers both shades with about half the IoU of a correct one, so a
model that finds "shades" but cannot tell the lamps apart still scores well. This metric
looks at that failure alone:

- Within one question, two or more targets with the same category name (``"lamp:shade"``,
  ``"lamp"``) are *instances of one kind*: an answer never lists one target twice, so equal
  names in one answer are always different objects (MMR records and the synthetic set alike:
  the category name is where the record says which targets are instances of one kind).
- For each such target ``j``, with prediction ``P_j`` (logit > 0) and the set ``K_j`` of
  the other targets of its kind in the question, ``P_j`` is *separated* when
  ``IoU(P_j, G_j) > max_{k in K_j} IoU(P_j, G_k)`` (strictly: a mask equally close to two
  instances has not chosen one). IoU is the benchmark's (``metrics.iou_from_counts``:
  ``I / (U + 1e-5)``, 1.0 for an empty union), counted inside the image's true extent.
- Instance separation = separated masks / counted masks over the split, also per
  granularity (object / part). Targets without another instance of their kind in their
  question are not counted.

Layout as in :mod:`m2sa_jax.evaluation.metrics`: :func:`pairwise_iou` is a jitted,
static-shape function over a padded batch (IoU of every prediction with every target of its
question); :func:`separation` decides per question on the host; :class:`InstanceSeparation`
accumulates and serialises (resumable evaluation keeps its state in the results file).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax.evaluation.metrics import GRANULARITIES, iou_from_counts

ALL = "all"


@jax.jit
def _pairwise_counts(pred, gt, sizes):
    q, n, h, w = gt.shape
    if jnp.issubdtype(pred.dtype, jnp.floating):
        pred = pred > 0
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    rows = jnp.arange(h)[None, :, None] < sizes[:, 0, None, None]         # [Q, H, 1]
    cols = jnp.arange(w)[None, None, :] < sizes[:, 1, None, None]         # [Q, 1, W]
    inside = (rows & cols)[:, None]                                         # [Q, 1, H, W]
    p = (pred & inside).astype(jnp.float32)
    g = (gt & inside).astype(jnp.float32)
    # Pixel counts are exact in float32 up to 2^24 (a 4096² canvas).
    inter = jnp.einsum("qjhw,qkhw->qjk", p, g, precision=jax.lax.Precision.HIGHEST)
    area_p = p.sum(axis=(2, 3))                                             # [Q, N]
    area_g = g.sum(axis=(2, 3))
    union = area_p[:, :, None] + area_g[:, None, :] - inter
    return jnp.rint(inter).astype(jnp.int32), jnp.rint(union).astype(jnp.int32)


def pairwise_iou(pred, gt, sizes=None) -> np.ndarray:
    """IoU of every prediction with every target of the same question.

    Args:
      pred: [Q, N, H, W] mask logits (float: foreground is ``> 0``) or binary masks.
      gt: [Q, N, H, W] ground truth of the question's N target slots.
      sizes: [Q, 2] (height, width) of each question's image at the top-left of the padded
        canvas; pixels outside are not counted. Default: the whole canvas.

    Returns:
      float64 [Q, N, N]: ``iou[q, j, k] = IoU(pred[q, j], gt[q, k])``.
    """
    gt = jnp.asarray(gt)
    q, _, h, w = gt.shape
    if sizes is None:
        sizes = np.broadcast_to(np.array([h, w], np.int32), (q, 2))
    inter, union = _pairwise_counts(jnp.asarray(pred), gt, jnp.asarray(sizes, jnp.int32))
    return iou_from_counts(np.asarray(inter), np.asarray(union))


def instance_groups(labels: Sequence[str]) -> list[int]:
    """Per target of one question, the index of its group of instances of one kind (targets
    sharing a category name with another target of the question), or -1 when it has none."""
    counts: dict[str, int] = {}
    for name in labels:
        counts[name] = counts.get(name, 0) + 1
    ids: dict[str, int] = {}
    return [ids.setdefault(name, len(ids)) if counts[name] > 1 else -1 for name in labels]


def separation(iou: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(counted, separated), bool [n] each, for one question's ``n = len(labels)`` targets.

    ``iou``: at least [n, n], ``iou[j, k] = IoU(prediction j, target k)`` (extra padded rows
    and columns are ignored). ``counted[j]``: target j has another instance of its kind in the
    question; ``separated[j]``: counted, and its prediction overlaps its own target more than
    any of those others."""
    groups = np.asarray(instance_groups(labels), np.int64)
    n = len(labels)
    iou = np.asarray(iou, np.float64)[:n, :n]
    counted = groups >= 0
    separated = np.zeros(n, bool)
    for j in np.flatnonzero(counted):
        others = [k for k in range(n) if k != j and groups[k] == groups[j]]
        separated[j] = iou[j, j] > iou[j, others].max()
    return counted, separated


@dataclasses.dataclass
class _Counts:
    masks: int = 0
    separated: int = 0
    questions: int = 0

    def summary(self) -> dict[str, float | int]:
        return {"rate": self.separated / self.masks if self.masks else float("nan"),
                "masks": self.masks, "separated": self.separated, "questions": self.questions}


class InstanceSeparation:
    """Host-side accumulator of instance separation over a split, overall and per granularity.

    Feed it each question's IoU matrix (:func:`pairwise_iou`), its targets' category names and
    granularities (:attr:`~m2sa_jax.data.types.MaskRef.label` / ``.kind``)."""

    def __init__(self):
        self._counts = {group: _Counts() for group in (ALL,) + GRANULARITIES}

    def update(self, iou: np.ndarray, labels: Sequence[str], kinds: Sequence[str]) -> None:
        """One question: ``iou`` [≥n, ≥n], ``labels`` / ``kinds`` of its n targets."""
        if len(labels) != len(kinds):
            raise ValueError(f"InstanceSeparation.update: {len(labels)} labels but "
                             f"{len(kinds)} kinds")
        counted, separated = separation(iou, labels)
        if not counted.any():
            return
        for group in (ALL,) + GRANULARITIES:
            sel = counted if group == ALL else counted & np.array([k == group for k in kinds])
            if sel.any():
                c = self._counts[group]
                c.masks += int(sel.sum())
                c.separated += int((separated & sel).sum())
                c.questions += 1

    def result(self) -> dict[str, dict[str, float | int]]:
        """``{"all" | "object" | "part": {rate, masks, separated, questions}}``; a
        granularity with no counted mask is absent, and so is "all" when none was counted."""
        return {g: c.summary() for g, c in self._counts.items() if c.masks}

    def merge(self, other: "InstanceSeparation") -> "InstanceSeparation":
        for g, c in other._counts.items():
            mine = self._counts[g]
            mine.masks += c.masks
            mine.separated += c.separated
            mine.questions += c.questions
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "counts": {g: dataclasses.asdict(c) for g, c in self._counts.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "InstanceSeparation":
        if state.get("version") != 1:
            raise ValueError(f"InstanceSeparation state version {state.get('version')!r} is not "
                             "1; it was written by another release of m2sa_jax")
        out = cls()
        for g, c in state["counts"].items():
            out._counts[g] = _Counts(**c)
        return out

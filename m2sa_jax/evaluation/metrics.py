"""Segmentation metrics of the MMR benchmark: gIoU and cIoU (SPEC §5).

Definitions, per target mask ``i`` with binary prediction ``P_i = logits_i > 0`` and ground
truth ``G_i``, counting only pixels inside the image's true size and outside its ignore region:

- ``I_i = |P_i ∧ G_i|``, ``U_i = |P_i ∨ G_i|``;
- ``IoU_i = I_i / (U_i + 1e-5)``, and ``IoU_i = 1.0`` when ``U_i == 0`` (nothing predicted,
  nothing to find: a correct empty answer);
- gIoU = mean of ``IoU_i`` over every target mask of the split (a per-mask average: an image
  with five targets weighs five times an image with one);
- cIoU = ``Σ I_i / Σ U_i`` over the split.

Agreement with the public PyTorch code (LISA ``train_ds.py::validate`` and the MMR authors'
copy of it, read for these facts): both evaluate with batch size 1, binarise ``pred > 0``,
and get ``I_i``/``U_i`` per mask from a 2-bin histogram of the {0, 1} maps after setting the
prediction to 255 wherever the target is 255 (so ignore pixels fall outside both bins);
they add ``I_i / (U_i + 1e-5)`` and then ``+1.0`` where ``U_i == 0`` (the first term is 0
there, so the mask scores exactly 1.0); the per-image mean times the image's mask count is
summed, so gIoU is the per-mask mean. Three small differences, all kept out of this module
on purpose and pinned by the tests:

- after the all-reduce the public meter divides by ``count + 1e-5`` instead of ``count``
  (gIoU smaller by a relative 1e-5/count), and cIoU is ``ΣI / (ΣU + 1e-10)``;
- the MMR copy skips an image whose prediction list is empty; under teacher forcing every
  answer carries its [SEG] tokens, so this never fires on a well-formed record;
- ground truth decoded from multi-polygon RLE is summed over its third axis and cast to
  uint8 without clipping, so a pixel covered by two polygons holds 2 and falls outside
  the histogram's {0, 1} bins: it counts as neither target nor background. Here ground
  truth is binary (``> 0``), so such a pixel is target. It needs overlapping polygons of
  one annotation, which COCO-style annotations almost never have.

Layout: :func:`mask_stats` is a jitted, static-shape function that turns a padded batch of
logits and masks into per-mask intersection and union counts (padding ignored);
:class:`SegmentationMetrics` is the host-side accumulator that merges those counts across
batches, devices and hosts, breaks them down by split and granularity (object / part), and
serialises to JSON for resumable evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

IOU_EPS = 1e-5
GRANULARITIES = ("object", "part")
ALL = "all"


@jax.jit
def _mask_stats(pred, gt, valid, sizes, ignore):
    n, h, w = gt.shape
    if jnp.issubdtype(pred.dtype, jnp.floating):
        pred = pred > 0
    else:
        pred = pred.astype(bool)
    gt = gt.astype(bool)
    rows = jnp.arange(h)[None, :, None] < sizes[:, 0, None, None]  # [N, H, 1]
    cols = jnp.arange(w)[None, None, :] < sizes[:, 1, None, None]  # [N, 1, W]
    counted = rows & cols & ~ignore.astype(bool) & valid[:, None, None]  # [N, H, W]
    inter = jnp.sum(pred & gt & counted, axis=(1, 2), dtype=jnp.int32)  # [N]
    union = jnp.sum((pred | gt) & counted, axis=(1, 2), dtype=jnp.int32)  # [N]
    return {"intersection": inter, "union": union, "valid": valid}


def mask_stats(pred, gt, valid=None, sizes=None, ignore=None) -> dict[str, jax.Array]:
    """Per-mask intersection and union pixel counts for a padded batch.

    Args:
      pred: [N, H, W] logits (float: foreground is ``> 0``) or binary masks (bool / int).
      gt: [N, H, W] ground truth (bool or {0, 1}).
      valid: [N] bool, False for padding entries (they count 0 / 0 and are dropped by the
        accumulator). Default: all valid.
      sizes: [N, 2] int (height, width) of each mask's true extent at the top-left of the
        padded [H, W] canvas; pixels outside are ignored. Default: the full canvas.
      ignore: [N, H, W] bool, pixels excluded from both prediction and ground truth
        (ReasonSeg's "ignore" regions). Default: none.

    Returns:
      {"intersection": [N] int32, "union": [N] int32, "valid": [N] bool}. One compile per
      distinct (N, H, W, pred dtype); counts fit int32 for any canvas below 46k × 46k.
    """
    gt = jnp.asarray(gt)
    n, h, w = gt.shape
    if valid is None:
        valid = jnp.ones((n,), bool)
    if sizes is None:
        sizes = jnp.broadcast_to(jnp.array([h, w], jnp.int32), (n, 2))
    if ignore is None:
        ignore = jnp.zeros((n, h, w), bool)
    return _mask_stats(jnp.asarray(pred), gt, jnp.asarray(valid, bool),
                       jnp.asarray(sizes, jnp.int32), jnp.asarray(ignore))


def iou_from_counts(intersection, union) -> np.ndarray:
    """Per-mask IoU = I / (U + 1e-5), and 1.0 where the union is empty."""
    i = np.asarray(intersection, np.float64)
    u = np.asarray(union, np.float64)
    return np.where(u == 0, 1.0, i / (u + IOU_EPS))


@dataclasses.dataclass
class _Totals:
    masks: int = 0
    iou_sum: float = 0.0
    intersection: int = 0
    union: int = 0
    empty_union: int = 0
    records: int = 0

    def add(self, other: "_Totals") -> None:
        self.masks += other.masks
        self.iou_sum += other.iou_sum
        self.intersection += other.intersection
        self.union += other.union
        self.empty_union += other.empty_union
        self.records += other.records

    def summary(self) -> dict[str, float | int]:
        return {
            "giou": self.iou_sum / self.masks if self.masks else float("nan"),
            "ciou": self.intersection / self.union if self.union else float("nan"),
            "masks": self.masks,
            "records": self.records,
            "empty_union_masks": self.empty_union,
            "intersection": self.intersection,
            "union": self.union,
        }


class SegmentationMetrics:
    """Host-side gIoU / cIoU accumulator, per split and per granularity.

    Feed it the output of :func:`mask_stats` (or any per-mask counts) with, per mask, the
    record it belongs to and its granularity ("object" / "part", from
    :attr:`~m2sa_jax.data.types.MaskRef.kind`). Records are counted once each and may not be
    fed twice: a resumed run skips the ids in :meth:`done_records`, and merging two
    accumulators that share a record is an error (it would double-count).
    """

    def __init__(self):
        self._totals: dict[tuple[str, str], _Totals] = {}
        self._done: dict[str, set[str]] = {}

    def update(self, split: str, intersection, union, record_ids: Sequence[str],
               kinds: Sequence[str], valid=None, records: Sequence[str] = ()) -> None:
        """Add one batch of per-mask counts.

        ``intersection``/``union``/``valid`` are [N] arrays (host or device); entries with
        ``valid`` False (padding) are dropped; ``record_ids``/``kinds`` are length-N lists
        (anything for padding entries). All masks of a record must come in one call.
        ``records``: ids scored in this call that have no mask (questions without a target),
        so that they count as done too.
        """
        inter = np.asarray(intersection).astype(np.int64)
        uni = np.asarray(union).astype(np.int64)
        n = inter.shape[0]
        keep = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
        if not (uni.shape == keep.shape == (n,) and len(record_ids) == len(kinds) == n):
            raise ValueError(
                f"SegmentationMetrics.update({split!r}): intersection, union, valid, "
                f"record_ids and kinds must all have length {n}; got union {uni.shape}, "
                f"valid {keep.shape}, {len(record_ids)} record ids, {len(kinds)} kinds")
        done = self._done.setdefault(split, set())
        batch_records = {record_ids[i] for i in range(n) if keep[i]} | set(records)
        repeated = sorted(batch_records & done)
        if repeated:
            raise ValueError(
                f"SegmentationMetrics.update({split!r}): records {repeated[:5]} were already "
                "counted; feed each record's masks once (a resumed run must skip done_records())")
        iou = iou_from_counts(inter, uni)
        for kind in set(kinds[i] for i in range(n) if keep[i]):
            if kind not in GRANULARITIES:
                raise ValueError(f"SegmentationMetrics.update({split!r}): granularity {kind!r} "
                                 f"is not one of {GRANULARITIES}")
        for group in (ALL,) + GRANULARITIES:
            sel = keep if group == ALL else keep & np.array([k == group for k in kinds], bool)
            if not sel.any():
                continue
            t = self._totals.setdefault((split, group), _Totals())
            t.add(_Totals(
                masks=int(sel.sum()),
                iou_sum=float(iou[sel].sum()),
                intersection=int(inter[sel].sum()),
                union=int(uni[sel].sum()),
                empty_union=int((uni[sel] == 0).sum()),
                records=len({record_ids[i] for i in np.flatnonzero(sel)}),
            ))
        done |= batch_records

    def update_masks(self, split: str, pred, gt, record_ids: Sequence[str], kinds: Sequence[str],
                     valid=None, sizes=None, ignore=None) -> None:
        """:func:`mask_stats` on a padded batch of predictions, then :meth:`update`."""
        stats = mask_stats(pred, gt, valid=valid, sizes=sizes, ignore=ignore)
        self.update(split, stats["intersection"], stats["union"], record_ids, kinds,
                    valid=stats["valid"])

    def done_records(self, split: str) -> frozenset[str]:
        return frozenset(self._done.get(split, ()))

    def splits(self) -> list[str]:
        return sorted(self._done)

    def result(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """``{split: {"all" | "object" | "part": {giou, ciou, masks, records, ...}}}``;
        a granularity with no masks in a split is absent."""
        out: dict[str, dict[str, Any]] = {}
        for (split, group), t in sorted(self._totals.items()):
            out.setdefault(split, {})[group] = t.summary()
        return out

    def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
        """Add another accumulator's counts (another host, or an earlier run) into this one."""
        for split, ids in other._done.items():
            shared = sorted(ids & self._done.get(split, set()))
            if shared:
                raise ValueError(
                    f"SegmentationMetrics.merge: split {split!r} records {shared[:5]} are in "
                    "both accumulators; each record must be evaluated on exactly one host")
        for key, t in other._totals.items():
            self._totals.setdefault(key, _Totals()).add(t)
        for split, ids in other._done.items():
            self._done.setdefault(split, set()).update(ids)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "totals": [[split, group, dataclasses.asdict(t)]
                       for (split, group), t in sorted(self._totals.items())],
            "done": {split: sorted(ids) for split, ids in sorted(self._done.items())},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "SegmentationMetrics":
        if state.get("version") != 1:
            raise ValueError(f"SegmentationMetrics state version {state.get('version')!r} "
                             "is not 1; it was written by another release of m2sa_jax")
        m = cls()
        for split, group, t in state["totals"]:
            m._totals[(split, group)] = _Totals(**t)
        m._done = {split: set(ids) for split, ids in state["done"].items()}
        return m

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SegmentationMetrics":
        return cls.from_state_dict(json.loads(text))

    @classmethod
    def merged(cls, parts: Iterable["SegmentationMetrics"]) -> "SegmentationMetrics":
        out = cls()
        for p in parts:
            out.merge(p)
        return out

    def all_hosts(self) -> "SegmentationMetrics":
        """Every process's accumulator merged (call on all processes; returns the same on each).

        The JSON state travels as a padded uint8 array through
        ``multihost_utils.process_allgather``; with one process it is a copy of ``self``.
        """
        if jax.process_count() == 1:
            return SegmentationMetrics.from_json(self.to_json())
        blob = np.frombuffer(self.to_json().encode(), np.uint8)
        lengths = multihost_utils.process_allgather(np.array([blob.size], np.int64))
        padded = np.zeros(int(np.max(lengths)), np.uint8)
        padded[:blob.size] = blob
        blobs = multihost_utils.process_allgather(padded)
        return SegmentationMetrics.merged(
            SegmentationMetrics.from_json(bytes(b[:int(n)]).decode())
            for b, n in zip(np.asarray(blobs), np.asarray(lengths).reshape(-1)))

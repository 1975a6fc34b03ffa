"""The training mixture: groups of sources drawn with fixed ratios, one image per draw.

The public M²SA code (train_ds.py) trains on ``--dataset sem_seg||refer_seg||vqa||multi_part_reason_seg``
with ``--sample_rates 2,9,2,6``: the rates follow that order, so sem_seg : refer_seg : vqa : mmr
= 2 : 9 : 2 : 6 (normalised to probabilities). Inside a group a member source is picked
uniformly, then an image uniformly (the upstream datasets each draw their own random
index); a source turns that image into up to 3 questions.

Draw ``i`` is a pure function of ``(seed, i)``: its generator is seeded with both, so any
worker can compute any step, and resuming only needs the step.

A draw that lands on a bad record is redrawn with the same generator; each record left out on
the way is a :class:`~m2sa_jax.data.skips.SkipEvent` (source, reason, record) carried by the
sample finally drawn (``Sample.skip_events``), which the loader counts into the run's skip
summary when the sample is used.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from m2sa_jax.data.mmr import training_split
from m2sa_jax.data.skips import SkipEvent
from m2sa_jax.data.sources.common import Source
from m2sa_jax.data.sources.refer_seg import DEFAULT_REFER_SEG, refer_seg_sources
from m2sa_jax.data.sources.sem_seg import DEFAULT_SEM_SEG, sem_seg_sources
from m2sa_jax.data.sources.vqa import VQASource
from m2sa_jax.data.types import BadRecord, Sample

PAPER_RATIOS = {"sem_seg": 2.0, "refer_seg": 9.0, "vqa": 2.0, "mmr": 6.0}


@dataclasses.dataclass
class SourceGroup:
    """Members drawn uniformly (as upstream picks among e.g. ADE20K/COCO-Stuff/…)."""

    name: str
    members: Sequence[Source]

    def __post_init__(self):
        empty = [m.name for m in self.members if len(m) == 0]
        if not self.members or empty:
            raise ValueError(f"group {self.name!r}: needs non-empty sources; empty: {empty or 'no members'}")

    def sample(self, rng: np.random.Generator) -> Sample:
        member = self.members[int(rng.integers(len(self.members)))]
        index = int(rng.integers(len(member)))
        try:
            return member.sample(index, rng)
        except BadRecord as e:
            e.source = e.source or member.name
            e.record = e.record or f"{member.name} record {index}"
            raise


class MixedSource:
    """Random-access view of the mixture: ``mixed[i]`` is draw ``i`` (``len`` = draws per epoch).

    A draw whose record is bad (``BadRecord``) is redrawn with the same generator, up to
    ``max_retries`` times (upstream retries too); the records left out travel with the sample
    (``skip_events``), or with the ``retries_exhausted`` error when every try failed.
    """

    def __init__(self, groups: Mapping[str, Sequence[Source] | SourceGroup], ratios: Mapping[str, float],
                 *, seed: int, draws_per_epoch: int, max_retries: int = 16):
        missing = sorted(set(groups) ^ set(ratios))
        if missing:
            raise ValueError(f"mixture: groups {sorted(groups)} and ratios {sorted(ratios)} differ in {missing}")
        self.names = list(groups)
        self.groups = [g if isinstance(g, SourceGroup) else SourceGroup(n, list(g)) for n, g in groups.items()]
        weights = np.array([float(ratios[n]) for n in self.names])
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture ratios must be ≥ 0 with a positive sum, got {dict(ratios)}")
        self.probs = weights / weights.sum()
        self.seed = int(seed)
        self.draws_per_epoch = int(draws_per_epoch)
        self.max_retries = max_retries

    def __len__(self) -> int:
        return self.draws_per_epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def group_of(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.groups), p=self.probs))

    def __getitem__(self, index: int) -> Sample:
        rng = self.rng(index)
        events: list[SkipEvent] = []
        for _ in range(self.max_retries + 1):
            group = self.groups[self.group_of(rng)]
            try:
                sample = group.sample(rng)
            except BadRecord as e:
                events.append(SkipEvent.from_error(e, e.record))
                continue
            sample.extra["group"] = group.name
            sample.extra["draw"] = int(index)
            sample.skip_events = tuple(events)
            return sample
        raise BadRecord("retries_exhausted", f"mixture draw {index}: {self.max_retries + 1} bad "
                        f"records in a row; last: {events[-1].message}", source="mixture",
                        record=f"mixture draw {index}", skip_events=tuple(events))


def default_mmr_root(root: str) -> str:
    """The MMR_{split}.json folder of a dataset root (the public code's path)."""
    return f"{root}/MMR"


def default_mmr_image_root(root: str) -> str:
    """The COCO images MMR's records name, in a dataset root (the public code's path)."""
    return f"{root}/refer_seg/images/mscoco/images"


def mmr_roots(data) -> tuple[str, str]:
    """(MMR folder, its image root) of a ``data`` config: ``data.mmr_root`` and
    ``data.image_root``; for the mixture (``data.kind = "mixture"`` with a ``data.root``) the
    unset ones default to the dataset root's layout (docs/datasets.md). Training reads its MMR
    split and held-out split from there, and so does eval.py when ``eval.mmr_root`` is unset."""
    mmr_root, image_root = data.get("mmr_root") or "", data.get("image_root") or ""
    if data.get("kind") != "mixture" or not data.get("root"):
        return mmr_root, image_root
    return (mmr_root or default_mmr_root(data.root),
            image_root or default_mmr_image_root(data.root))


def training_mixture(root: str, *, seed: int, draws_per_epoch: int, ratios: Mapping[str, float] = PAPER_RATIOS,
                     sem_seg: Sequence[str] | None = None, refer_seg: Sequence[str] | None = None,
                     vqa_data: str = "llava_instruct_150k", mmr_root: str | None = None,
                     mmr_format: str = "json", mmr_image_root: str | None = None,
                     allow_no_target: bool = False, max_questions: int = 3,
                     max_per_question: int = 3, released_pairing: bool = False,
                     mmr_json: str | None = None, skips=None) -> MixedSource:
    """The M²SA training mix from one dataset root laid out as docs/datasets.md says.

    Groups with ratio 0 are not opened. MMR's training split is read lazily
    (:func:`~m2sa_jax.data.mmr.training_split`) from ``mmr_root`` (default ``root/MMR``) in
    ``mmr_format``: the JSON files with images under ``mmr_image_root`` (default
    ``root/refer_seg/images/mscoco/images``; the public code's paths), or the array_record split
    built into that folder by ``python -m m2sa_jax.data.tfds_mmr --data_dir``.
    """
    del skips           # bad records travel with the draws (MixedSource), counted when used
    if mmr_json is not None:
        mmr_root = os.path.dirname(mmr_json)
    per_image = dict(max_questions=max_questions, max_per_question=max_per_question)
    builders = {
        "sem_seg": lambda: sem_seg_sources(root, sem_seg or DEFAULT_SEM_SEG, **per_image),
        "refer_seg": lambda: refer_seg_sources(root, refer_seg or DEFAULT_REFER_SEG, **per_image),
        "vqa": lambda: [VQASource(root, vqa_data)],
        "mmr": lambda: [training_split(mmr_root or default_mmr_root(root),
                                       mmr_image_root or default_mmr_image_root(root), "train",
                                       fmt=mmr_format, max_questions=max_questions,
                                       prompt="train", released_pairing=released_pairing,
                                       allow_no_target=allow_no_target)],
    }
    unknown = sorted(set(ratios) - set(builders))
    if unknown:
        raise ValueError(f"unknown mixture groups {unknown}; choose from {sorted(builders)}")
    active = {name: r for name, r in ratios.items() if r > 0}
    return MixedSource({name: builders[name]() for name in active}, active, seed=seed,
                       draws_per_epoch=draws_per_epoch)

"""The record format every data source produces, before tokenisation and batching.

A :class:`Sample` is one image with up to a few question/answer turns. Answers carry one
``[SEG]`` per target, and ``masks[i]`` holds exactly as many :class:`MaskRef` as answer ``i``
has ``[SEG]`` tokens (sources check this and reject the record otherwise). Masks stay lazy
(an RLE, polygons or a file) until the loader decodes them at the image's size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

SEG_TOKEN = "[SEG]"
IMAGE_TOKEN = "<image>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IGNORE_INDEX = -100


class BadRecord(ValueError):
    """A record that cannot be used. ``reason`` is a short key used for counting; ``source``
    the dataset it came from ("mmr", "mapillary", ...) and ``record`` its id, where the raiser
    or a caller on the way up knows them; ``skip_events`` the records left out before it in the
    same draw (``data.skips.SkipEvent``), so that they are counted with it."""

    def __init__(self, reason: str, message: str, source: str = "", record: str = "",
                 skip_events: tuple = ()):
        super().__init__(message)
        self.reason = reason
        self.source = source
        self.record = record
        self.skip_events = tuple(skip_events)

    def __reduce__(self):          # pickles whole (worker processes), not as ValueError(message)
        return type(self), (self.reason, str(self), self.source, self.record, self.skip_events)


@dataclasses.dataclass(frozen=True)
class MaskRef:
    """A lazily decoded binary mask: ``decode()`` → bool [height, width]."""

    decode_fn: Callable[[], np.ndarray]
    height: int
    width: int
    label: str = ""          # category / part name, for overlays and per-granularity metrics
    kind: str = "object"     # "object" or "part"

    def decode(self) -> np.ndarray:
        return self.decode_fn()


@dataclasses.dataclass
class Sample:
    source: str                       # "mmr", "ade20k", "refcoco", "vqa", "synthetic", ...
    record_id: str                    # stable id: names the record in errors and summaries
    image_path: str
    questions: list[str]              # user turns, without the <image> prefix
    answers: list[str]                # assistant turns, one [SEG] per target
    masks: list[list[MaskRef]]        # masks[i] ↔ the [SEG]s of answers[i], in order
    height: int = 0
    width: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    multi_round: bool = False         # all turns form one conversation (VQA), not one each
    image_bytes: bytes | None = None  # the encoded image, when the record carries it (array_record)
    # records left out while this one was drawn (the mixture's redraws), counted when it is used
    skip_events: tuple = ()

    @property
    def num_targets(self) -> int:
        return sum(len(m) for m in self.masks)

"""Sample → model-ready arrays, and batches of static shape grouped by image.

:func:`prepare_example` turns one :class:`~m2sa_jax.data.types.Sample` into an
:class:`Example`: the image decoded (``images.load_rgb``), both branches preprocessed
(``preprocess.sam_preprocess`` at a configurable SAM size — small models use small inputs —
and ``preprocess.clip_preprocess``), one tokenised llava_v1 conversation per question
(``conversation.tokenize_sample``: ids with the -200 image placeholder, labels) and the
ground-truth masks decoded at the original image size. Anything wrong raises ``BadRecord``;
:func:`iter_examples` counts and skips those (optionally decoding on a thread pool).

:func:`collate` packs examples into a batch of fixed shapes (:class:`BatchShapes`), grouped by
image: every image appears once (``sam_images``/``clip_images``) and each conversation carries
the index of its image (``conv_image_index``), so the model encodes an image once for all its
questions. Padding is explicit: ``image_valid``, ``conv_valid``, ``attention_mask`` (tokens),
``target_valid`` (the masks of conversation ``c`` are ``gt_masks[c, :n_c]``, in [SEG] order) and
the true mask sizes (``original_hw`` of the conversation's image; masks are zero-padded
bottom/right to ``mask_hw``). :func:`batches` fills batches greedily from a stream of examples.

Images larger than the mask canvas (training only; Mapillary Vistas photos are 1920×1080 to
4000×3000 and more): :func:`prepare_example` with ``canvas_hw`` scores their masks on the grid
SAM resizes the image to, scaled to fit the canvas (:func:`grid_hw`; for a square canvas equal
to the SAM input size it *is* SAM's resized grid, so the logits are only cropped). The ground
truth is reduced to that grid by area (:func:`grid_masks`: each cell holds the fraction of it
the mask covers), and the batch's ``original_hw`` is that grid's size, so the model's
postprocessing, the pixel mask and the losses all work on it. BCE and Dice are linear in the
target, so a cell with coverage ``f`` weighs exactly as its ``f·n`` covered pixels would if the
logit were constant over the cell; what remains is the logits' variation inside a cell
(``python -m bench.mask_loss_grid`` measures it; docs/training.md has the figures). Such
batches carry ``gt_masks`` as uint8 coverage (255 = inside: ``collate(coverage=True)``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from m2sa_jax.data import conversation, images, preprocess
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.data.types import IGNORE_INDEX, BadRecord, Sample


@dataclasses.dataclass
class Example:
    """One image with its tokenised conversations and ground-truth masks."""

    record_id: str
    source: str
    sam_image: np.ndarray                 # float32 [S, S, 3], normalised, zero-padded
    resized_hw: tuple[int, int]           # size inside the padded SAM input
    original_hw: tuple[int, int]
    clip_image: np.ndarray                # float32 [C, C, 3]
    conversations: list[conversation.TokenizedConversation]
    masks: list[np.ndarray]               # per conversation: bool [n_targets, H, W]
    labels: list[list[str]]               # category / part name per target
    kinds: list[list[str]]                # "object" / "part" per target
    questions: list[str]
    # The size the masks are stored and scored at: ``original_hw``, or for an image larger than
    # the canvas given to prepare_example, its grid (module doc); masks are then uint8 coverage.
    target_hw: tuple[int, int] | None = None
    skip_events: tuple = ()               # records skipped while drawing this one (mixture)

    @property
    def scored_hw(self) -> tuple[int, int]:
        return tuple(self.target_hw or self.original_hw)


def grid_hw(original_hw: Sequence[int], canvas_hw: Sequence[int]) -> tuple[int, int]:
    """The size masks of an ``original_hw`` image are scored at on a ``canvas_hw`` canvas: the
    original size when it fits, else scaled down to fit with the aspect kept (segment_anything's
    rounding, so that a square canvas equal to the SAM input size gives SAM's resized size)."""
    h, w = int(original_hw[0]), int(original_hw[1])
    ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
    if h <= ch and w <= cw:
        return h, w
    scale = min(ch * 1.0 / h, cw * 1.0 / w)
    return min(max(int(h * scale + 0.5), 1), ch), min(max(int(w * scale + 0.5), 1), cw)


def grid_masks(masks: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """bool [n, H, W] → uint8 [n, h, w]: the fraction of each grid cell a mask covers, × 255
    (area average: PIL's box filter, exact for non-integer ratios, rounded to 1/255)."""
    h, w = int(hw[0]), int(hw[1])
    out = np.zeros((len(masks), h, w), np.uint8)
    for i, m in enumerate(masks):
        image = Image.fromarray(np.asarray(m, np.uint8) * np.uint8(255))
        out[i] = np.asarray(image.resize((w, h), Image.BOX))
    return out


def prepare_example(sample: Sample, tokenizer: LegacyLlamaTokenizer, sam_size: int = preprocess.SAM_IMAGE_SIZE,
                    clip_size: int = preprocess.CLIP_IMAGE_SIZE, multi_round: bool = False,
                    max_length: int | None = None,
                    canvas_hw: Sequence[int] | None = None) -> Example:
    """Decodes and tokenises one sample (raises BadRecord naming the record).

    ``canvas_hw``: masks of an image larger than this are reduced to its grid (module doc);
    without it they stay at the original size. A sample marked ``multi_round`` (VQA) is one
    conversation of all its turns whatever ``multi_round`` says."""
    multi_round = multi_round or sample.multi_round
    convs = conversation.tokenize_sample(sample, tokenizer, multi_round, max_length)
    image = (images.load_rgb(sample.image_path) if sample.image_bytes is None
             else images.decode_rgb(sample.image_bytes, sample.image_path))
    h, w = image.shape[:2]
    if (sample.height or sample.width) and (sample.height, sample.width) != (h, w):
        raise BadRecord("image_size_mismatch", f"{sample.record_id}: {sample.image_path} is {h}x{w} but "
                        f"the record says {sample.height}x{sample.width}")
    groups = [[m for ms in sample.masks for m in ms]] if multi_round else sample.masks
    masks, labels, kinds = [], [], []
    for i, refs in enumerate(groups):
        decoded = []
        for j, ref in enumerate(refs):
            try:
                m = np.asarray(ref.decode(), bool)
            except BadRecord as e:
                raise BadRecord(e.reason, f"{sample.record_id} answer {i} mask {j}: {e}") from None
            if m.shape != (h, w):
                raise BadRecord("mask_size_mismatch", f"{sample.record_id} answer {i} mask {j}: mask is "
                                f"{m.shape[0]}x{m.shape[1]}, image is {h}x{w}")
            decoded.append(m)
        masks.append(np.stack(decoded) if decoded else np.zeros((0, h, w), bool))   # [n, H, W]
        labels.append([r.label for r in refs])
        kinds.append([r.kind for r in refs])
    target_hw = (h, w) if canvas_hw is None else grid_hw((h, w), canvas_hw)
    if target_hw != (h, w):
        masks = [grid_masks(m, target_hw) for m in masks]                  # uint8 [n, h', w']
    sam_image, resized_hw, original_hw = preprocess.sam_preprocess(image, sam_size)
    clip_image = preprocess.clip_preprocess(image, clip_size)
    return Example(sample.record_id, sample.source, sam_image, tuple(resized_hw), tuple(original_hw),
                   clip_image, convs, masks, labels, kinds, list(sample.questions),
                   target_hw=target_hw, skip_events=tuple(sample.skip_events))


def iter_examples(samples: Iterable[Sample], tokenizer: LegacyLlamaTokenizer, skips: SkipCounter,
                  num_workers: int = 0, **kwargs) -> Iterator[Example]:
    """Prepared examples in input order; bad samples are reported to ``skips`` and left out."""
    def run(sample):
        try:
            return prepare_example(sample, tokenizer, **kwargs)
        except BadRecord as e:
            skips.add(e.reason, sample.record_id, str(e))
            return None

    if num_workers <= 0:
        for sample in samples:
            example = run(sample)
            if example is not None:
                yield example
        return
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        pending: list[concurrent.futures.Future] = []
        for sample in samples:
            pending.append(pool.submit(run, sample))
            if len(pending) >= 2 * num_workers:
                example = pending.pop(0).result()
                if example is not None:
                    yield example
        for future in pending:
            example = future.result()
            if example is not None:
                yield example


@dataclasses.dataclass(frozen=True)
class BatchShapes:
    """Static batch shapes: compiled functions see only these."""

    images: int = 2
    conversations: int = 6                       # questions per batch (all images together)
    token_buckets: Sequence[int] = (128, 256, 512)
    max_targets: int = 8                         # [SEG]s per conversation
    mask_hw: tuple[int, int] = (1024, 1024)      # gt masks zero-padded to this (≥ any original size)

    def bucket(self, length: int) -> int:
        for b in sorted(self.token_buckets):
            if length <= b:
                return b
        raise BadRecord("too_long", f"{length} tokens exceed the largest bucket {max(self.token_buckets)}")

    def fits(self, example: Example) -> str | None:
        """Why an example can never fit a batch (None if it can)."""
        if len(example.conversations) > self.conversations:
            return (f"{len(example.conversations)} conversations exceed the batch's {self.conversations}")
        if any(len(m) > self.max_targets for m in example.masks):
            return f"a conversation has more than max_targets={self.max_targets} targets"
        mh, mw = example.scored_hw
        if mh > self.mask_hw[0] or mw > self.mask_hw[1]:
            return f"image {example.original_hw} is larger than mask_hw {self.mask_hw}"
        if max(len(c.input_ids) for c in example.conversations) > max(self.token_buckets):
            return f"a conversation is longer than the largest token bucket {max(self.token_buckets)}"
        return None


def collate(examples: Sequence[Example], shapes: BatchShapes, pad_id: int,
            coverage: bool = False) -> dict[str, np.ndarray]:
    """A batch of static shapes (module doc) from examples that fit it together.

    ``gt_masks`` is bool, or with ``coverage`` uint8 (255 inside, the covered fraction × 255 on
    a reduced grid; what training uses, so that every batch has one dtype). ``original_hw`` is
    the size the masks are scored at (``Example.scored_hw``)."""
    if len(examples) > shapes.images:
        raise ValueError(f"{len(examples)} examples for a batch of {shapes.images} images")
    convs = [(i, c, ex.masks[k]) for i, ex in enumerate(examples) for k, c in enumerate(ex.conversations)]
    if len(convs) > shapes.conversations:
        raise ValueError(f"{len(convs)} conversations for a batch of {shapes.conversations}")
    n_img, n_conv, n_tgt = shapes.images, shapes.conversations, shapes.max_targets
    s_sam = examples[0].sam_image.shape[0]
    s_clip = examples[0].clip_image.shape[0]
    t_len = shapes.bucket(max(len(c.input_ids) for _, c, _ in convs))
    mh, mw = shapes.mask_hw
    out = {
        "sam_images": np.zeros((n_img, s_sam, s_sam, 3), np.float32),      # [B_img, S, S, 3]
        "clip_images": np.zeros((n_img, s_clip, s_clip, 3), np.float32),   # [B_img, 224, 224, 3]
        "resized_hw": np.zeros((n_img, 2), np.int32),
        "original_hw": np.zeros((n_img, 2), np.int32),
        "image_valid": np.zeros((n_img,), bool),
        "input_ids": np.full((n_conv, t_len), pad_id, np.int32),          # [B_conv, T]
        "labels": np.full((n_conv, t_len), IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros((n_conv, t_len), bool),
        "conv_image_index": np.zeros((n_conv,), np.int32),
        "conv_valid": np.zeros((n_conv,), bool),
        "gt_masks": np.zeros((n_conv, n_tgt, mh, mw), np.uint8 if coverage else bool),  # [B_conv, N_tgt, Hm, Wm]
        "target_valid": np.zeros((n_conv, n_tgt), bool),
    }
    for i, ex in enumerate(examples):
        out["sam_images"][i] = ex.sam_image
        out["clip_images"][i] = ex.clip_image
        out["resized_hw"][i] = ex.resized_hw
        out["original_hw"][i] = ex.scored_hw
        out["image_valid"][i] = True
    for c, (i, conv, masks) in enumerate(convs):
        n = len(conv.input_ids)
        out["input_ids"][c, :n] = conv.input_ids
        out["labels"][c, :n] = conv.labels
        out["attention_mask"][c, :n] = True
        out["conv_image_index"][c] = i
        out["conv_valid"][c] = True
        if len(masks) > n_tgt:
            raise ValueError(f"{examples[i].record_id}: {len(masks)} targets > max_targets {n_tgt}")
        h, w = examples[i].scored_hw
        if coverage and masks.dtype == bool:
            masks = masks.astype(np.uint8) * np.uint8(255)
        elif not coverage and masks.dtype != bool:
            raise ValueError(f"{examples[i].record_id}: masks reduced to a grid need "
                             "collate(coverage=True)")
        out["gt_masks"][c, :len(masks), :h, :w] = masks
        out["target_valid"][c, :len(masks)] = True
    return out


def batches(examples: Iterable[Example], shapes: BatchShapes, pad_id: int,
            skips: SkipCounter | None = None, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Greedy packing: add examples while images and conversations fit, then emit a batch."""
    pending: list[Example] = []
    used = 0
    for ex in examples:
        why = shapes.fits(ex)
        if why is not None:
            if skips is not None:
                skips.add("does_not_fit_batch", ex.record_id, f"{ex.record_id}: {why}")
            continue
        if len(pending) == shapes.images or used + len(ex.conversations) > shapes.conversations:
            yield collate(pending, shapes, pad_id)
            pending, used = [], 0
        pending.append(ex)
        used += len(ex.conversations)
    if pending and not drop_last:
        yield collate(pending, shapes, pad_id)

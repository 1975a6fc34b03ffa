"""The MMR reader (SPEC §6): MMR JSON records → :class:`~m2sa_jax.data.types.Sample`.

One MMR record is one COCO image with questions, ``answers[i]`` (the annotations of question
``i``, in the order of its ``{seg}`` slots) and ``text_answers[i]``. Images are resolved under
a COCO images folder by ``file_name``. Masks stay lazy RLEs and are decoded by
:meth:`MaskRef.decode` (string or list/uncompressed counts; a list of RLEs is OR-ed over its
third axis).

Object or part (``MaskRef.kind``): MMR's annotations are PACO-LVIS categories, whose part names
are ``"object:part"`` (``"mug:handle"``, ``"car_(automobile):wheel"``); a ``category_name`` with a
``":"`` is a part, any other an object.

Sampling (:meth:`MMRDataset.sample`): up to ``max_questions`` questions per image, drawn
without replacement by the given generator, each paired with *its own* answer and masks.
``released_pairing=True`` reproduces the public loader instead: questions are subsampled but
answers and masks are taken from the first N positions (comparison only: it mislabels).

Two on-disk formats (``MMR_FORMATS``): the released JSON files, and the array_record split built
by ``python -m m2sa_jax.data.tfds_mmr`` (each example the JSON record verbatim with its image
file's bytes; example ``i`` of a split is record ``i`` of its JSON file). Training reads either
through :func:`training_split`, lazily: item ``i`` is record ``i`` of the file, validated when
it is drawn, and a bad one raises ``BadRecord`` then (the loader skips and counts it), so both
formats give the same samples in the same order, bad records included. (The lazy reader cannot
see duplicate image ids across the file; the eager JSON reader below does.)

Bad records are skipped and reported to a :class:`~m2sa_jax.data.skips.SkipCounter` by reason
(``strict=True`` raises with the file and record instead): ``invalid_utf8``, ``malformed_record``,
``empty_questions``, ``duplicate_image``, ``unsafe_path`` (``file_name`` absolute, with ``..``,
or a symlink leaving the root), ``missing_image``, ``malformed_rle``, ``rle_size_mismatch``,
``seg_count`` (``{seg}`` count ≠ number of masks), ``malformed_text``, ``no_target`` (an answer
with no ``{seg}`` and no mask, from a dataset that does not declare such answers: MMR's
released splits have none). A dataset whose questions may have no target (a negative
question: "There is no giraffe in the image.") says so with ``allow_no_target=True``; its
no-target answers are then samples with zero masks (a text loss only in training), while a
``{seg}`` count that differs from the masks is refused as ever. Malformed RLE strings are
caught at load by walking their counts (pycocotools decodes a short count string into garbage
without complaint); corrupt image files surface when the pipeline decodes them.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from m2sa_jax.data import conversation
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import SEG_TOKEN, BadRecord, MaskRef, Sample

MMR_SPLITS = ("MMR_train.json", "MMR_val.json", "MMR_test_mixed.json", "MMR_test_obj_only.json",
              "MMR_test_part_only.json")


def category_kind(category_name: str) -> str:
    """"part" for PACO part names ("mug:handle"), else "object"."""
    return "part" if ":" in category_name else "object"


# --------------------------------------------------------------------------- RLE
def _string_counts(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (raises ValueError if malformed)."""
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        value, shift, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("count string ends inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} is outside the RLE alphabet")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and (c & 0x10):
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def _check_rle(seg: Any, height: int, width: int) -> None:
    """Raises BadRecord for an RLE that is not well formed or not of size [height, width]."""
    parts = seg if isinstance(seg, list) else [seg]
    if not parts or not all(isinstance(p, dict) and "size" in p and "counts" in p for p in parts):
        raise BadRecord("malformed_rle", "segmentation is not an RLE dict (or a list of them) "
                        "with 'size' and 'counts'")
    for part in parts:
        size = part["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise BadRecord("malformed_rle", f"RLE size {size!r} is not [height, width]")
        if list(size) != [height, width]:
            raise BadRecord("rle_size_mismatch", f"RLE size {size} differs from the image's "
                            f"[height, width] [{height}, {width}]")
        counts = part["counts"]
        try:
            runs = _string_counts(counts) if isinstance(counts, str) else counts
            if not isinstance(runs, list) or not all(isinstance(v, int) for v in runs):
                raise ValueError("counts are neither a string nor a list of integers")
            if any(v < 0 for v in runs) or sum(runs) != height * width:
                raise ValueError(f"runs sum to {sum(runs)}, not height*width = {height * width}")
        except ValueError as e:
            raise BadRecord("malformed_rle", f"RLE counts are malformed: {e}") from None


def _to_compressed(part: dict, height: int, width: int) -> dict:
    if isinstance(part["counts"], list):
        return mask_utils.frPyObjects(part, height, width)
    return {"size": part["size"], "counts": part["counts"].encode("ascii")}


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """bool [height, width] of an MMR segmentation (RLE dict or list of RLE dicts)."""
    _check_rle(seg, height, width)
    parts = seg if isinstance(seg, list) else [seg]
    decoded = mask_utils.decode([_to_compressed(p, height, width) for p in parts])  # [H, W, N]
    return decoded.sum(axis=2) > 0


# --------------------------------------------------------------------------- reading
def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def read_json_records(path: str) -> list:
    """The JSON array of an MMR file. Undecodable bytes become lone surrogates (surrogateescape)
    so the records that hold them can be skipped one by one while the rest stay usable."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of MMR records, got {type(data).__name__}")
    return data


def _safe_image_path(image_root: str, file_name: str) -> str:
    if not isinstance(file_name, str) or not file_name:
        raise BadRecord("malformed_record", "file_name is missing or not a string")
    if os.path.isabs(file_name) or ".." in file_name.replace("\\", "/").split("/"):
        raise BadRecord("unsafe_path", f"file_name {file_name!r} leaves the images root")
    path = os.path.join(image_root, file_name)
    root = os.path.realpath(image_root)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise BadRecord("unsafe_path", f"file_name {file_name!r} resolves (symlink) outside the "
                        f"images root {image_root}")
    return path


class MMRRecord:
    """One validated MMR record: all its questions, answers and lazy masks."""

    __slots__ = ("record_id", "image_path", "image_id", "height", "width", "questions",
                 "answers", "masks", "image_bytes")

    def __init__(self, record_id, image_path, image_id, height, width, questions, answers, masks,
                 image_bytes=None):
        self.record_id = record_id
        self.image_path = image_path                  # or, with image_bytes, where they came from
        self.image_id = image_id
        self.height, self.width = height, width
        self.questions: list[str] = questions
        self.answers: list[str] = answers             # "{seg}" already replaced by [SEG]
        self.masks: list[list[MaskRef]] = masks
        self.image_bytes: bytes | None = image_bytes  # the image file itself (array_record)


def parse_record(rec: Any, record_id: str, image_root: str, check_image_exists: bool = True,
                 image_bytes: bytes | None = None, allow_no_target: bool = False) -> MMRRecord:
    """Validates one raw JSON record (raises BadRecord with the reason). With ``image_bytes``
    (a record that carries its image) ``image_root`` only names where they came from;
    ``allow_no_target``: answers without a target are valid (module doc)."""
    if _has_surrogates(rec):
        raise BadRecord("invalid_utf8", "the record contains bytes that are not valid UTF-8")
    if not isinstance(rec, dict):
        raise BadRecord("malformed_record", "record is not a JSON object")
    for key, kind in (("file_name", str), ("height", int), ("width", int), ("questions", list),
                      ("answers", list), ("text_answers", list)):
        if not isinstance(rec.get(key), kind):
            raise BadRecord("malformed_record", f"field {key!r} is missing or not a {kind.__name__}")
    height, width = rec["height"], rec["width"]
    if height <= 0 or width <= 0:
        raise BadRecord("malformed_record", f"height/width {height}x{width} are not positive")
    questions = rec["questions"]
    if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise BadRecord("empty_questions", "the record has no (non-empty) question")
    if not (len(questions) == len(rec["answers"]) == len(rec["text_answers"])):
        raise BadRecord("malformed_record", f"{len(questions)} questions, {len(rec['answers'])} "
                        f"answers and {len(rec['text_answers'])} text_answers differ in number")
    if image_bytes is not None:
        image_path = f"{image_root} ({rec['file_name']})"
    else:
        image_path = _safe_image_path(image_root, rec["file_name"])
    if image_bytes is None and check_image_exists and not os.path.isfile(image_path):
        raise BadRecord("missing_image", f"image {image_path} not found")
    answers, masks = [], []
    for i, (text, anns) in enumerate(zip(rec["text_answers"], rec["answers"])):
        if not isinstance(text, str) or not isinstance(anns, list):
            raise BadRecord("malformed_record", f"answer {i} is not a string with a list of annotations")
        if text.count("{seg}") != len(anns):
            raise BadRecord("seg_count", f"text answer {i} has {text.count('{seg}')} {{seg}} but "
                            f"{len(anns)} masks")
        if not anns and not allow_no_target:
            raise BadRecord("no_target", f"answer {i} has no target ({{seg}} and masks); if this "
                            "dataset has questions without a target, read it with "
                            "allow_no_target=True (training: data.allow_no_target)")
        try:
            answers.append(text.format(seg=SEG_TOKEN))
        except (KeyError, IndexError, ValueError) as e:
            raise BadRecord("malformed_text", f"text answer {i} is not a valid template ({e})") from None
        refs = []
        for j, ann in enumerate(anns):
            if not isinstance(ann, dict) or "segmentation" not in ann:
                raise BadRecord("malformed_record", f"answer {i} annotation {j} has no segmentation")
            try:
                _check_rle(ann["segmentation"], height, width)
            except BadRecord as e:
                raise BadRecord(e.reason, f"answer {i} annotation {j}: {e}") from None
            name = str(ann.get("category_name", ""))
            refs.append(MaskRef(functools.partial(decode_segmentation, ann["segmentation"], height, width),
                                height, width, label=name, kind=category_kind(name)))
        masks.append(refs)
    return MMRRecord(record_id, image_path, rec.get("image_id"), height, width, list(questions),
                     answers, masks, image_bytes)


def record_label(file_label: str, index: int, raw: Any) -> str:
    """How errors and summaries name record ``index`` of an MMR file."""
    image_id = raw.get("image_id") if isinstance(raw, dict) else None
    return f"{file_label} record {index} (image_id {image_id})"


class _JsonRecords:
    """Lazy records of an MMR JSON file: raw dict ``i`` → MMRRecord when asked."""

    def __init__(self, json_path: str, image_root: str, check_images: bool, allow_no_target: bool):
        self.raw = read_json_records(json_path)
        self.json_path, self.image_root, self.check_images = json_path, image_root, check_images
        self.allow_no_target = allow_no_target
        self.file_label = os.path.basename(json_path)

    def __len__(self) -> int:
        return len(self.raw)

    def parse(self, index: int) -> MMRRecord:
        raw = self.raw[index]
        record_id = record_label(self.file_label, index, raw)
        try:
            return parse_record(raw, record_id, self.image_root, self.check_images,
                                allow_no_target=self.allow_no_target)
        except BadRecord as e:
            raise BadRecord(e.reason, f"{self.json_path} record {index}: {e}", "mmr",
                            record_id) from None


class _ArrayRecordExamples:
    """Lazy records of a built MMR split (``m2sa_jax.data.tfds_mmr``): example ``i`` → its
    MMRRecord, image bytes included. Only the examples asked for are read."""

    def __init__(self, data_dir: str, split: str, allow_no_target: bool):
        # tensorflow_datasets takes seconds to import; only this format needs it.
        from m2sa_jax.data import tfds_mmr

        if split not in tfds_mmr.SPLIT_FILES:
            raise ValueError(f"MMR split {split!r}: choose from {list(tfds_mmr.SPLIT_FILES)}")
        try:
            self.source = tfds_mmr.data_source(data_dir, split)
        except Exception as e:      # tfds raises several types for a missing or partial build
            raise FileNotFoundError(
                f"{data_dir}: no array_record MMR split {split!r} ({type(e).__name__}: {e}); "
                f"build it with python -m m2sa_jax.data.tfds_mmr --manual_dir DIR --data_dir "
                f"{data_dir}, or set data.mmr_format=json") from e
        self.decode = tfds_mmr.decode_example
        self.allow_no_target = allow_no_target
        self.where = f"{data_dir} {split}"
        self.file_label = tfds_mmr.SPLIT_FILES[split]     # example i is record i of this file

    def __len__(self) -> int:
        return len(self.source)

    def parse(self, index: int) -> MMRRecord:
        record, image = self.decode(self.source[index])
        record_id = record_label(self.file_label, index, record)
        try:
            return parse_record(record, record_id, f"{self.where} example {index}",
                                image_bytes=image, allow_no_target=self.allow_no_target)
        except BadRecord as e:
            raise BadRecord(e.reason, f"{self.where} example {index}: {e}", "mmr",
                            record_id) from None


class MMRDataset:
    """An MMR split: validated records, and :meth:`sample` to draw training/eval Samples.

    ``prompt``: "train" wraps each question in a random long-question template (answers as
    given), "val" uses the evaluation prompt (answers + "."), "raw" keeps questions as written.
    """

    name = "mmr"

    def __init__(self, json_path: str, image_root: str, *, max_questions: int = 3,
                 prompt: str = "train", released_pairing: bool = False, strict: bool = False,
                 skips: SkipCounter | None = None, check_images: bool = True,
                 validate_masks: bool = False, allow_no_target: bool = False,
                 lazy_records=None):
        if prompt not in ("train", "val", "raw"):
            raise ValueError(f"prompt must be 'train', 'val' or 'raw', not {prompt!r}")
        self.json_path, self.image_root = json_path, image_root
        self.max_questions, self.prompt, self.released_pairing = max_questions, prompt, released_pairing
        self.skips = skips if skips is not None else SkipCounter(strict=strict)
        if strict:
            self.skips.strict = True
        self.records: list[MMRRecord] = []
        self.lazy = lazy_records            # see training_split: records parsed when drawn
        if lazy_records is not None:
            return
        file_label = os.path.basename(json_path)
        seen_ids: dict[Any, str] = {}
        for index, raw in enumerate(read_json_records(json_path)):
            image_id = raw.get("image_id") if isinstance(raw, dict) else None
            record_id = record_label(file_label, index, raw)
            try:
                if image_id is not None and image_id in seen_ids:
                    raise BadRecord("duplicate_image", f"image_id {image_id} already read as "
                                    f"{seen_ids[image_id]}; keep one record per image")
                record = parse_record(raw, record_id, image_root, check_images,
                                      allow_no_target=allow_no_target)
                if validate_masks:
                    for refs in record.masks:
                        for ref in refs:
                            ref.decode()
            except BadRecord as e:
                self.skips.add(e.reason, record_id, f"{json_path} record {index} "
                               f"(image_id {image_id}): {e}", self.name)
                continue
            if image_id is not None:
                seen_ids[image_id] = record_id
            self.records.append(record)

    def __len__(self) -> int:
        return len(self.records) if self.lazy is None else len(self.lazy)

    def record(self, index: int) -> MMRRecord:
        """Record ``index`` (lazy datasets parse it now and raise BadRecord if it is bad)."""
        return self.records[index] if self.lazy is None else self.lazy.parse(index)

    def sample(self, index: int, rng: np.random.Generator | None = None,
               all_questions: bool = False) -> Sample:
        """A Sample of record ``index``: up to ``max_questions`` (or all) questions with their masks."""
        rec = self.record(index)
        n = len(rec.questions)
        if all_questions or n <= self.max_questions:
            picked = list(range(n))
        else:
            rng = rng if rng is not None else np.random.default_rng()
            picked = [int(i) for i in rng.choice(n, size=self.max_questions, replace=False)]
        answer_rows = list(range(len(picked))) if self.released_pairing else picked
        questions = [self._phrase_question(rec.questions[i], rng) for i in picked]
        answers = [self._phrase_answer(rec.answers[i]) for i in answer_rows]
        return Sample(source=self.name, record_id=rec.record_id, image_path=rec.image_path,
                      questions=questions, answers=answers, masks=[rec.masks[i] for i in answer_rows],
                      height=rec.height, width=rec.width, image_bytes=rec.image_bytes,
                      extra={"image_id": rec.image_id, "question_index": picked,
                             "raw_questions": [rec.questions[i] for i in picked]})

    def _phrase_question(self, question: str, rng) -> str:
        if self.prompt == "train":
            return conversation.training_question(question, rng if rng is not None else np.random.default_rng())
        if self.prompt == "val":                   # the evaluation code strips; training does not
            return conversation.validation_question(question.strip())
        return question

    def _phrase_answer(self, answer: str) -> str:
        return conversation.validation_answer(answer) if self.prompt == "val" else answer


def mmr_split_path(mmr_root: str, split: str) -> str:
    """``split`` as "train", "val", "test_mixed", ... or a file name → the JSON path."""
    name = split if split.endswith(".json") else f"MMR_{split}.json"
    return os.path.join(mmr_root, name)


MMR_FORMATS = ("json", "array_record")


def training_split(mmr_root: str, image_root: str, split: str = "train", *, fmt: str = "json",
                   **kwargs) -> MMRDataset:
    """A lazily read MMR split for training (module doc): ``fmt="json"`` reads
    ``mmr_root/MMR_{split}.json`` with images under ``image_root``; ``fmt="array_record"``
    reads the split built into the TFDS ``data_dir`` ``mmr_root`` (images inside it). Both give
    the same samples in the same order. ``kwargs``: MMRDataset's sampling options."""
    allow_no_target = kwargs.pop("allow_no_target", False)
    if fmt == "json":
        path = mmr_split_path(mmr_root, split)
        records = _JsonRecords(path, image_root, kwargs.pop("check_images", True), allow_no_target)
        return MMRDataset(path, image_root, lazy_records=records, **kwargs)
    if fmt == "array_record":
        records = _ArrayRecordExamples(mmr_root, split, allow_no_target)
        return MMRDataset(f"{mmr_root} {split}", "", lazy_records=records, **kwargs)
    raise ValueError(f"MMR format {fmt!r}: choose from {MMR_FORMATS}")


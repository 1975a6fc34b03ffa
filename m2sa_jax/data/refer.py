"""The REFER annotations (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF, and RefCOCOm which ships
the same files): ``<data_root>/<dataset>/refs(<split_by>).p`` plus ``instances.json``.

The refs file is a pickle. Full unpickling runs arbitrary code, so it is read with an
unpickler that builds only plain containers and scalars and refuses every other global.

Images: ``<data_root>/images/mscoco/images/train2014`` for the COCO-based sets and
``<data_root>/images/saiapr_tc-12`` for RefCLEF (the public code's layout).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
from typing import Iterable, Iterator

from m2sa_jax.data.sources import common
from m2sa_jax.data.types import MaskRef, Sample

SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}

_SAFE_GLOBALS = {"set", "frozenset", "list", "dict", "tuple", "str", "bytes", "int", "float", "bool",
                 "complex", "bytearray"}


class UnsafePickleError(pickle.UnpicklingError):
    pass


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, sets, strings and numbers; refuses any other object."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_GLOBALS:
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol ≤ 2 spells a bytes literal
            return _bytes_literal
        raise UnsafePickleError(
            f"{self._path}: refuses to load global {module}.{name}; a refs file holds only "
            "lists/dicts of strings and numbers. Re-download it from the dataset's official source.")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._path}: persistent ids are not allowed in a refs file")


def _bytes_literal(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError(f"bytes literal with encoding {encoding!r} is not plain data")
    return text.encode(encoding)


def load_plain_pickle(path: str):
    """Unpickle ``path`` allowing only builtin containers and scalars."""
    with open(path, "rb") as f:
        data = f.read()
    return _PlainDataUnpickler(io.BytesIO(data), path).load()


def default_image_dir(data_root: str, dataset: str) -> str:
    if dataset == "refclef":
        return os.path.join(data_root, "images", "saiapr_tc-12")
    return os.path.join(data_root, "images", "mscoco", "images", "train2014")


class Refer:
    """Index of one REFER dataset: refs by split/image, annotations, images, categories."""

    def __init__(self, data_root: str, dataset: str = "refcoco", split_by: str | None = None,
                 image_dir: str | None = None):
        self.dataset = dataset
        self.split_by = split_by or SPLIT_BY.get(dataset, "unc")
        self.data_dir = os.path.join(data_root, dataset)
        self.image_dir = image_dir or default_image_dir(data_root, dataset)
        self.refs_file = os.path.join(self.data_dir, f"refs({self.split_by}).p")
        self.instances_file = os.path.join(self.data_dir, "instances.json")
        refs = load_plain_pickle(self.refs_file)
        if not isinstance(refs, list):
            raise ValueError(f"{self.refs_file}: expected a list of refs, got {type(refs).__name__}")
        with open(self.instances_file) as f:
            instances = json.load(f)
        self.anns = {a["id"]: a for a in instances["annotations"]}
        self.imgs = {im["id"]: im for im in instances["images"]}
        self.cats = {c["id"]: c["name"] for c in instances["categories"]}
        self.refs = {}
        self.img_to_refs: dict[int, list[dict]] = {}
        for i, ref in enumerate(refs):
            missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref]
            if missing:
                raise ValueError(f"{self.refs_file} ref #{i}: missing {missing}")
            if ref["ann_id"] not in self.anns:
                raise ValueError(f"{self.refs_file} ref {ref['ref_id']}: ann_id {ref['ann_id']} not in {self.instances_file}")
            self.refs[ref["ref_id"]] = ref
            self.img_to_refs.setdefault(ref["image_id"], []).append(ref)

    def ref_ids(self, split: str | None = None) -> list[int]:
        """Ref ids of a split ("train", "val", "testA", …), or all; in file order."""
        return [rid for rid, r in self.refs.items() if split is None or r["split"] == split]

    def image_ids(self, ref_ids: Iterable[int]) -> list[int]:
        """Distinct image ids of the refs, in first-seen order."""
        seen: dict[int, None] = {}
        for rid in ref_ids:
            seen.setdefault(self.refs[rid]["image_id"], None)
        return list(seen)

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.imgs[image_id]["file_name"])

    def mask(self, ann_id: int, label: str = "") -> MaskRef:
        """The annotation's mask (polygons or RLE; several pieces are united)."""
        ann = self.anns[ann_id]
        img = self.imgs[ann["image_id"]]
        return common.coco_mask([ann["segmentation"]], int(img["height"]), int(img["width"]), label)

    def sentences(self, ref: dict) -> list[str]:
        return [s["sent"] for s in ref["sentences"]]

    def eval_samples(self, split: str, question: str = "{sent}", answer: str = "[SEG].") -> Iterator[Sample]:
        """One Sample per image of ``split``: every sentence of every ref a question with one
        [SEG] and the ref's mask (how referring segmentation is evaluated)."""
        split_refs = self.ref_ids(split)
        wanted = set(split_refs)
        for image_id in self.image_ids(split_refs):
            img = self.imgs[image_id]
            questions, answers, masks = [], [], []
            for ref in self.img_to_refs[image_id]:
                if ref["ref_id"] not in wanted:
                    continue
                for sent in self.sentences(ref):
                    questions.append(question.format(sent=sent))
                    answers.append(answer)
                    masks.append([self.mask(ref["ann_id"], sent)])
            yield Sample(source=self.dataset, record_id=f"{self.dataset}({self.split_by}):{split}:{image_id}",
                         image_path=self.image_path(image_id), questions=questions, answers=answers,
                         masks=masks, height=int(img["height"]), width=int(img["width"]))

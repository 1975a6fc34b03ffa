"""A small, seeded MMR-format dataset of drawn objects with parts (the embedded demo data).

Each image (default 160×160 PNG) shows 2–3 objects of five kinds, each built from 2–3 parts:

    cup: body, handle            lamp: shade, pole, base         chair: back, seat, legs
    bottle: cap, neck, body      car: windows, body, wheels

Objects may repeat (two cups) and overlap: later objects are drawn over earlier ones and every
mask is the *visible* pixels. Each object stands in a third of the picture of its own (left,
middle, right; its box centred in the middle 60 % of that third, at any height); a kind with
several instances names each by its third, the position word last, right before its ``[SEG]``
("the shade of the lamp on the right": why, docs/training.md "instance separation"); an only
instance is "the lamp", "the lamp's shade". Distractor shapes (not of any kind; a quarter in a
part's colour) sit in the background and sometimes in front. Each kind has its own hue family,
its parts differ in shade, with jitter and pixel noise on a greyish gradient: colour tells kinds
and most parts apart, which keeps the data learnable from scratch in minutes on a CPU. Beyond
colour it must learn which instance a question means, how many targets an answer has,
occluded and split parts, and which shapes are distractors. Two targets of one answer with the
same category name are always two instances of one kind (``evaluation.instances`` relies on it).

Questions mirror MMR's mix (each answer has one ``{seg}`` per target):

* object level, implicit, often multi-target: "Which objects in the picture can light up the
  room?" → "the lamp on the left {seg} and the lamp on the right {seg}";
* part level, implicit, across instances: "Which parts of the cups are used to lift it?" →
  "the handle of the cup on the left {seg} and the handle of the cup in the middle {seg}";
* part level, explicit: "Where is the cap of the bottle on the right?";
* mixed object + part: "Show the chair on the left and its part used to sit on." →
  "the chair on the left {seg} and its seat {seg}".

The JSON files follow the MMR record layout exactly (file_name, height, width, image_id,
not_exhaustive_category_ids, neg_category_ids, coco_url, questions, annotations, answers,
text_answers, raw_answers; annotations with bbox, segmentation {size, counts (RLE string)},
image_id, category_name ("cup" or "cup:handle", PACO style), category_id, sorted_category_id).
A part in separate pieces (car wheels, chair legs) is a list of RLEs, one per piece, which
decodes with a third axis, as some MMR annotations do.

``python -m m2sa_jax.data.synthetic --out DIR --train N --val M --seed S`` writes
``DIR/MMR_train.json``, ``DIR/MMR_val.json`` and ``DIR/images/{train,val}/*.png``; the same
arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from m2sa_jax.data import templates
from m2sa_jax.data.tokenizer_build import build_tokenizer_folder

VERSION = 4    # bumped when the same arguments start giving different images or questions

# kind → (width range, height range, what the object is for, {part: what it is for}) in draw order.
KINDS = {
    "cup": ((40, 52), (44, 56), "hold a hot drink",
            {"body": "hold the drink", "handle": "lift it"}),
    "lamp": ((44, 56), (72, 92), "light up the room",
             {"shade": "spread the light", "pole": "hold the shade up", "base": "keep it standing"}),
    "chair": ((48, 60), (64, 80), "be sat on",
              {"back": "support your back", "seat": "sit on", "legs": "stand on the floor"}),
    "bottle": ((30, 38), (72, 92), "store a liquid",
               {"cap": "open it", "neck": "pour the liquid", "body": "hold most of the liquid"}),
    "car": ((72, 90), (44, 54), "take you on a trip",
            {"windows": "look outside", "body": "carry the passengers", "wheels": "roll on the road"}),
}
PART_COLOURS = {    # one hue family per kind; its parts differ in lightness and shade
    ("cup", "body"): (200, 50, 50), ("cup", "handle"): (250, 140, 120),
    ("lamp", "shade"): (250, 230, 110), ("lamp", "pole"): (190, 160, 40), ("lamp", "base"): (120, 100, 20),
    ("chair", "back"): (170, 90, 30), ("chair", "seat"): (235, 150, 70), ("chair", "legs"): (105, 50, 15),
    ("bottle", "cap"): (30, 100, 40), ("bottle", "neck"): (120, 210, 120), ("bottle", "body"): (50, 160, 70),
    ("car", "windows"): (150, 200, 250), ("car", "body"): (40, 70, 200), ("car", "wheels"): (20, 20, 70),
}
PLURAL_PARTS = {"legs", "wheels", "windows"}
POSITIONS = ("left", "middle", "right")     # the picture's thirds; one object in each at most
OBJECT_IDS = {kind: i + 1 for i, kind in enumerate(KINDS)}
PART_IDS = {key: 100 + i for i, key in enumerate(PART_COLOURS)}
SORTED_IDS = {name: i for i, name in enumerate(sorted(list(KINDS) + [f"{k}:{p}" for k, p in PART_COLOURS]))}


# --------------------------------------------------------------------------- shapes
def _rect(h, w, x0, y0, x1, y1):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)


def _ellipse(h, w, cx, cy, rx, ry):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


def _trapezoid(h, w, x0, x1, y0, y1, top_frac):
    """Symmetric trapezoid between rows y0..y1, full width x0..x1 at the bottom."""
    yy, xx = np.mgrid[0:h, 0:w]
    t = np.clip((yy + 0.5 - y0) / max(y1 - y0, 1), 0, 1)
    half = (x1 - x0) / 2 * (top_frac + (1 - top_frac) * t)
    cx = (x0 + x1) / 2
    return (np.abs(xx + 0.5 - cx) <= half) & (yy >= y0) & (yy < y1)


def _parts(kind: str, h: int, w: int, x0: float, y0: float, bw: float, bh: float) -> dict[str, list[np.ndarray]]:
    """Full (unoccluded) masks of each part, a list of pieces per part, in draw order."""
    if kind == "cup":
        body = _rect(h, w, x0, y0 + 0.1 * bh, x0 + 0.72 * bw, y0 + bh)
        ring = _ellipse(h, w, x0 + 0.72 * bw, y0 + 0.52 * bh, 0.28 * bw, 0.3 * bh) & \
            ~_ellipse(h, w, x0 + 0.72 * bw, y0 + 0.52 * bh, 0.13 * bw, 0.14 * bh)
        handle = ring & ~body & _rect(h, w, x0 + 0.72 * bw, 0, w, h)
        return {"body": [body], "handle": [handle]}
    if kind == "lamp":
        shade = _trapezoid(h, w, x0, x0 + bw, y0, y0 + 0.35 * bh, 0.5)
        pole_w = max(8.0, 0.16 * bw)
        pole = _rect(h, w, x0 + bw / 2 - pole_w / 2, y0 + 0.35 * bh, x0 + bw / 2 + pole_w / 2, y0 + 0.88 * bh)
        base = _rect(h, w, x0 + 0.12 * bw, y0 + 0.88 * bh, x0 + 0.88 * bw, y0 + bh)
        return {"shade": [shade], "pole": [pole], "base": [base]}
    if kind == "chair":
        back = _rect(h, w, x0, y0, x0 + 0.22 * bw, y0 + 0.52 * bh)
        seat = _rect(h, w, x0, y0 + 0.52 * bh, x0 + bw, y0 + 0.66 * bh)
        leg_w = max(8.0, 0.14 * bw)
        legs = [_rect(h, w, x0 + 0.04 * bw, y0 + 0.66 * bh, x0 + 0.04 * bw + leg_w, y0 + bh),
                _rect(h, w, x0 + 0.96 * bw - leg_w, y0 + 0.66 * bh, x0 + 0.96 * bw, y0 + bh)]
        return {"back": [back], "seat": [seat], "legs": legs}
    if kind == "bottle":
        cap = _rect(h, w, x0 + 0.22 * bw, y0, x0 + 0.78 * bw, y0 + 0.15 * bh)
        neck = _trapezoid(h, w, x0 + 0.1 * bw, x0 + 0.9 * bw, y0 + 0.15 * bh, y0 + 0.42 * bh, 0.55)
        body = _rect(h, w, x0, y0 + 0.42 * bh, x0 + bw, y0 + bh)
        return {"cap": [cap], "neck": [neck], "body": [body]}
    if kind == "car":
        windows = _trapezoid(h, w, x0 + 0.18 * bw, x0 + 0.8 * bw, y0, y0 + 0.36 * bh, 0.7)
        body = _rect(h, w, x0, y0 + 0.36 * bh, x0 + bw, y0 + 0.8 * bh)
        r = 0.2 * bh
        wheels = [_ellipse(h, w, x0 + 0.22 * bw, y0 + bh - r, r, r),
                  _ellipse(h, w, x0 + 0.78 * bw, y0 + bh - r, r, r)]
        return {"windows": [windows], "body": [body], "wheels": wheels}
    raise ValueError(f"unknown kind {kind}")


def _noisy_colour(rng, base, jitter=15):
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-jitter, jitter, 3), 0, 255)


# --------------------------------------------------------------------------- one image
class _Scene:
    """Label map of drawn pieces (0 = background / distractor) plus the RGB canvas."""

    def __init__(self, rng, size):
        self.rng, self.size = rng, size
        h = w = size
        a = rng.uniform(90, 200) + rng.uniform(-20, 20, 3)         # greyish, slightly tinted
        b = rng.uniform(90, 200) + rng.uniform(-20, 20, 3)
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        self.rgb = (a * (1 - t) + b * t) * np.ones((1, w, 1), np.float32)
        self.rgb += rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        self.labels = np.zeros((h, w), np.int32)
        self.pieces: dict[int, tuple[int, str, int]] = {}    # label → (object index, part, piece)
        self.next_label = 1

    def paint(self, mask, colour, key=None, texture=6.0):
        colour = np.asarray(colour, np.float32)
        noise = self.rng.normal(0, texture, (int(mask.sum()), 3)).astype(np.float32)
        self.rgb[mask] = colour + noise
        if key is None:
            self.labels[mask] = 0
        else:
            self.labels[mask] = self.next_label
            self.pieces[self.next_label] = key
            self.next_label += 1

    def distractor(self):
        s, rng = self.size, self.rng
        cx, cy = rng.uniform(0, s, 2)
        rx, ry = rng.uniform(6, 18, 2)
        shape = (_ellipse(s, s, cx, cy, rx, ry) if rng.random() < 0.5
                 else _rect(s, s, cx - rx, cy - ry, cx + rx, cy + ry))
        base = list(PART_COLOURS.values())[int(rng.integers(len(PART_COLOURS)))] \
            if rng.random() < 0.25 else rng.uniform(0, 255, 3)
        self.paint(shape, _noisy_colour(rng, base, 40))


def position(centre_x: float, size: int) -> str:
    """The third of the picture (``POSITIONS``) a horizontal position falls in."""
    return POSITIONS[min(int(centre_x * 3 // size), 2)]


def _layout(rng, size, kinds):
    """Boxes (kind, x0, y0, w, h): each object in a third of the picture of its own, its box
    centred in the middle 60 % of that third (pushed inwards at the border: the widest kind,
    90 px of 160, still has its centre in its third), at any height."""
    boxes = []
    for kind, column in zip(kinds, rng.permutation(len(POSITIONS))):
        (wl, wh), (hl, hh) = KINDS[kind][0], KINDS[kind][1]
        bw, bh = rng.uniform(wl, wh) * size / 160, rng.uniform(hl, hh) * size / 160
        centre = (int(column) + rng.uniform(0.2, 0.8)) * size / 3
        x0 = float(np.clip(centre - bw / 2, 0, size - bw))
        boxes.append((kind, x0, rng.uniform(0, size - bh), bw, bh))
    return boxes


def _draw(rng, size, kinds, min_visible=0.55, min_pixels=30):
    """Draws a scene; returns None if some part is too occluded (the caller retries)."""
    scene = _Scene(rng, size)
    for _ in range(int(rng.integers(1, 4))):
        scene.distractor()
    boxes = _layout(rng, size, kinds)
    full: dict[tuple[int, str], list[np.ndarray]] = {}
    for obj, (kind, x0, y0, bw, bh) in enumerate(boxes):
        for part, pieces in _parts(kind, size, size, x0, y0, bw, bh).items():
            colour = _noisy_colour(rng, PART_COLOURS[(kind, part)])
            full[(obj, part)] = pieces
            for p, piece in enumerate(pieces):
                scene.paint(piece, colour, (obj, part, p))
    if rng.random() < 0.5:
        scene.distractor()
    visible: dict[tuple[int, str], list[np.ndarray]] = {}
    for label, (obj, part, p) in scene.pieces.items():
        visible.setdefault((obj, part), [None] * len(full[(obj, part)]))[p] = scene.labels == label
    for key, pieces in visible.items():
        for p, vis in enumerate(pieces):
            area = full[key][p].sum()
            if vis.sum() < max(min_pixels, min_visible * area):
                return None
    return scene, boxes, visible


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _names(boxes, size) -> tuple[dict[str, list[int]], dict[int, str]]:
    """Objects by kind, left to right, and each one's name ("the lamp on the left"; "the lamp")."""
    centre_x = {obj: box[1] + box[3] / 2 for obj, box in enumerate(boxes)}
    kinds_present: dict[str, list[int]] = {}
    for obj in sorted(range(len(boxes)), key=lambda o: centre_x[o]):
        kinds_present.setdefault(boxes[obj][0], []).append(obj)
    names = {}
    for kind, objs in kinds_present.items():
        for obj in objs:
            pos = position(centre_x[obj], size)
            names[obj] = (f"the {kind}" if len(objs) == 1 else
                          f"the {kind} {'in the' if pos == 'middle' else 'on the'} {pos}")
    return kinds_present, names


def _questions(rng, names, anns, kinds_present):
    """Candidate (question, text_answer, [annotation keys], raw answer) tuples of one image."""
    out = []
    for kind, objs in kinds_present.items():
        purpose, parts = KINDS[kind][2], KINDS[kind][3]
        plural = len(objs) > 1
        out.append((f"Which {'objects' if plural else 'object'} in the picture can {purpose}?",
                    [(o, None) for o in objs]))
        for part, fn in parts.items():
            out.append((f"Which part{'s' if plural else ''} of the {kind}{'s are' if plural else ' is'} "
                        f"used to {fn}?", [(o, part) for o in objs]))
        o = objs[int(rng.integers(len(objs)))]
        part = list(parts)[int(rng.integers(len(parts)))]
        verb = "are" if part in PLURAL_PARTS else "is"
        out.append((f"Where {verb} the {part} of {names[o]}?", [(o, part)]))
        part = list(parts)[int(rng.integers(len(parts)))]
        out.append((f"Show {names[o]} and its part used to {parts[part]}.", [(o, None), (o, part)]))
    kinds = list(kinds_present)
    if len(kinds) >= 2:
        a, b = rng.choice(len(kinds), 2, replace=False)
        ka, kb = kinds[int(a)], kinds[int(b)]
        targets = [(o, None) for o in kinds_present[ka] + kinds_present[kb]]
        if len(targets) <= 4:
            out.append((f"Which objects can {KINDS[ka][2]} or {KINDS[kb][2]}?", targets))
    result = []
    for question, targets in out:
        words = []
        for o, part in targets:
            if part is None:
                words.append(f"{names[o]}")
            elif (o, None) in targets:
                words.append(f"its {part}")
            else:    # the position word last: "the shade of the lamp on the left"
                words.append(f"the {part} of {names[o]}" if names[o].endswith(POSITIONS)
                             else f"{names[o]}'s {part}")
        text = _join([f"{w} {{seg}}" for w in words])
        raw = _join(words)
        result.append((question, text, [anns[t] for t in targets], raw))
    return result


def make_record(rng: np.random.Generator, image_id: int, size: int, file_name: str):
    """(MMR record, RGB uint8 image) of one synthetic image."""
    for _ in range(200):
        n = int(rng.integers(2, 4))
        kinds = [str(k) for k in rng.choice(list(KINDS), n)]
        if rng.random() < 0.5:                       # encourage repeated kinds: multi-instance questions
            kinds[-1] = kinds[0]
        drawn = _draw(rng, size, kinds)
        if drawn is not None:
            break
    else:
        raise RuntimeError(f"synthetic image {image_id}: no layout without heavy occlusion in 200 tries")
    scene, boxes, visible = drawn
    kinds_present, names = _names(boxes, size)

    anns, all_anns = {}, []
    for obj, (kind, *_box) in enumerate(boxes):
        object_mask = np.zeros((size, size), bool)
        for part in KINDS[kind][3]:
            pieces = visible[(obj, part)]
            object_mask |= np.any(pieces, axis=0)
            seg = _rle(pieces[0]) if len(pieces) == 1 else [_rle(p) for p in pieces]
            name = f"{kind}:{part}"
            anns[(obj, part)] = {"bbox": _bbox(np.any(pieces, axis=0)), "segmentation": seg,
                                 "image_id": image_id, "category_name": name,
                                 "category_id": PART_IDS[(kind, part)], "sorted_category_id": SORTED_IDS[name]}
        anns[(obj, None)] = {"bbox": _bbox(object_mask), "segmentation": _rle(object_mask),
                             "image_id": image_id, "category_name": kind,
                             "category_id": OBJECT_IDS[kind], "sorted_category_id": SORTED_IDS[kind]}
    for obj in range(len(boxes)):
        all_anns.append(anns[(obj, None)])
        all_anns.extend(anns[(obj, part)] for part in KINDS[boxes[obj][0]][3])

    candidates = _questions(rng, names, anns, kinds_present)
    order = rng.permutation(len(candidates))[:6]
    chosen = [candidates[int(i)] for i in order]
    present = {OBJECT_IDS[k] for k in kinds_present}
    record = {
        "file_name": file_name, "height": size, "width": size, "image_id": image_id,
        "not_exhaustive_category_ids": [],
        "neg_category_ids": sorted(set(OBJECT_IDS.values()) - present),
        "coco_url": "",
        "questions": [q for q, _, _, _ in chosen],
        "annotations": all_anns,
        "answers": [a for _, _, a, _ in chosen],
        "text_answers": [t for _, t, _, _ in chosen],
        "raw_answers": [r for _, _, _, r in chosen],
    }
    rgb = np.clip(np.rint(scene.rgb), 0, 255).astype(np.uint8)
    return record, rgb


def write_split(out_dir: str, split: str, count: int, seed: int, size: int = 160,
                first_image_id: int = 1, progress: Callable[[int], None] | None = None) -> str:
    """Writes ``count`` images under ``out_dir/images/<split>/`` and ``out_dir/MMR_<split>.json``."""
    image_dir = os.path.join(out_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    split_key = sum(ord(c) for c in split)
    records = []
    for i in range(count):
        rng = np.random.default_rng([seed, split_key, i])
        image_id = first_image_id + i
        file_name = f"{split}/{image_id:06d}.png"
        record, rgb = make_record(rng, image_id, size, file_name)
        Image.fromarray(rgb).save(os.path.join(out_dir, "images", file_name), optimize=False)
        records.append(record)
        if progress:
            progress(i)
    path = os.path.join(out_dir, f"MMR_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    return path


def generate(out_dir: str, train: int, val: int, seed: int = 0, size: int = 160) -> dict[str, str]:
    """Both splits; val image ids follow the train ones so ids are unique across the dataset."""
    return {"train": write_split(out_dir, "train", train, seed, size, first_image_id=1),
            "val": write_split(out_dir, "val", val, seed, size, first_image_id=train + 1)}


def prepare(data) -> tuple[str, str]:
    """The dataset a config's ``data`` section describes (``root``, ``train_images``,
    ``val_images``, ``generator_seed``, ``vocab_size``, ``model_max_length``), generated with its
    tokenizer on first use and regenerated when those values or the generator change. Returns
    (root, tokenizer folder)."""
    root = data.root
    tok_dir = os.path.join(root, "tokenizer")
    marker = os.path.join(root, "COMPLETE")
    want = (f"{data.train_images} {data.val_images} {data.generator_seed} {data.vocab_size} "
            f"v{VERSION}")
    if not (os.path.isfile(marker) and open(marker).read() == want):
        generate(root, data.train_images, data.val_images, seed=data.generator_seed)
        corpus = []
        for split in ("train", "val"):
            with open(os.path.join(root, f"MMR_{split}.json")) as f:
                for rec in json.load(f):
                    corpus += rec["questions"] + [a.format(seg="") for a in rec["text_answers"]]
        corpus += list(templates.long_questions(expand=True)) + [templates.VAL_QUESTION_TEMPLATE]
        corpus += ["A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions. USER: ASSISTANT:"] * 50
        build_tokenizer_folder(tok_dir, corpus, data.vocab_size, data.model_max_length)
        with open(marker, "w") as f:
            f.write(want)
    return root, tok_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a seeded synthetic MMR-format dataset.")
    parser.add_argument("--out", required=True, help="output folder (MMR_*.json + images/)")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=160, help="image side in pixels")
    args = parser.parse_args(argv)
    paths = generate(args.out, args.train, args.val, args.seed, args.size)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()

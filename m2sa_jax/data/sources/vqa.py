"""Visual instruction conversations without masks: LLaVA-Instruct-150k.

``root/llava_dataset/llava_instruct_150k.json`` (a list of {"id", "image", "conversations":
[{"from": "human"|"gpt", "value"}]}) with images in ``root/coco/train2017``. As in the public
code: a leading non-human turn is dropped, turns must alternate human/gpt, and the ``<image>``
mark is removed from the turn that carries it (the conversation template puts it first). All
turns form one multi-round conversation (``Sample.multi_round``), as the public VQA dataset
builds it, not one conversation per turn.
"""

from __future__ import annotations

import json
import os

import numpy as np

from m2sa_jax.data.types import IMAGE_TOKEN, BadRecord, Sample


class VQASource:
    name = "vqa"

    def __init__(self, root: str, data: str = "llava_instruct_150k"):
        self.json_path = os.path.join(root, "llava_dataset", f"{data}.json")
        self.image_dir = os.path.join(root, "coco", "train2017")
        with open(self.json_path) as f:
            self.items = json.load(f)
        if not isinstance(self.items, list):
            raise ValueError(f"{self.json_path}: expected a list of conversations")

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int, rng: np.random.Generator) -> Sample:
        del rng  # the whole conversation is used
        item = self.items[index]
        record_id = f"vqa:{item.get('id', index)}"
        turns = list(item.get("conversations", []))
        if turns and turns[0].get("from") != "human":
            turns = turns[1:]
        questions, answers = [], []
        for j, turn in enumerate(turns):
            expected = "human" if j % 2 == 0 else "gpt"
            if turn.get("from") != expected:
                raise BadRecord("bad_turns", f"{self.json_path} record {record_id}: turn {j} is from {turn.get('from')!r}, expected {expected!r}")
            value = turn["value"]
            if IMAGE_TOKEN in value:
                value = value.replace(IMAGE_TOKEN, "").strip()
            (questions if expected == "human" else answers).append(value)
        if not answers or len(questions) != len(answers):
            raise BadRecord("bad_turns", f"{self.json_path} record {record_id}: needs human/gpt pairs, got {len(questions)} questions and {len(answers)} answers")
        return Sample(source="vqa", record_id=record_id, image_path=os.path.join(self.image_dir, item["image"]),
                      questions=questions, answers=answers, masks=[[] for _ in answers],
                      multi_round=True)

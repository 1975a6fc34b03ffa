"""What every benchmark reader shares: the split tables, the evaluation turns of a sample (the
public evaluation prompt and teacher-forced answers), and the MMR splits."""

from __future__ import annotations

import os
from typing import Sequence


from m2sa_jax.data.conversation import validation_answer, validation_question
from m2sa_jax.data.mmr import MMRDataset
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import Sample


MMR_SPLITS = {
    "val": "MMR_val.json",
    "test_mixed": "MMR_test_mixed.json",
    "test_obj_only": "MMR_test_obj_only.json",
    "test_part_only": "MMR_test_part_only.json",
}
REFER_SPLITS = {
    "refcoco": ("unc", ("val", "testA", "testB")),
    "refcoco+": ("unc", ("val", "testA", "testB")),
    "refcocog": ("umd", ("val", "test")),
}
RELEASED_GROUP_SIZES = (6, 5, 4)
PAPER_CATEGORY_RANGE = (4, 6)


def with_eval_turns(sample: Sample, questions: Sequence[str] | None = None,
                     answers: Sequence[str] | None = None) -> Sample:
    sample.extra["eval_questions"] = list(questions) if questions is not None else [
        validation_question(q.strip()) for q in sample.questions]   # the public eval strips
    sample.extra["eval_answers"] = list(answers) if answers is not None else [
        validation_answer(a) for a in sample.answers]
    return sample


# ----------------------------------------------------------------------------------- MMR

def mmr(mmr_root: str, image_root: str, split: str = "val", strict: bool = False,
        **reader_kwargs) -> tuple[list[Sample], SkipCounter]:
    """An MMR split (``val``, ``test_mixed``, ``test_obj_only``, ``test_part_only``) in
    validation mode: every question of every record, each with its own teacher-forced answer.

    ``mmr_root`` holds the ``MMR_*.json`` files; ``image_root`` the COCO images the records'
    ``file_name`` s resolve under. The MMR reader decides object/part per mask
    (``MaskRef.kind``), which the metrics break down by; ``reader_kwargs`` go to it.
    """
    if split not in MMR_SPLITS:
        raise ValueError(f"MMR split {split!r} is not one of {sorted(MMR_SPLITS)}")
    dataset = MMRDataset(os.path.join(mmr_root, MMR_SPLITS[split]), image_root, prompt="raw",
                         strict=strict, **reader_kwargs)
    samples = [with_eval_turns(dataset.sample(i, all_questions=True)) for i in range(len(dataset))]
    return samples, dataset.skips



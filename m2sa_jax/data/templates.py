"""Question and answer templates, as data.

The strings are the ones the public LISA and MMR (M²SA) training code samples from; they
are reproduced verbatim (typos included, e.g. "asegment") because the released models
were trained on exactly these prompts. Question templates start with ``<image>\\n`` as
upstream; :func:`strip_image_prefix` gives the bare user turn that a
:class:`~m2sa_jax.data.types.Sample` stores.

Which lists each source uses (as the public MMR code does, with its ``--use_expand_question_list``
behaviour on):

- sem_seg and refer_seg: ``SHORT_QUESTION_LIST + EXPAND_QUESTION_LIST`` ({class_name}),
  answers from ``ANSWER_LIST`` (single target).
- MMR and ReasonSeg: ``LONG_QUESTION_LIST + EXPAND_LONG_QUESTION_LIST`` ({sent}); MMR answers
  are the dataset's own ``text_answers``.
- ``EXPLANATORY_QUESTION_LIST`` is appended after the question when an explanation is asked for.
"""

from __future__ import annotations

from m2sa_jax.data.types import IMAGE_TOKEN, SEG_TOKEN

_P = IMAGE_TOKEN + "\n"

# LISA (utils/utils.py): referring / semantic-class questions.
SHORT_QUESTION_LIST = [
    _P + "Can you segment the {class_name} in this image?",
    _P + "Please segment the {class_name} in this image.",
    _P + "What is {class_name} in this image? Please respond with segmentation mask.",
    _P + "What is {class_name} in this image? Please output segmentation mask.",
]

# LISA: reasoning questions built around a free-form sentence.
LONG_QUESTION_LIST = [
    _P + "{sent} Please respond with segmentation mask.",
    _P + "{sent} Please output segmentation mask.",
]

EXPLANATORY_QUESTION_LIST = [
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
]

# LISA's answers carry the [SEG] token literally.
ANSWER_LIST = [
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
]

# MMR (utils/utils.py): the same answers with a {seg} slot, filled with one or more [SEG].
MMR_ANSWER_LIST = [
    "It is {seg}.",
    "Sure, {seg}.",
    "Sure, it is {seg}.",
    "Sure, the segmentation result is {seg}.",
    "{seg}.",
]

SINGLE_ANSWER_LIST = [
    "{class_name} is {seg}.",
    "The segmentation result of {class_name} is {seg}.",
    "{seg}.",
]

MULTI_ANSWER_LIST = [
    "{class_name} are {seg}, separately.",
    "{class_name} are {seg}.",
    "Sure, {class_name} are {seg}, separately.",
    "Sure, {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}, separately.",
    "Sure, the segmentation result of {class_name} are {seg}.",
    "Sure, the segmentation result of {class_name} are {seg}, separately.",
    "Sure, they are {seg}.",
    "They are {seg}.",
    "{seg}.",
]

MR_SINGLE_ANSWER_LIST = [
    "{class_name} is [SEG].",
]

MR_MULTI_ANSWER_LIST = [
    "{class_name} are {seg}, separately.",
    "{class_name} are {seg}.",
    "Sure, {class_name} are {seg}, separately.",
    "Sure, {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}, separately.",
    "Sure, the segmentation result of {class_name} are {seg}.",
    "Sure, the segmentation result of {class_name} are {seg}, separately.",
]

# MMR: extra phrasings appended to LONG_QUESTION_LIST / SHORT_QUESTION_LIST.
EXPAND_LONG_QUESTION_LIST = [
    _P + "{sent} Provide the segmentation mask.",
    _P + "{sent} Output the segmentation mask.",
    _P + "{sent} Please show the segmentation mask.",
    _P + "{sent} I'd appreciate segmentation masks.",
    _P + "{sent} Please highlight the segmentation mask.",
]

EXPAND_QUESTION_LIST = [
    _P + "Could you identify the {class_name} in this picture?",
    _P + "Are you able to delineate the {class_name} in the image?",
    _P + "Can you pinpoint the {class_name} in this photo?",
    _P + "Is it possible for you to highlight the {class_name} in this image?",
    _P + "Can you discern the {class_name} in the given picture?",
    _P + "Can you provide me with asegment of the {class_name}?",
    _P + "Please perform image segmentation to isolate the {class_name} in this image.",
    _P + "Help me segment the {class_name}.",
    _P + "Would you be willing to segment the {class_name}?",
    _P + "Can you identify {class_name} in this picture? Please provide a segmentation mask.",
    _P + "Could you point out {class_name} in this image and show it with a segmentation mask?",
    _P + "In this image, where is {class_name}? I'd appreciate a segmentation mask.",
    _P + "Please highlight {class_name} in this image using a segmentation mask.",
    _P + "In the picture provided, can you show where {class_name} is with a segmentation mask?",
]

# Evaluation prompt of the public code: "<image>\n {question} Please output segmentation mask."
VAL_QUESTION_TEMPLATE = _P + " {sent} Please output segmentation mask."

# Paper Table 4 / §A.10: several classes of one image in one prompt.
MULTI_CLASS_QUESTION_TEMPLATE = _P + "Can you segment the {class_names}?"


def short_questions(expand: bool = True, released_weights: bool = False) -> list[str]:
    """Class-name questions (sem_seg, refer_seg); MMR's training appends the expanded list.

    ``released_weights``: the public M²SA training appends the expanded list to the shared
    module-level list once per dataset that uses it (sem_seg and refer_seg), so the list its
    models were trained with holds every expanded question twice (4 + 2 × 14 entries, drawn
    uniformly). This reproduces that distribution.
    """
    if not expand:
        return list(SHORT_QUESTION_LIST)
    return SHORT_QUESTION_LIST + EXPAND_QUESTION_LIST * (2 if released_weights else 1)


def long_questions(expand: bool = True) -> list[str]:
    """Sentence questions (MMR, ReasonSeg); MMR's training appends the expanded list."""
    return LONG_QUESTION_LIST + (EXPAND_LONG_QUESTION_LIST if expand else [])


def strip_image_prefix(question: str) -> str:
    """``"<image>\\nQ"`` → ``"Q"``: Sample.questions hold the bare user turn."""
    return question[len(_P):] if question.startswith(_P) else question


def join_class_names(names: list[str]) -> str:
    """"a", "a and b", "a, b, and c": the paper's multi-class prompt (Table 4) enumeration."""
    if len(names) <= 1:
        return "".join(names)
    if len(names) == 2:
        return f"{names[0]} and {names[1]}"
    return ", ".join(names[:-1]) + ", and " + names[-1]


def join_targets(items: list[str]) -> str:
    """"a", "a and b", "a, b and c": how MMR's training code enumerates targets and [SEG]s."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def seg_slots(n: int) -> str:
    """``n`` [SEG] tokens enumerated as multi-target answers list them."""
    return join_targets([SEG_TOKEN] * n)

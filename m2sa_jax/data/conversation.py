"""The llava_v1 conversation, its token ids and its training labels (SPEC §2).

Shared by training, evaluation and the predictor, so that all three feed the model the exact
ids the released models saw.

Prompt (LLaVA ``conv_llava_v1``, separator style TWO)::

    {SYSTEM} USER: <im_start><image><im_end>\\n{question} ASSISTANT: {answer}</s>USER: ... </s>

``<image>`` is wrapped in ``<im_start>``/``<im_end>`` and becomes the placeholder id -200
(:data:`~m2sa_jax.data.tokenizer.IMAGE_TOKEN_INDEX`); the model splices the 256 CLIP rows in
there. The user turn of the first round carries the image.

Labels follow the public collate function's arithmetic, round by round: the conversation is
cut at ``"</s>"``; for each round ``round_len = len(ids(round))`` (its BOS stands in for the
``</s>`` that the cut removed) and ``instruction_len = len(ids(round up to "ASSISTANT: ")) - 2``
(minus its BOS and the lone "▁" that the trailing space of ``"ASSISTANT: "`` encodes to, which in
the full text merges into the answer's first piece or, before ``[SEG]``, is stripped). The first
position (BOS) and each round's instruction are IGNORE; answers and their ``</s>`` are
supervised. With the legacy tokenizer this arithmetic is exact: :func:`tokenize_conversation`
checks that the rounds add up to the whole sequence (the public code asserts the same) and
raises ``BadRecord("label_mismatch")`` otherwise. The public code has two quirks that do not
arise here: its guard ``if conv.sep2 not in conversation: break`` leaves every *later*
conversation of the batch unmasked (we raise per conversation instead), and it truncates the
padded batch to ``model_max_length - 255`` tokens silently (we skip the sample, see below).

Truncation: the expanded sequence (each ``<image>`` is 256 rows, i.e. 255 more positions) must fit
``model_max_length``. Every conversation ends with a supervised answer + ``</s>``, so any cut
drops supervision (and usually a ``[SEG]``): such a sample raises ``BadRecord("too_long")`` and
the loader counts and skips it instead of cutting it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from m2sa_jax.data import templates
from m2sa_jax.data.tokenizer import IMAGE_TOKEN_INDEX, LegacyLlamaTokenizer
from m2sa_jax.data.types import (IGNORE_INDEX, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN,
                                 SEG_TOKEN, BadRecord, Sample)

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("USER", "ASSISTANT")
SEP = " "
SEP2 = "</s>"
NUM_IMAGE_TOKENS = 256          # CLIP ViT-L/14 @224: 16×16 patch rows replace one <image>


def build_prompt(turns: Sequence[tuple[str, str | None]]) -> str:
    """llava_v1 prompt from (user, assistant) turns; ``None`` answer leaves "ASSISTANT:" open."""
    text = SYSTEM + SEP
    for user, assistant in turns:
        text += f"{ROLES[0]}: {user}{SEP}"
        text += f"{ROLES[1]}: {assistant}{SEP2}" if assistant else f"{ROLES[1]}:"
    return text


def wrap_image(prompt: str) -> str:
    """``<image>`` → ``<im_start><image><im_end>`` (use_mm_start_end, as the models were trained)."""
    return prompt.replace(IMAGE_TOKEN, IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN)


def training_question(sentence: str, rng: np.random.Generator,
                      question_list: Sequence[str] | None = None) -> str:
    """A random sentence template (MMR: long + expanded list), as a bare user turn."""
    question_list = question_list or templates.long_questions(expand=True)
    template = question_list[int(rng.integers(len(question_list)))]
    return templates.strip_image_prefix(template.format(sent=sentence))


def validation_question(sentence: str) -> str:
    """``" {q} Please output segmentation mask."``: the evaluation turn (leading space kept)."""
    return templates.strip_image_prefix(templates.VAL_QUESTION_TEMPLATE.format(sent=sentence))


def validation_answer(answer: str) -> str:
    return answer + "."


def sample_prompts(sample: Sample, multi_round: bool = False) -> list[str]:
    """The conversations of a sample, ``<image>`` already wrapped.

    The public code makes one single-round conversation per question (each reads the same image
    once encoded); ``multi_round=True`` chains all turns into one conversation instead (VQA).
    """
    if not sample.questions:
        raise BadRecord("empty_questions", f"{sample.record_id}: the sample has no question")
    turns = [(q, a) for q, a in zip(sample.questions, sample.answers)]
    if multi_round:
        first = [(IMAGE_TOKEN + "\n" + turns[0][0], turns[0][1])] + turns[1:]
        return [wrap_image(build_prompt(first))]
    return [wrap_image(build_prompt([(IMAGE_TOKEN + "\n" + q, a)])) for q, a in turns]


@dataclasses.dataclass
class TokenizedConversation:
    input_ids: np.ndarray        # int32 [T], IMAGE_TOKEN_INDEX at the image
    labels: np.ndarray           # int32 [T], IGNORE_INDEX where not supervised
    num_seg: int                 # [SEG] tokens in the ids (= masks this conversation needs)
    expanded_length: int         # T + 255 per image: the length the LLM actually sees
    prompt: str


def _ids(tokenizer: LegacyLlamaTokenizer, text: str, has_image: bool) -> list[int]:
    return tokenizer.tokenize_with_image(text) if has_image else tokenizer.encode(text)


def tokenize_conversation(prompt: str, tokenizer: LegacyLlamaTokenizer, record_id: str = "?",
                          max_length: int | None = None) -> TokenizedConversation:
    """Ids and labels of one llava_v1 conversation (module doc: the public arithmetic)."""
    has_image = IMAGE_TOKEN in prompt
    ids = _ids(tokenizer, prompt, has_image)
    labels = list(ids)
    sep = SEP + ROLES[1] + ": "
    rounds = prompt.split(SEP2)
    if len(rounds) < 2:
        raise BadRecord("label_mismatch", f"{record_id}: conversation has no {SEP2}-terminated answer")
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            raise BadRecord("label_mismatch",
                            f"{record_id}: a round must contain {sep!r} exactly once: {rou[:80]!r}")
        round_len = len(_ids(tokenizer, rou, has_image))
        instruction_len = len(_ids(tokenizer, parts[0] + sep, has_image)) - 2
        labels[cur: cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur: cur + instruction_len])
        cur += round_len
    if cur != len(ids):
        raise BadRecord("label_mismatch", f"{record_id}: rounds add up to {cur} tokens but the "
                        f"conversation has {len(ids)}; the text breaks the llava_v1 template")
    ids_arr = np.asarray(ids, np.int32)
    expanded = len(ids) + (NUM_IMAGE_TOKENS - 1) * int((ids_arr == IMAGE_TOKEN_INDEX).sum())
    limit = tokenizer.model_max_length if max_length is None else max_length
    if expanded > limit:
        raise BadRecord("too_long", f"{record_id}: {expanded} tokens (image rows included) exceed "
                        f"model_max_length {limit}; truncating would drop supervised answer tokens")
    seg = tokenizer.seg_token_id
    return TokenizedConversation(ids_arr, np.asarray(labels, np.int32), int((ids_arr == seg).sum()),
                                 expanded, prompt)


def tokenize_sample(sample: Sample, tokenizer: LegacyLlamaTokenizer, multi_round: bool = False,
                    max_length: int | None = None) -> list[TokenizedConversation]:
    """All conversations of a sample, checking that each has as many [SEG] as masks."""
    out = []
    prompts = sample_prompts(sample, multi_round)
    mask_groups = [sum(len(m) for m in sample.masks)] if multi_round else [len(m) for m in sample.masks]
    for i, (prompt, n_masks) in enumerate(zip(prompts, mask_groups)):
        conv = tokenize_conversation(prompt, tokenizer, f"{sample.record_id} question {i}", max_length)
        if conv.num_seg != n_masks:
            raise BadRecord("seg_count", f"{sample.record_id} question {i}: {conv.num_seg} {SEG_TOKEN} "
                            f"tokens but {n_masks} masks")
        out.append(conv)
    return out

"""llava_v1 prompts → ids and labels on the real LLaMA vocabulary, against hand-derived ids."""

import numpy as np
import pytest

from m2sa_jax.data import conversation as conv
from m2sa_jax.data.tokenizer import IMAGE_TOKEN_INDEX, LegacyLlamaTokenizer
from m2sa_jax.data.types import IGNORE_INDEX, BadRecord, Sample
from tests.support import llama_vocab

SEG, IM_START, IM_END = 32000, 32001, 32002


@pytest.fixture(scope="module")
def tok():
    return LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder())


def pieces(tok, *names):
    ids = [tok.sp.piece_to_id(n) for n in names]
    assert 0 not in ids, names          # every piece must exist (0 is <unk>)
    return ids


def head(tok):
    """BOS, the system text + 'USER:' as one chunk (it ends at <im_start>), the image."""
    return [1] + tok.sp.encode(conv.SYSTEM + " USER:") + [IM_START, IMAGE_TOKEN_INDEX, IM_END]


def sample(questions, answers, n_masks):
    return Sample("test", "rec", "unused.png", questions, answers, [[None] * n for n in n_masks])


def test_prompt_text_is_llava_v1():
    text = conv.build_prompt([("<image>\nQ1", "A1"), ("Q2", "A2")])
    assert text == (conv.SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>")
    assert conv.wrap_image("<image>\nQ") == "<im_start><image><im_end>\nQ"
    assert conv.build_prompt([("Q", None)]).endswith("USER: Q ASSISTANT:")


def test_validation_prompt_ids_and_labels(tok):
    s = sample([conv.validation_question("Which cup?")], [conv.validation_answer("cup_1 [SEG], left")], [1])
    assert s.questions[0] == " Which cup? Please output segmentation mask."
    (c,) = conv.tokenize_sample(s, tok)
    # "\n " after <im_end> disappears; the question starts with "▁Which"
    instruction = pieces(tok, "▁Which", "▁cup", "?", "▁Please", "▁output", "▁segment", "ation",
                         "▁mask", ".", "▁A", "SS", "IST", "ANT", ":")
    answer = pieces(tok, "▁cup", "_", "1") + [SEG] + pieces(tok, "▁,", "▁left", ".") + [2]
    expected = head(tok) + instruction + answer
    assert c.input_ids.tolist() == expected
    n_ignored = len(expected) - len(answer)
    assert c.labels.tolist() == [IGNORE_INDEX] * n_ignored + answer
    assert c.num_seg == 1
    assert c.expanded_length == len(expected) + 255


def test_training_prompt_seg_dot_and_multi_target(tok):
    rng = np.random.default_rng(0)
    q = conv.training_question("What holds the drink?", rng)
    assert q.startswith("What holds the drink? ") and "segmentation mask" in q.lower()
    s = sample(["Which handles?"], ["cup_1's handle [SEG] and cup_2's handle [SEG]."], [2])
    (c,) = conv.tokenize_sample(s, tok)
    answer = (pieces(tok, "▁cup", "_", "1", "'", "s", "▁handle") + [SEG]
              + pieces(tok, "▁and", "▁cup", "_", "2", "'", "s", "▁handle") + [SEG]
              + pieces(tok, "▁.") + [2])
    instruction = tok.sp.encode("Which handles? ASSISTANT:")
    assert c.input_ids.tolist() == head(tok) + instruction + answer
    supervised = c.labels != IGNORE_INDEX
    assert c.labels[supervised].tolist() == answer
    assert c.num_seg == 2


def test_multi_round_masks_every_instruction(tok):
    s = sample(["Q one?", "Q two?"], ["[SEG].", "It is [SEG]"], [1, 1])
    (c,) = conv.tokenize_sample(s, tok, multi_round=True)
    a1 = [SEG] + pieces(tok, "▁.") + [2]
    round2 = tok.sp.encode("USER: Q two? ASSISTANT:")       # chunk after </s>: own dummy prefix
    a2 = pieces(tok, "▁It", "▁is") + [SEG] + [2]
    expected = head(tok) + tok.sp.encode("Q one? ASSISTANT:") + a1 + round2 + a2
    assert c.input_ids.tolist() == expected
    labels = c.labels.tolist()
    want = [IGNORE_INDEX] * (len(expected) - len(a1) - len(round2) - len(a2)) + a1 + \
        [IGNORE_INDEX] * len(round2) + a2
    assert labels == want


def test_single_round_per_question_is_the_default(tok):
    s = sample(["A?", "B?"], ["[SEG]", "[SEG] and [SEG]"], [1, 2])
    convs = conv.tokenize_sample(s, tok)
    assert [c.num_seg for c in convs] == [1, 2]
    assert all((c.input_ids == IMAGE_TOKEN_INDEX).sum() == 1 for c in convs)


def test_seg_count_mismatch_is_rejected(tok):
    with pytest.raises(BadRecord) as e:
        conv.tokenize_sample(sample(["A?"], ["[SEG] and [SEG]"], [1]), tok)
    assert e.value.reason == "seg_count" and "rec question 0" in str(e.value)


def test_too_long_is_skipped_not_truncated(tok):
    s = sample(["Where?"], ["[SEG] " + "word " * 40 + "[SEG]"], [2])
    (c,) = conv.tokenize_sample(s, tok)
    with pytest.raises(BadRecord) as e:
        conv.tokenize_sample(s, tok, max_length=c.expanded_length - 1)
    assert e.value.reason == "too_long"
    assert conv.tokenize_sample(s, tok, max_length=c.expanded_length)[0].num_seg == 2


def test_broken_template_is_a_label_mismatch(tok):
    s = sample(["Say ASSISTANT: now"], ["[SEG]"], [1])
    with pytest.raises(BadRecord) as e:
        conv.tokenize_sample(s, tok)
    assert e.value.reason == "label_mismatch"

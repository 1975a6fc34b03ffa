"""Building a small LLaMA-style SentencePiece tokenizer folder (for models trained from scratch).

The synthetic demo has no LLaMA vocabulary to start from, so it trains a small SentencePiece
model on its own questions and answers with LLaMA's settings (BPE, byte fallback, dummy
prefix, no whitespace collapsing, <unk>=0, <s>=1, </s>=2) and writes it the way LISA/M²SA
folders hold theirs: ``tokenizer.model``, ``added_tokens.json`` ([SEG], <im_start>,
<im_end> after the pieces), ``special_tokens_map.json``, ``tokenizer_config.json``.
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterable

import sentencepiece as spm

from m2sa_jax.data.types import IM_END_TOKEN, IM_START_TOKEN, SEG_TOKEN


def build_tokenizer_folder(folder: str, corpus: Iterable[str], vocab_size: int,
                           model_max_length: int = 512) -> int:
    """Trains and writes the tokenizer files into ``folder``. Returns the [SEG] id."""
    lines = [line for line in corpus if line.strip()]
    if not lines:
        raise ValueError("cannot build a tokenizer from an empty corpus")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    n = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    added = {SEG_TOKEN: n, IM_START_TOKEN: n + 1, IM_END_TOKEN: n + 2}
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump(added, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": "<unk>"}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": model_max_length, "tokenizer_class": "LlamaTokenizer",
                   "legacy": True}, f)
    return added[SEG_TOKEN]

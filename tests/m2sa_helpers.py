"""Fixture writers for LISA/M²SA checkpoint folders in the released on-disk format."""

from __future__ import annotations

import io
import json
import os

import sentencepiece as spm

_CORPUS = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: Which parts would you hold to carry both cups? ASSISTANT: the handle of each cup.
Please output segmentation mask. Sure, it is the left person and the right dog.
Segment the wheels of the car, the back of the chair and the shade of the lamp."""


def make_tokenizer_files(folder: str, vocab_size: int) -> int:
    """Writes a small SentencePiece ``tokenizer.model`` (LLaMA's settings: BPE, byte fallback,
    dummy prefix, no whitespace collapsing) plus LISA's added tokens. Returns the [SEG] id."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 20), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    added = {"[SEG]": n, "<im_start>": n + 1, "<im_end>": n + 2}
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump(added, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": "<unk>"}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512, "tokenizer_class": "LlamaTokenizer",
                   "legacy": True}, f)
    if n != vocab_size:
        raise AssertionError(f"SentencePiece made {n} pieces, expected {vocab_size}")
    return added["[SEG]"]


def write_sharded_safetensors(state: dict, folder: str, num_shards: int) -> None:
    """``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` (HF's layout)."""
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_sharded_bin(state: dict, folder: str, num_shards: int) -> None:
    """``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``."""
    import torch

    keys = list(state)
    per = -(-len(keys) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

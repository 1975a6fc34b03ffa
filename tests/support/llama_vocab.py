"""Test helper: the real LLaMA SentencePiece vocabulary, rebuilt from a GGUF file.

``scripts/setup.sh`` extracts ``ggml-vocab-llama-spm.gguf`` (32,000 pieces with scores and
types, plus the reference ``.inp``/``.out`` tokenisations) from the llama-cpp-python 0.2.90 source
distribution into ``.cache/vocab/``. Here a minimal GGUF reader pulls the vocabulary out and
writes a SentencePiece BPE ``tokenizer.model`` (byte fallback, dummy prefix, no whitespace
folding, identity normaliser — LLaMA's own settings) into a checkpoint-like folder.
"""

from __future__ import annotations

import json
import os
import struct

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tests.support import REPO

VOCAB_DIR = os.path.join(REPO, ".cache", "vocab")
GGUF_PATH = os.path.join(VOCAB_DIR, "ggml-vocab-llama-spm.gguf")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str) -> dict:
    """The key/value header of a GGUF file (tensors are not read)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {data[:4]!r})")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported (need ≥ 2)")
    pos = 4 + 4 + 8 + 8

    def read(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def read_string():
        nonlocal pos
        n = read("<Q")
        s = data[pos: pos + n].decode("utf-8")
        pos += n
        return s

    def read_value(kind):
        if kind in _SCALARS:
            return read(_SCALARS[kind])
        if kind == _STRING:
            return read_string()
        if kind == _ARRAY:
            elem, n = read("<I"), read("<Q")
            return [read_value(elem) for _ in range(n)]
        raise ValueError(f"{path}: unknown GGUF value type {kind} at byte {pos}")

    meta = {}
    for _ in range(n_kv):
        key = read_string()
        meta[key] = read_value(read("<I"))
    return meta


def build_llama_sp_model(path: str = GGUF_PATH) -> bytes:
    """Serialized SentencePiece ModelProto equivalent to LLaMA's ``tokenizer.model``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: run `bash scripts/setup.sh` (it extracts the LLaMA vocabulary from "
            "the llama-cpp-python 0.2.90 sdist into .cache/vocab/)")
    meta = read_gguf_metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]     # GGUF uses SentencePiece's type numbering
    if meta.get("tokenizer.ggml.model") != "llama" or len(tokens) != 32000:
        raise ValueError(f"{path}: expected the 32,000-piece llama vocabulary, got "
                         f"{meta.get('tokenizer.ggml.model')} with {len(tokens)} pieces")
    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    t = proto.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return proto.SerializeToString()


def write_checkpoint_tokenizer(folder: str, added_tokens: dict | None = None,
                               model_max_length: int = 2048) -> str:
    """A LLaVA-style tokenizer folder: tokenizer.model (+ added_tokens.json) + tokenizer_config.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(build_llama_sp_model())
    special = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False,
               "single_word": False}
    config = {"bos_token": {**special, "content": "<s>"}, "eos_token": {**special, "content": "</s>"},
              "unk_token": {**special, "content": "<unk>"}, "model_max_length": model_max_length,
              "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if added_tokens:
        with open(os.path.join(folder, "added_tokens.json"), "w") as f:
            json.dump(added_tokens, f)
    return folder


def reference_cases(path: str = GGUF_PATH) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference tokenisations (HF tokenizer ids) shipped beside the GGUF file."""
    with open(path + ".inp", encoding="utf-8") as f:
        inputs = f.read().split("\n__ggml_vocab_test__\n")
    with open(path + ".out", encoding="utf-8") as f:
        outputs = f.read().split("\n")
    return [(text, [int(x) for x in ids.split()]) for text, ids in zip(inputs, outputs)]


_TOKENIZER_DIR: list[str] = []


def shared_tokenizer_folder() -> str:
    """One rebuilt tokenizer folder per test process (building it parses the GGUF file)."""
    if not _TOKENIZER_DIR:
        import tempfile
        _TOKENIZER_DIR.append(write_checkpoint_tokenizer(tempfile.mkdtemp(prefix="llama_vocab_")))
    return _TOKENIZER_DIR[0]

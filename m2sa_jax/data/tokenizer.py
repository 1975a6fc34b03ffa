"""The LLaMA tokenizer exactly as the released LISA / M²SA models saw it (SPEC §2).

Those models were trained with transformers 4.31's slow ``LlamaTokenizer`` in legacy mode.
Its behaviour, which this module re-implements on top of SentencePiece alone:

1. The text is split on the "no-split" tokens: the added tokens (``[SEG]``, ``<im_start>``,
   ``<im_end>``) and the special tokens (``<s>``, ``</s>``, ``<unk>``), leftmost match first.
2. Around an added token the whitespace of both neighbouring chunks is stripped (4.31 strips by
   default for tokens that are not ``AddedToken`` special tokens). The special tokens are
   ``AddedToken(lstrip=False, rstrip=False)`` in ``LlamaTokenizer`` (or whatever flags the
   checkpoint's ``tokenizer_config.json`` gives), so their neighbours keep their whitespace.
3. Every remaining non-empty chunk is encoded by SentencePiece on its own, so each chunk gets the
   dummy-prefix "▁": ``"[SEG]."`` → ``[SEG] ▁.``; ``"<im_end>\\n Which"`` → ``<im_end> ▁Which``.
4. ``encode`` prepends BOS (``add_bos_token=True``) and never appends EOS.

``tokenize_with_image`` is LLaVA's ``tokenizer_image_token``: the prompt is cut at every
``<image>``, each piece is encoded with its BOS, the BOS of later pieces is dropped and
:data:`IMAGE_TOKEN_INDEX` (-200) marks where the 256 image rows go.

Added-token ids come from the checkpoint folder (``added_tokens.json``, or
``added_tokens_decoder`` in ``tokenizer_config.json``). Tokens the folder lacks are appended in
the order the training code added them: ``[SEG]`` first (``add_tokens("[SEG]")``), then
``<im_start>``, ``<im_end>`` (``add_tokens([...], special_tokens=True)``), i.e. ids 32000,
32001, 32002 on the 32,000-piece LLaMA vocabulary. Look ``[SEG]`` up with
:meth:`convert_tokens_to_ids` (or :attr:`seg_token_id`), never by encoding the string.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm

from m2sa_jax.data.types import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN, SEG_TOKEN

IMAGE_TOKEN_INDEX = -200
# The order the training code adds its tokens after loading the base vocabulary.
MODEL_ADDED_TOKENS = ((SEG_TOKEN, False), (IM_START_TOKEN, True), (IM_END_TOKEN, True))


@dataclasses.dataclass(frozen=True)
class NoSplitToken:
    """A token the text is split on, with whether it eats whitespace to its left / right."""

    content: str
    id: int
    lstrip: bool
    rstrip: bool
    special: bool


class LegacyLlamaTokenizer:
    """SentencePiece + added tokens with transformers-4.31 legacy splitting (see module doc)."""

    def __init__(self, sp_model: spm.SentencePieceProcessor, added_tokens: Iterable[NoSplitToken],
                 model_max_length: int = 2048, source: str = "<memory>"):
        self.sp = sp_model
        self.source = source
        self.model_max_length = int(model_max_length)
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id = self.unk_token_id          # LISA: tokenizer.pad_token = unk_token
        tokens = {t.content: t for t in added_tokens}
        for piece_id, strip_default in ((self.bos_token_id, False), (self.eos_token_id, False),
                                        (self.unk_token_id, False)):
            piece = self.sp.id_to_piece(piece_id)
            if piece not in tokens:
                tokens[piece] = NoSplitToken(piece, piece_id, strip_default, strip_default, True)
        self.no_split = tokens
        self.added_vocab = {t.content: t.id for t in tokens.values() if t.id >= self.sp.get_piece_size()}
        self._id_to_added = {v: k for k, v in self.added_vocab.items()}
        # Longest first, so that a token that is a prefix of another never wins the match.
        alternatives = sorted(tokens, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str, model_max_length: int | None = None,
                        add_model_tokens: bool = True) -> "LegacyLlamaTokenizer":
        """Reads ``tokenizer.model`` (+ ``added_tokens.json`` / ``tokenizer_config.json``)."""
        model_path = os.path.join(folder, "tokenizer.model")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"{model_path}: no SentencePiece model; point to the LLaVA/LISA checkpoint folder "
                "that holds tokenizer.model")
        sp = spm.SentencePieceProcessor()
        sp.Load(model_path)
        config = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
        added: dict[str, NoSplitToken] = {}
        for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
            content, special = entry["content"], bool(entry.get("special", False))
            # special (<s>, </s>, <unk>): no strip, like LlamaTokenizer's AddedTokens; others: strip
            added[content] = NoSplitToken(content, int(token_id), not special, not special, special)
        for content, token_id in (_read_json(os.path.join(folder, "added_tokens.json")) or {}).items():
            added.setdefault(content, NoSplitToken(content, int(token_id), True, True,
                                                   content in (IM_START_TOKEN, IM_END_TOKEN)))
        # Special tokens keep the flags the config gives them (LlamaTokenizer default: no strip).
        for key in ("bos_token", "eos_token", "unk_token"):
            value = config.get(key)
            if isinstance(value, dict):
                content = value["content"]
                added[content] = NoSplitToken(content, sp.piece_to_id(content), bool(value.get("lstrip")),
                                              bool(value.get("rstrip")), True)
        # A plain added token ([SEG], <im_start>, <im_end>) strips both sides in 4.31, whatever
        # flags a newer tokenizer_config writes for it: only special-token AddedTokens were consulted.
        for content, tok in list(added.items()):
            if tok.id >= sp.get_piece_size():
                added[content] = dataclasses.replace(tok, lstrip=True, rstrip=True)
        _check_added_ids(added, sp.get_piece_size(), folder)
        if model_max_length is None:
            configured = config.get("model_max_length")
            model_max_length = configured if _small_int(configured) else 2048
        tokenizer = cls(sp, added.values(), model_max_length, source=folder)
        if add_model_tokens:
            tokenizer = tokenizer.with_model_tokens()
        return tokenizer

    def with_model_tokens(self) -> "LegacyLlamaTokenizer":
        """Adds whichever of ``[SEG]``, ``<im_start>``, ``<im_end>`` is missing, in LISA's order."""
        tokens = dict(self.no_split)
        next_id = len(self)
        for content, special in MODEL_ADDED_TOKENS:
            if content not in tokens:
                tokens[content] = NoSplitToken(content, next_id, True, True, special)
                next_id += 1
        return LegacyLlamaTokenizer(self.sp, tokens.values(), self.model_max_length, self.source)

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added_vocab)

    # ------------------------------------------------------------------ lookup
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            if tokens in self.added_vocab:
                return self.added_vocab[tokens]
            return self.sp.piece_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def seg_token_id(self) -> int:
        if SEG_TOKEN not in self.added_vocab:
            raise KeyError(f"{self.source}: the tokenizer has no {SEG_TOKEN} token; load it with "
                           "add_model_tokens=True")
        return self.added_vocab[SEG_TOKEN]

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> list[str]:
        """Pieces and added tokens, as transformers 4.31 ``tokenize`` returns them."""
        chunks = self._split_re.split(text)
        for i, chunk in enumerate(chunks):
            tok = self.no_split.get(chunk) if i % 2 == 1 else None
            if tok is None:
                continue
            if tok.rstrip and i + 1 < len(chunks) and chunks[i + 1]:
                chunks[i + 1] = chunks[i + 1].lstrip()
            if tok.lstrip and i > 0 and chunks[i - 1]:
                chunks[i - 1] = chunks[i - 1].rstrip()
        out: list[str] = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            if i % 2 == 1:
                out.append(chunk)
            else:
                out.extend(self.sp.encode(chunk, out_type=str))
        return out

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """``tokenizer(text).input_ids``: BOS + ids, no EOS."""
        ids = [self.convert_tokens_to_ids(t) for t in self.tokenize(text)]
        return ([self.bos_token_id] if add_bos else []) + ids

    def tokenize_with_image(self, prompt: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: ``<image>`` → :data:`IMAGE_TOKEN_INDEX`."""
        pieces = [self.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
        ids = [self.bos_token_id]
        for i, piece in enumerate(pieces):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(piece[1:])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Readable text for logs: added tokens verbatim, the image placeholder as ``<image>``."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i == IMAGE_TOKEN_INDEX or i in self._id_to_added or i < 0:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(IMAGE_TOKEN if i == IMAGE_TOKEN_INDEX else self._id_to_added.get(i, ""))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return " ".join(s for s in out if s)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        try:
            return json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid UTF-8 JSON ({e}); re-save the tokenizer files") from e


def _small_int(value) -> bool:
    """transformers writes a huge sentinel for 'no limit'; only a real length counts."""
    return isinstance(value, int) and 0 < value < 1_000_000


def _check_added_ids(added: dict[str, NoSplitToken], base: int, folder: str) -> None:
    ids = sorted(t.id for t in added.values() if t.id >= base)
    if ids and ids != list(range(base, base + len(ids))):
        raise ValueError(f"{folder}: added token ids {ids} do not continue the {base}-piece vocabulary "
                         "without gaps; fix added_tokens.json")

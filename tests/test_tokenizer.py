"""The legacy LLaMA tokenizer on the real 32,000-piece vocabulary (rebuilt from GGUF).

No skip: scripts/setup.sh fetches the vocabulary; a missing file fails loudly.
"""

import json
import os

import pytest

from m2sa_jax.data.tokenizer import IMAGE_TOKEN_INDEX, LegacyLlamaTokenizer
from tests.support import llama_vocab


@pytest.fixture(scope="module")
def tok():
    return LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder())


def test_rebuilt_vocabulary_matches_reference_tokenisations(tok):
    cases = [(text, ids) for text, ids in llama_vocab.reference_cases() if text]
    assert len(cases) >= 40
    for text, ids in cases:
        assert tok.sp.encode(text) == ids, text


def test_well_known_ids(tok):
    assert tok.sp.get_piece_size() == 32000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tok.unk_token_id
    assert tok.encode("Hello") == [1, 15043]
    assert tok.sp.piece_to_id("▁.") == 869
    assert tok.sp.encode("Hello world") == [15043, 3186]


def test_added_tokens_in_lisa_order(tok):
    # LISA: add_tokens("[SEG]") then add_tokens([<im_start>, <im_end>], special_tokens=True).
    assert tok.added_vocab == {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}
    assert tok.seg_token_id == tok.convert_tokens_to_ids("[SEG]") == 32000
    assert len(tok) == 32003


def test_added_tokens_read_from_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    llama_vocab.write_checkpoint_tokenizer(str(folder), {"[SEG]": 32000, "<im_start>": 32001,
                                                         "<im_end>": 32002, "[EXTRA]": 32003})
    tok = LegacyLlamaTokenizer.from_pretrained(str(folder))
    assert tok.convert_tokens_to_ids(["[SEG]", "<im_end>", "[EXTRA]"]) == [32000, 32002, 32003]
    assert tok.tokenize("a [EXTRA] b") == ["▁a", "[EXTRA]", "▁b"]
    with open(folder / "added_tokens.json", "w") as f:
        json.dump({"[SEG]": 32005}, f)
    with pytest.raises(ValueError, match="added_tokens.json"):
        LegacyLlamaTokenizer.from_pretrained(str(folder))


def test_legacy_split_and_strip_rules(tok):
    p = tok.sp.piece_to_id
    # text next to an added token loses its whitespace and gets the dummy prefix again
    assert tok.encode("[SEG].", add_bos=False) == [32000, p("▁.")]
    assert tok.encode("[SEG], left", add_bos=False) == [32000, p("▁,"), p("▁left")]
    assert tok.tokenize("cup [SEG] and") == ["▁cup", "[SEG]", "▁and"]
    # no "▁" piece before [SEG] (the upstream bug of newer tokenizers)
    assert tok.encode("[SEG]", add_bos=False) == [32000]
    assert tok.tokenize("<im_end>\n Which") == ["<im_end>", "▁Which"]
    # special tokens are split on but keep neighbouring whitespace (AddedToken lstrip/rstrip False)
    assert tok.tokenize("a</s>USER") == ["▁a", "</s>", "▁US", "ER"]
    assert tok.tokenize("a </s> b") == ["▁a", "▁", "</s>", "▁", "▁b"]
    # a chunk that is only whitespace disappears
    assert tok.tokenize("[SEG] \n [SEG]") == ["[SEG]", "[SEG]"]


def test_image_token_like_llava(tok):
    prompt = "x <im_start><image><im_end>\n y"
    ids = tok.tokenize_with_image(prompt)
    assert ids == [1, tok.sp.piece_to_id("▁x"), 32001, IMAGE_TOKEN_INDEX, 32002, tok.sp.piece_to_id("▁y")]
    assert tok.tokenize_with_image("<image>") == [1, IMAGE_TOKEN_INDEX]
    assert "<image>" in tok.decode(ids)


def test_missing_model_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        LegacyLlamaTokenizer.from_pretrained(str(tmp_path))


def test_vocab_file_is_present():
    assert os.path.isfile(llama_vocab.GGUF_PATH), "run scripts/setup.sh to fetch the test vocabulary"
    meta = llama_vocab.read_gguf_metadata(llama_vocab.GGUF_PATH)
    assert meta["tokenizer.ggml.tokens"][29871] == "▁"


def test_added_tokens_decoder_of_newer_configs(tmp_path):
    folder = llama_vocab.write_checkpoint_tokenizer(str(tmp_path / "new"))
    config_path = os.path.join(folder, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["added_tokens_decoder"] = {
        "1": {"content": "<s>", "special": True, "lstrip": False, "rstrip": False},
        "32000": {"content": "[SEG]", "special": False, "lstrip": False, "rstrip": False},
        "32001": {"content": "<im_start>", "special": True, "lstrip": False, "rstrip": False},
        "32002": {"content": "<im_end>", "special": True, "lstrip": False, "rstrip": False},
    }
    with open(config_path, "w") as f:
        json.dump(config, f)
    tok = LegacyLlamaTokenizer.from_pretrained(folder)
    assert tok.added_vocab == {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}
    # 4.31 strips around every plain added token whatever flags a newer config records
    assert tok.tokenize("a [SEG] . <im_end>\n b") == ["▁a", "[SEG]", "▁.", "<im_end>", "▁b"]

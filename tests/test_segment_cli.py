"""m2sa_jax.load + segment and ``python -m m2sa_jax.segment`` end to end on a converted tiny
checkpoint and a real photograph, plus every bad input the user-facing path must handle."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data

import m2sa_jax
from checkpoints_convert.__main__ import main as convert_main
from m2sa_jax.data import conversation
from m2sa_jax.data.pipeline import collate, BatchShapes
from m2sa_jax.inference.predictor import mask_labels, read_image
from m2sa_jax.segment import main as segment_main
from tests.support.m2sa_helpers import write_tiny_m2sa_folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    src, dst = tmp / "hf", tmp / "converted"
    write_tiny_m2sa_folder(str(src), "m2sa", sam_depth=4, global_attn=(1, 3), img_size=256)
    assert convert_main(["m2sa", "--src", str(src), "--dst", str(dst)]) == 0
    return dict(src=src, dst=dst, tmp=tmp)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "coffee.jpg"
    Image.fromarray(data.coffee()[::2, ::2]).save(path, quality=92)       # 200×300 real photo
    return path


def _teacher_batch(pred, image, ids, n_targets, h, w):
    from m2sa_jax.data.pipeline import Example
    from m2sa_jax.data.preprocess import clip_preprocess, sam_preprocess

    sam_in, resized, original = sam_preprocess(image, pred.config.sam.img_size)
    conv = conversation.TokenizedConversation(
        input_ids=np.array(ids), labels=np.array(ids), num_seg=n_targets,
        expanded_length=len(ids) + 255, prompt="")
    ex = Example("photo", "test", sam_in, tuple(resized), tuple(original),
                 clip_preprocess(image, pred.config.llava.vision.image_size), [conv],
                 [np.zeros((n_targets, h, w), bool)], [["a"] * n_targets],
                 [["object"] * n_targets], ["q"])
    return collate([ex], BatchShapes(images=1, conversations=1, token_buckets=(128,),
                                     max_targets=max(n_targets, 1), mask_hw=(h, w)), pad_id=0)


def _force_first_token(pred, image, question, token_id, amount=100.0):
    """Makes greedy decoding's first token ``token_id``: adds the direction of the hidden state
    that produces it to that token's lm_head column (no other code path is touched)."""
    ids = pred.prompt_ids(question)
    h, w = image.shape[:2]
    out = pred.teacher_forced(_teacher_batch(pred, image, ids + [pred.seg_id], 1, h, w))
    pos = int(np.asarray(out["text_to_expanded"])[0, len(ids) - 1])
    h0 = np.asarray(out["last_hidden_state"])[0, pos]
    p = jax.tree.map(lambda x: x, pred.params)
    head = p["llava"]["language_model"]["lm_head"]["kernel"]
    p["llava"]["language_model"]["lm_head"]["kernel"] = head.at[:, token_id].add(
        amount * h0 / np.linalg.norm(h0))
    pred.params = p


QUESTION = "Which parts would you hold to carry the cup?"


@pytest.mark.torch
def test_segment_generates_masks_consistent_with_teacher_forcing(converted, photo):
    pred = m2sa_jax.load(str(converted["dst"]), max_new_tokens=6)
    image = read_image(str(photo))
    _force_first_token(pred, image, QUESTION, pred.seg_id)
    result = pred.segment(str(photo), QUESTION, return_logits=True)
    h, w = 200, 300
    n = result.answer.count("[SEG]")
    assert n >= 1 and result.answer.startswith("[SEG]")
    assert result.masks.shape == (n, h, w) and result.masks.dtype == bool
    assert len(result.labels) == n

    # The generated answer fed back teacher-forced gives the same masks (same [SEG] states).
    ids = pred.prompt_ids(QUESTION) + pred.last_generated[0]
    out = pred.teacher_forced(_teacher_batch(pred, image, ids, n, h, w))
    tf = np.asarray(out["mask_logits"])[:n]
    err = np.abs(tf - result.mask_logits).max()
    print(f"\ngenerate-then-segment vs teacher-forced mask logits ({n} masks): "
          f"max abs err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.torch
def test_answer_without_seg_gives_zero_masks(converted, photo):
    pred = m2sa_jax.load(str(converted["dst"]), max_new_tokens=4)
    image = read_image(str(photo))
    _force_first_token(pred, image, "Is there a cup?", pred.tokenizer.eos_token_id)
    result = pred.segment(str(photo), "Is there a cup?")
    assert result.masks.shape == (0, 200, 300)
    assert result.labels == [] and result.answer == ""


@pytest.mark.torch
def test_batched_pairs_equal_single_calls(converted, photo):
    pred = m2sa_jax.load(str(converted["dst"]), max_new_tokens=5)
    other = data.astronaut()[::4, ::4]
    pairs = [(str(photo), "the cup?"), (other, "the person?"), (str(photo), "the saucer?")]
    results = pred.segment_batch(pairs, return_logits=True)
    for (image, question), r in zip(pairs, results):
        single = pred.segment(image, question, return_logits=True)
        assert single.answer == r.answer
        assert r.masks.shape[0] == r.answer.count("[SEG]")
        assert r.masks.shape[1:] == ((200, 300) if isinstance(image, str) else (128, 128))
        np.testing.assert_allclose(single.mask_logits, r.mask_logits, atol=1e-4)


@pytest.mark.torch
def test_cli_end_to_end(converted, photo, tmp_path, capsys):
    out = tmp_path / "out"
    rc = segment_main(["--checkpoint", str(converted["dst"]), "--image", str(photo),
                       "--question", "What would you drink from?", "--out", str(out),
                       "--max-new-tokens", "6"])
    assert rc == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["question"] == "What would you drink from?"
    assert len(summary["masks"]) == summary["answer"].count("[SEG]") == len(summary["labels"])
    overlay = Image.open(out / "overlay.png")
    assert overlay.width == 300 and overlay.height > 200        # image + legend
    for m in summary["masks"]:
        assert Image.open(out / m["file"]).size == (300, 200)
    assert "overlay.png" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_image_modes_are_converted(tmp_path, mode):
    rgb = data.coffee()[::4, ::4]
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))
        suffix = ".png"
    else:
        img = img.convert(mode)
        suffix = ".tiff" if mode == "CMYK" else ".png"
    path = tmp_path / f"x{suffix}"
    img.save(path)
    out = read_image(str(path))
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    if mode in ("RGBA", "CMYK"):
        assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 1


@pytest.mark.torch
def test_bad_inputs_have_clear_errors(converted, photo, tmp_path, capsys):
    dst = str(converted["dst"])
    # missing image
    rc = segment_main(["--checkpoint", dst, "--image", str(tmp_path / "nope.jpg"),
                       "--question", "q", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.jpg" in err and "not found" in err
    # corrupt image
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    rc = segment_main(["--checkpoint", dst, "--image", str(bad), "--question", "q",
                       "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jpg" in err and "cannot decode" in err
    # empty question
    rc = segment_main(["--checkpoint", dst, "--image", str(photo), "--question", "  ",
                       "--out", str(tmp_path / "o")])
    assert rc == 2 and "empty" in capsys.readouterr().err
    # very large image: refused with the size and the fix
    with pytest.raises(ValueError, match=r"max_image_pixels"):
        read_image(np.zeros((3000, 4000, 3), np.uint8), max_pixels=10_000_000)
    # over-long question
    pred = m2sa_jax.load(dst, max_new_tokens=4)
    with pytest.raises(ValueError, match="too long"):
        pred.prompt_ids("where is the cup " * 400)
    # a directory that is not a converted model
    rc = segment_main(["--checkpoint", str(tmp_path), "--image", str(photo), "--question", "q",
                       "--out", str(tmp_path / "o")])
    assert rc == 2 and "m2sa_meta.json" in capsys.readouterr().err


@pytest.mark.torch
def test_non_m2sa_folder_names_what_is_missing(tmp_path, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(folder)
    assert convert_main(["m2sa", "--src", str(folder), "--dst", str(tmp_path / "out")]) == 2
    msg = capsys.readouterr().err
    assert "not a LISA/M²SA checkpoint folder" in msg
    for what in ("SAM image encoder", "mm_projector", "text_hidden_fcs"):
        assert what in msg
    del torch


def test_mask_labels():
    assert mask_labels("cup_1's handle [SEG] and cup_2's handle [SEG].") == [
        "cup_1's handle", "cup_2's handle"]
    assert mask_labels("Sure, the left person [SEG], the dog [SEG]") == ["the left person",
                                                                       "the dog"]
    assert mask_labels("no masks here.") == []

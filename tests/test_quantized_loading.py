"""Quantization where a user meets it: the converter storing a model quantized, the one resolver
(``m2sa_jax.load(..., quantize=)``) quantizing leaf by leaf as it reads, ``python -m
m2sa_jax.segment --quantize`` and ``eval.quantize`` — on a tiny released-layout M²SA folder
written from the random PyTorch reference, and on the model the CI demo trains.

What a stored quantized directory must give: the same integer values and scales as quantizing
the float weights at load, no float copy of a quantized layer, the same masks; asking for the
scheme it holds is a no-op that says so, asking for another one is refused with the fix.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

import m2sa_jax
from checkpoints_convert.__main__ import main as convert_main
from m2sa_jax import quantization as Q
from m2sa_jax.checkpoints import converted
from m2sa_jax.checkpoints.resolve import resolve
from m2sa_jax.segment import main as segment_main
from m2sa_jax.tree import flatten
from tests.support.m2sa_helpers import write_tiny_m2sa_folder

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qload")
    src, dst, qdst = tmp / "hf", tmp / "float", tmp / "int8"
    write_tiny_m2sa_folder(str(src), "m2sa", sam_depth=4, global_attn=(1, 3), img_size=256)
    assert convert_main(["m2sa", "--src", str(src), "--dst", str(dst)]) == 0
    assert convert_main(["m2sa", "--src", str(src), "--dst", str(qdst), "--quantize", "int8"]) == 0
    rng = np.random.default_rng(0)
    photo = tmp / "photo.png"
    Image.fromarray(rng.integers(0, 255, (120, 180, 3), dtype=np.uint8)).save(photo)
    return dict(tmp=tmp, src=src, float=dst, int8=qdst, photo=photo)


def _disk_bytes(directory):
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _quantized_paths(params):
    return sorted(p for p, v in flatten(params).items() if Q.is_quantized_leaf(v))


def test_stored_quantized_equals_quantizing_at_load(folders):
    meta = converted.load_meta(str(folders["int8"]))
    assert meta["quantization"]["scheme"] == "int8"
    stored = resolve(str(folders["int8"]))
    at_load = resolve(str(folders["float"]), quantize="int8")
    from_pytorch = resolve(str(folders["src"]), quantize="int8")
    for model in (stored, at_load, from_pytorch):
        assert model.quantization == Q.as_spec("int8")
        assert "int8" in model.description
    paths = _quantized_paths(stored.params)
    # the LLM's linear layers and only those (2 layers × 7 projections, and lm_head)
    assert len(paths) == 15 and all("language_model" in p for p in paths)
    assert "llava/language_model/lm_head/kernel" in paths
    assert _quantized_paths(at_load.params) == _quantized_paths(from_pytorch.params) == paths
    a, b, c = flatten(stored.params), flatten(at_load.params), flatten(from_pytorch.params)
    assert a.keys() == b.keys() == c.keys()
    for p in paths:
        for other in (b, c):
            np.testing.assert_array_equal(np.asarray(a[p].array.qvalue),
                                          np.asarray(other[p].array.qvalue))
            np.testing.assert_array_equal(np.asarray(a[p].array.scale),
                                          np.asarray(other[p].array.scale))
        assert a[p].array.qvalue.dtype == np.int8          # never a float copy of the layer
    # on disk: int8 values (1 byte) and one scale per output column replace the float kernels
    saved = sum(int(np.prod(a[p].array.qvalue.shape)) * 3 - a[p].array.scale.size * 4
                for p in paths)
    assert _disk_bytes(folders["float"]) - _disk_bytes(folders["int8"]) > 0.5 * saved


def test_same_scheme_again_is_a_noop_and_another_is_refused(folders):
    with pytest.warns(UserWarning, match="already quantized as int8"):
        again = resolve(str(folders["int8"]), quantize="int8")
    assert again.quantization == Q.as_spec("int8")
    with pytest.raises(ValueError, match=r"stored quantized as int8.*--quantize int4"):
        resolve(str(folders["int8"]), quantize="int4")
    with pytest.raises(ValueError, match="int8.*int4"):
        resolve(str(folders["float"]), quantize="int2")


def test_predictor_masks_equal_between_stored_and_load_time_quantization(folders):
    image = np.asarray(Image.open(folders["photo"]).convert("RGB"))
    question = "What is in the picture?"
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # loading as stored warns about nothing
        stored = m2sa_jax.load(str(folders["int8"]), max_new_tokens=6)
    at_load = m2sa_jax.load(str(folders["float"]), quantize="int8", max_new_tokens=6)
    plain = m2sa_jax.load(str(folders["float"]), max_new_tokens=6)
    assert stored.quantization == at_load.quantization == Q.as_spec("int8")
    assert plain.quantization is None
    r1, r2 = stored.segment(image, question), at_load.segment(image, question)
    assert r1.answer == r2.answer
    assert len(r1.masks) == len(r2.masks)
    for m1, m2 in zip(r1.masks, r2.masks):
        np.testing.assert_array_equal(m1, m2)


def test_segment_command_quantizes(folders, tmp_path):
    out = tmp_path / "out"
    rc = segment_main(["--checkpoint", str(folders["float"]), "--image", str(folders["photo"]),
                       "--question", "What is in the picture?", "--out", str(out),
                       "--max-new-tokens", "4", "--quantize", "int8"])
    assert rc == 0
    summary = json.loads((out / "result.json").read_text())
    assert len(summary["masks"]) == summary["answer"].count("[SEG]")


def test_eval_config_quantizes_the_trained_workdir(trained_ci_run):
    from m2sa_jax.evaluation import run

    cfg = trained_ci_run["cfg"]
    float_model = run.load_model(cfg)
    assert float_model.quantization is None and not _quantized_paths(float_model.params)
    qcfg = cfg.copy_and_resolve_references()
    qcfg.eval.quantize = "int8"
    model = run.load_model(qcfg)
    assert model.quantization == Q.as_spec("int8")
    assert _quantized_paths(model.params)
    floats = flatten(float_model.params)
    for p, v in flatten(model.params).items():
        if not Q.is_quantized_leaf(v):
            np.testing.assert_array_equal(np.asarray(v), np.asarray(floats[p]))

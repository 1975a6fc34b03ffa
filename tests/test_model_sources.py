"""Every kind of model source a user holds, through the one resolver (m2sa_jax.load, the
converter, the command line), against the PyTorch reference — and every bad input on the way.

The fixtures are written the way the public code writes them: a small random LISA/M²SA PyTorch
model (tests/torch_m2sa_reference.py) saved through the merge script's filter (every key with
``vision_tower`` dropped) as sharded ``pytorch_model-*.bin`` with an index, the tokenizer with
[SEG] / <im_start> / <im_end>, and a config.json that names the CLIP tower without describing
it; the tower saved on its own by ``CLIPVisionModel.save_pretrained`` (named as a relative
folder), and as a whole ``CLIPModel`` inside a Hugging Face cache tree (named by its hub id).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import m2sa_jax
from checkpoints_convert.__main__ import main as convert_main
from m2sa_jax.checkpoints import clip_tower, converted, torch_io
from m2sa_jax.checkpoints.resolve import ModelNotFoundError, resolve
from m2sa_jax.checkpoints.table import ConversionError
from m2sa_jax.models.m2sa import M2SA
from tests.support.m2sa_helpers import (save_clip_model_with_tower, save_clip_tower, teacher_forced_case,
                          write_hf_cache_repo, write_released_m2sa_folder)

pytestmark = pytest.mark.torch

SP_VOCAB = 400
SIZES = dict(sam_depth=4, global_attn=(1, 3), img_size=256, sp_vocab=SP_VOCAB)
CLIP_ID = "openai/clip-vit-large-patch14"
MODEL_ID = "tiny-org/M2SA-tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("released")
    folder = tmp / "M2SA-tiny"
    ref, seg_id = write_released_m2sa_folder(str(folder), "../tiny-clip", **SIZES)
    save_clip_tower(ref, str(tmp / "tiny-clip"))
    # the hub id case: openai's repo holds a whole CLIPModel; the model itself is cached too
    hub = tmp / "hub"
    save_clip_model_with_tower(ref, str(tmp / "clip-full"))
    write_hf_cache_repo(str(hub), CLIP_ID, str(tmp / "clip-full"))
    by_id = tmp / "M2SA-tiny-by-id"
    shutil.copytree(folder, by_id)
    cfg = json.loads((by_id / "config.json").read_text())
    cfg.update(mm_vision_tower=CLIP_ID, vision_tower=CLIP_ID)
    (by_id / "config.json").write_text(json.dumps(cfg))
    write_hf_cache_repo(str(hub), MODEL_ID, str(by_id))
    batch, valid, want, image = teacher_forced_case(ref, seg_id, SP_VOCAB)
    photo = tmp / "astronaut.png"
    Image.fromarray(image).save(photo)
    return dict(tmp=tmp, folder=folder, tower=tmp / "tiny-clip", hub=hub, by_id=by_id,
                batch=batch, valid=valid, want=want, photo=photo, seg_id=seg_id, ref=ref)


_FORWARD = {}


def _mask_error(released, loaded) -> float:
    """Max |teacher-forced mask logits − the PyTorch composition's| over the 5 targets."""
    config = loaded.config
    if config not in _FORWARD:
        model = M2SA(config)
        _FORWARD[config] = jax.jit(lambda p, b: model.apply({"params": p}, b,
                                                            method=M2SA.forward_batch))
    out = np.asarray(_FORWARD[config](loaded.params, released["batch"])["mask_logits"])
    h, w = released["want"].shape[1:]
    return float(np.abs(out[released["valid"]][:, :h, :w] - released["want"]).max())


def _env(released):
    return dict(os.environ, HF_HUB_CACHE=str(released["hub"]), HF_HUB_OFFLINE="1",
                PYTHONPATH=ROOT)


def test_released_folder_loads_with_the_tower_it_names(released, tmp_path):
    loaded = resolve(str(released["folder"]))
    err = _mask_error(released, loaded)
    print(f"\nPyTorch folder, tower from a relative folder: mask logits max abs err {err:.2e}")
    assert err <= 1e-4
    assert loaded.kind == "pytorch"
    assert loaded.meta["vision_tower"]["path"] == str(released["tower"].resolve())
    assert loaded.config.llava.vision.hidden_size == 32            # from the tower's config.json

    # segment() runs, and --save-converted writes a directory that loads as the same model
    dst = tmp_path / "saved"
    pred = m2sa_jax.load(str(released["folder"]), max_new_tokens=4, save_converted=str(dst))
    result = pred.segment(str(released["photo"]), "Which parts would you hold?")
    assert result.masks.shape == (result.answer.count("[SEG]"), 256, 171)
    again = resolve(str(dst))
    assert again.kind == "converted" and again.config == loaded.config
    assert _mask_error(released, again) <= 1e-4
    tower = converted.load_meta(str(dst))["vision_tower"]
    (weights,) = tower["files"]
    assert tower["origin"] == "config.json mm_vision_tower" and tower["spec"] == "../tiny-clip"
    assert weights["sha256"] == clip_tower.sha256(str(released["tower"] / "model.safetensors"))

    # into a non-empty folder: refused before any work, nothing touched; --overwrite replaces
    before = sorted(os.listdir(dst))
    with pytest.raises(converted.OutputExistsError, match="--overwrite"):
        m2sa_jax.load(str(released["folder"]), save_converted=str(dst))
    assert sorted(os.listdir(dst)) == before
    rc = convert_main(["m2sa", "--src", str(released["folder"]), "--dst", str(dst)])
    assert rc == 2
    assert convert_main(["m2sa", "--src", str(released["folder"]), "--dst", str(dst),
                         "--overwrite"]) == 0
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".old-" in p]


def test_hub_ids_resolve_offline_in_the_cache(released, tmp_path, monkeypatch):
    # the command line, as a user runs it: tower named by its hub id, found in the cache
    dst = tmp_path / "by_id"
    done = subprocess.run([sys.executable, "-m", "checkpoints_convert", "m2sa", "--src",
                           str(released["by_id"]), "--dst", str(dst)], env=_env(released),
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = resolve(str(dst))
    assert _mask_error(released, loaded) <= 1e-4
    meta = converted.load_meta(str(dst))["vision_tower"]
    assert meta["spec"] == CLIP_ID and "models--openai--clip-vit-large-patch14" in meta["path"]

    # the whole model by its hub id (resolved in-process against the same cache)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(released["hub"]))
    loaded = resolve(MODEL_ID)
    err = _mask_error(released, loaded)
    print(f"\nHugging Face id in the local cache: mask logits max abs err {err:.2e}")
    assert err <= 1e-4 and loaded.kind == "hf_cache"

    # and the segment command on the hub id
    out = tmp_path / "seg"
    done = subprocess.run([sys.executable, "-m", "m2sa_jax.segment", "--checkpoint", MODEL_ID,
                           "--image", str(released["photo"]), "--question", "the helmet?",
                           "--out", str(out), "--max-new-tokens", "4"], env=_env(released),
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "result.json").read_text())["checkpoint"] == \
        f"Hugging Face cache {MODEL_ID}"


def test_explicit_vision_tower_and_a_missing_one(released, tmp_path):
    folder = tmp_path / "no-name"
    shutil.copytree(released["folder"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["mm_vision_tower"], cfg["vision_tower"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(clip_tower.TowerNotFoundError) as e:
        resolve(str(folder))
    msg = str(e.value)
    assert "--vision-tower" in msg and "mm_vision_tower" in msg and "(1)" in msg and "(3)" in msg
    loaded = resolve(str(folder), vision_tower=str(released["tower"]))
    assert _mask_error(released, loaded) <= 1e-4
    assert loaded.meta["vision_tower"]["origin"] == "argument"


def test_tower_of_the_wrong_width_is_refused(released, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    wide = tmp_path / "wide-clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2, patch_size=14)).save_pretrained(wide)
    with pytest.raises(ConversionError) as e:
        resolve(str(released["folder"]), vision_tower=str(wide))
    assert "48" in str(e.value) and "32" in str(e.value) and "mm_hidden_size" in str(e.value)


def test_hub_id_missing_from_the_cache_says_how_to_fetch_it(released, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(clip_tower.TowerNotFoundError) as e:
        resolve(str(released["by_id"]))
    msg = str(e.value)
    assert CLIP_ID in msg and "offline" in msg and f"download {CLIP_ID}" in msg
    with pytest.raises(ModelNotFoundError) as e:
        resolve("someone/not-cached")
    assert "hf_cache" in str(e.value) and "offline" in str(e.value)


def _copy(released, tmp_path, name="broken"):
    folder = tmp_path / name
    shutil.copytree(released["folder"], folder)
    return folder


def test_damaged_files_fail_naming_the_file(released, tmp_path, capsys):
    # a truncated .bin shard
    folder = _copy(released, tmp_path, "truncated")
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(torch_io.CorruptCheckpointError) as e:
        resolve(str(folder))
    assert str(shard) in str(e.value) and "truncated" in str(e.value)
    # the index naming a shard that is not there
    folder = _copy(released, tmp_path, "missing")
    os.remove(folder / "pytorch_model-00001-of-00002.bin")
    assert convert_main(["m2sa", "--src", str(folder), "--dst", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model-00001-of-00002.bin" in err and "missing shard" in err
    assert not (tmp_path / "o1").exists()
    # a safetensors file with a corrupt header (the tower's)
    tower = tmp_path / "bad-tower"
    shutil.copytree(released["tower"], tower)
    data = bytearray((tower / "model.safetensors").read_bytes())
    data[8:40] = b"\x00" * 32
    (tower / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(torch_io.CorruptCheckpointError) as e:
        resolve(str(released["folder"]), vision_tower=str(tower))
    assert str(tower / "model.safetensors") in str(e.value) and "header" in str(e.value)


def test_interrupted_conversion_leaves_nothing_that_loads(released, tmp_path):
    dst = tmp_path / "converted"
    proc = subprocess.Popen([sys.executable, "-m", "checkpoints_convert", "m2sa", "--src",
                             str(released["folder"]), "--dst", str(dst)], env=_env(released),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.monotonic() + 120
    while partial is None and time.monotonic() < deadline and proc.poll() is None:
        partial = next((p for p in tmp_path.iterdir() if ".partial-" in p.name), None)
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the conversion ended before it could be interrupted"
    assert partial is not None and not dst.exists()
    with pytest.raises(ModelNotFoundError):
        resolve(str(dst))
    # the leftover is hidden, never complete, and does not block the next conversion
    assert not converted.is_converted(str(partial)) or partial.name.startswith(".")
    assert convert_main(["m2sa", "--src", str(released["folder"]), "--dst", str(dst)]) == 0
    assert resolve(str(dst)).kind == "converted"


def test_a_folder_that_is_none_of_the_kinds(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError) as e:
        resolve(str(tmp_path))
    msg = str(e.value)
    for kind in ("converted", "workdir", "pytorch", "hf_cache"):
        assert f"  {kind}:" in msg


def test_half_precision_sources_and_bf16_loading(released, tmp_path):
    """A folder stored in bfloat16 (as LISA-7B is) or float16: accepted as stored, upcast
    exactly (its float32 load equals the PyTorch reference run on the same rounded weights);
    ``dtype="bfloat16"`` keeps the language side in bf16 and SAM in float32."""
    import torch

    from tests.support.m2sa_helpers import write_sharded_safetensors
    from m2sa_jax.tree import flatten

    ref_rounded = None
    for torch_dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        folder = tmp_path / name
        shutil.copytree(released["folder"], folder,
                        ignore=shutil.ignore_patterns("pytorch_model*"))
        state = {k: torch.from_numpy(v).to(torch_dtype)
                 for k, v in torch_io.iter_checkpoint(str(released["folder"]))}
        write_sharded_safetensors(state, str(folder), 2)
        tower = tmp_path / f"tower-{name}"
        shutil.copytree(released["tower"], tower)
        loaded = resolve(str(folder), vision_tower=str(tower))
        assert all(x.dtype == np.float32 for x in flatten(loaded.params).values())
        if torch_dtype == torch.bfloat16:
            ref_rounded = state
    # the reference on the same rounded weights (the tower as saved, float32)
    import copy

    ref = copy.deepcopy(released["ref"])
    missing = ref.llm.load_state_dict({k: v.float() for k, v in ref_rounded.items()},
                                      strict=False)
    assert all("vision_tower" in k for k in missing.missing_keys) and not missing.unexpected_keys
    _, _, want, _ = teacher_forced_case(ref, released["seg_id"], SP_VOCAB)
    loaded = resolve(str(tmp_path / "bf16"), vision_tower=str(released["tower"]))
    err = _mask_error(dict(released, want=want), loaded)
    print(f"\nbf16-stored folder loaded as float32: mask logits max abs err {err:.2e}")
    assert err <= 1e-4

    half = resolve(str(tmp_path / "bf16"), vision_tower=str(released["tower"]), dtype="bfloat16")
    dtypes = {p: x.dtype for p, x in flatten(half.params).items()}
    assert all(d == np.float32 for p, d in dtypes.items() if p.startswith("sam/"))
    assert all(d == jax.numpy.bfloat16 for p, d in dtypes.items() if not p.startswith("sam/"))
    assert half.config.llava.text.dtype == jax.numpy.bfloat16
    pred = m2sa_jax.load(str(tmp_path / "bf16"), vision_tower=str(released["tower"]),
                         dtype="bfloat16", max_new_tokens=4)
    result = pred.segment(str(released["photo"]), "the helmet?")
    assert result.masks.shape[1:] == (256, 171)

"""Exact resume of a real training process (issue 6 item 4), and the export of the trained
run to PyTorch (item 6).

``train.py`` runs as a subprocess on a tiny synthetic config (LoRA on, so dropout draws from
the run's RNG too). One run goes uninterrupted. Another is SIGKILLed after step 5 (checkpoint
2 complete, checkpoint 4 possibly half written), resumed, stopped with SIGTERM (it must save and exit cleanly), and
resumed again to the end. Every step's losses, as logged to ``workdir/train_log.jsonl``, must
match the uninterrupted run's to 1e-6: parameters, optimizer state, step, RNG and the data
iterator's position all came back. A persistent compilation cache shared by the runs keeps
the later runs from compiling the step again.

The uninterrupted run is then exported with ``python -m m2sa_jax.training.export`` (LoRA
merged, LISA/M²SA layout) and loaded into the PyTorch reference
(tests/support/torch_m2sa_reference.py) built from the exported config.json; its forward on a training batch must match the JAX model
run from the checkpoint with the LoRA branch unmerged (logits ≤ 1e-4, mask logits ≤ 1e-3 as in
the M²SA parity test). The export lives here to reuse the trained run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from m2sa_jax.checkpoints.torch_io import iter_checkpoint
from m2sa_jax import sharding
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.models import lora as lora_lib
from m2sa_jax.models.m2sa import M2SA
from m2sa_jax.checkpoints import runs as ckpt_lib
from m2sa_jax.training import loop
from tests.support import train_tiny

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 8
EXTRA = dict(train__lora__rank=4, train__lora__dropout=0.1, eval__overlays=0,
             eval__images_per_batch=2)


def _log(workdir) -> dict[int, dict]:
    """Last record per step (a killed run's steps are logged again after resuming)."""
    out = {}
    path = os.path.join(workdir, "train_log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    rec = json.loads(line)
                    out[rec["step"]] = rec
    return out


def _lines(workdir) -> int:
    path = os.path.join(workdir, "train_log.jsonl")
    return sum(1 for _ in open(path)) if os.path.isfile(path) else 0


def _start(workdir, data_root, cache, out_name):
    out = open(os.path.join(os.path.dirname(workdir), out_name), "w")
    proc = subprocess.Popen(train_tiny.train_command(workdir, data_root, **EXTRA),
                            env=train_tiny.env(cache), stdout=out, stderr=subprocess.STDOUT,
                            text=True)
    return proc, out


def _wait_for(predicate, proc, what, timeout=240):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (rc {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _steps_saved(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _finish(proc, out, timeout=300) -> str:
    proc.wait(timeout=timeout)
    out.close()
    return open(out.name).read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data, cache = str(tmp / "data"), str(tmp / "jax_cache")
    timings = {}

    t = time.monotonic()
    full = str(tmp / "full")
    proc, out = _start(full, data, cache, "full.out")
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-3000:]
    timings["uninterrupted"] = time.monotonic() - t

    t = time.monotonic()
    cut = str(tmp / "cut")
    proc, out = _start(cut, data, cache, "kill.out")
    # Step 5 is logged only after the save of step 2 completed (the save at step 4 waits for
    # it); the kill then lands while step 4 may still be being written.
    _wait_for(lambda: max(_log(cut), default=0) >= 5, proc, "step 5")
    proc.send_signal(signal.SIGKILL)
    killed_text = _finish(proc, out)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _steps_saved(cut)[-1]
    killed_logged = max(_log(cut))
    timings["killed"] = time.monotonic() - t

    t = time.monotonic()
    before = _lines(cut)
    proc, out = _start(cut, data, cache, "term.out")
    _wait_for(lambda: _lines(cut) > before, proc, "a step after resuming")
    proc.send_signal(signal.SIGTERM)
    term_text = _finish(proc, out)
    timings["terminated"] = time.monotonic() - t
    term_rc, term_saved = proc.returncode, _steps_saved(cut)
    term_logged = [json.loads(l)["step"] for l in open(os.path.join(cut, "train_log.jsonl"))][before:]

    t = time.monotonic()
    proc, out = _start(cut, data, cache, "resume.out")
    resume_text = _finish(proc, out)
    assert proc.returncode == 0, resume_text[-3000:]
    timings["resumed"] = time.monotonic() - t
    print("\nrun wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return dict(tmp=tmp, data=data, cache=cache, full_dir=full, full=_log(full), cut=_log(cut), killed_at=killed_at,
                killed_logged=killed_logged, term_rc=term_rc, term_saved=term_saved,
                term_logged=term_logged, term_text=term_text, resume_text=resume_text,
                killed_text=killed_text)


def test_sigkill_then_resume_reproduces_the_losses(runs):
    full, cut = runs["full"], runs["cut"]
    assert sorted(full) == list(range(1, STEPS + 1))
    assert sorted(cut) == list(range(1, STEPS + 1))
    assert f"resumed from" in runs["resume_text"]
    worst = 0.0
    for step in range(1, STEPS + 1):
        for key in ("loss", "ce", "bce", "dice", "grad_norm", "lr"):
            err = abs(full[step][key] - cut[step][key])
            worst = max(worst, err)
            assert err <= 1e-6, (step, key, full[step][key], cut[step][key])
    print(f"killed after checkpoint {runs['killed_at']} (step {runs['killed_logged']} logged); "
          f"max abs loss difference vs uninterrupted over {STEPS} steps: {worst:.1e}")
    # the losses moved: equality is not that of a run that does not train
    assert full[STEPS]["loss"] != full[1]["loss"]


def test_sigterm_saves_and_exits_cleanly(runs):
    assert runs["term_rc"] == 0, runs["term_text"][-3000:]
    assert runs["term_logged"], "the SIGTERMed run logged no step"
    last = runs["term_logged"][-1]
    assert last < STEPS
    # it saved the step it stopped at (not only the periodic ones)
    assert last in runs["term_saved"], (last, runs["term_saved"])
    assert f"at step {last}" in runs["resume_text"]


def _torch_from_folder(folder, sam_cfg):
    """The PyTorch reference built from an exported folder's config.json, weights loaded
    strictly (every key present, every shape right)."""
    import torch
    import torch.nn as tnn
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
    from segment_anything.modeling.common import LayerNorm2d
    from transformers import CLIPVisionConfig, LlamaConfig

    from tests.support.torch_m2sa_reference import TorchM2SA

    hf = json.load(open(os.path.join(folder, "config.json")))
    assert hf["architectures"] == ["LISAForCausalLM"]
    vision = dict(hf.pop("vision_config"))
    llama_cfg = LlamaConfig(**hf, attn_implementation="eager")
    clip_cfg = CLIPVisionConfig(**vision, attn_implementation="eager")
    s = sam_cfg
    grid = s["img_size"] // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=s["encoder_depth"], embed_dim=s["encoder_embed_dim"], img_size=s["img_size"],
            mlp_ratio=4, norm_layer=lambda d: tnn.LayerNorm(d, eps=1e-6),
            num_heads=s["encoder_num_heads"], patch_size=16, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(s["global_attn_indexes"]), window_size=s["window_size"],
            out_chans=s["prompt_embed_dim"]),
        prompt_encoder=PromptEncoder(
            embed_dim=s["prompt_embed_dim"], image_embedding_size=(grid, grid),
            input_image_size=(s["img_size"], s["img_size"]), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=s["prompt_embed_dim"],
                                          mlp_dim=s["decoder_mlp_dim"],
                                          num_heads=s["decoder_num_heads"]),
            transformer_dim=s["prompt_embed_dim"], iou_head_depth=3,
            iou_head_hidden_dim=s["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    d = s["prompt_embed_dim"]
    sam.mask_decoder.compress_vit = tnn.Sequential(
        tnn.Conv2d(s["encoder_embed_dim"], d, 3, padding=1), LayerNorm2d(d), tnn.GELU(),
        tnn.Conv2d(d, d, 3, padding=1))
    seg_id = LegacyLlamaTokenizer.from_pretrained(folder, add_model_tokens=False) \
        .convert_tokens_to_ids("[SEG]")
    rows = (clip_cfg.image_size // clip_cfg.patch_size) ** 2
    ref = TorchM2SA(llama_cfg, clip_cfg, sam, seg_token_id=seg_id, num_image_rows=rows)
    tower = "model.vision_tower.vision_tower."
    state = {}
    for k, v in iter_checkpoint(folder):
        if k.startswith(tower + "vision_model."):         # transformers 5 has no such level
            k = tower + k[len(tower + "vision_model."):]
        state[k] = torch.from_numpy(np.asarray(v))
    ref.llm.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.mark.torch
def test_export_of_the_trained_run_matches_pytorch(runs):
    import torch

    dst = str(runs["tmp"] / "exported")
    cmd = [train_tiny.sys.executable, "-m", "m2sa_jax.training.export",
           "--workdir", runs["full_dir"], "--dst", dst]
    t = time.monotonic()
    done = subprocess.run(cmd, env=train_tiny.env(runs["cache"]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\nexport CLI {time.monotonic() - t:.1f} s")

    # JAX: the trained run's last checkpoint, LoRA applied at run time (not merged)
    cfg = train_tiny.config(runs["data"], **EXTRA)
    config, params, tokenizer, root, images, *_ = loop.build(cfg)
    mesh = sharding.mesh_from_config(cfg.mesh)
    state, _, _, _, _, lora_cfg = loop.init_state(cfg, config, params, mesh)
    ckpts = ckpt_lib.RunCheckpoints(os.path.join(runs["full_dir"], "checkpoints"),
                                    async_save=False)
    assert ckpts.latest_step() == STEPS
    variables = ckpts.restore(STEPS, ckpt_lib.abstract_like(state))[0]["variables"]
    ckpts.close()
    assert float(np.abs(np.asarray(jax.tree.leaves(variables["lora"])[1])).max()) > 0
    model = M2SA(config)

    @jax.jit
    def forward(variables, batch):
        with nn.intercept_methods(lora_lib.lora_interceptor(lora_cfg, deterministic=True)):
            return model.apply(variables, batch, method=M2SA.forward_batch)

    batch = next(loop._train_stream(cfg, config, tokenizer, root, images, SkipCounter()))
    out = jax.device_get(forward(variables, batch))

    # PyTorch: the exported folder
    ref = _torch_from_folder(dst, dict(cfg.model.sam))
    n_img = int(batch["image_valid"].sum())
    q = int(batch["conv_valid"].sum())
    assert np.all(np.diff(batch["conv_image_index"][:q]) >= 0)
    with torch.no_grad():
        r = ref(torch.from_numpy(batch["sam_images"][:n_img]).permute(0, 3, 1, 2),
                torch.from_numpy(batch["clip_images"][:n_img]).permute(0, 3, 1, 2),
                torch.from_numpy(batch["input_ids"][:q].astype(np.int64)),
                torch.from_numpy(batch["attention_mask"][:q].astype(np.int64)),
                torch.from_numpy(batch["conv_image_index"][:q].astype(np.int64)),
                [tuple(x) for x in batch["resized_hw"][:n_img]],
                [tuple(x) for x in batch["original_hw"][:n_img]])
    n_extra = ref.num_image_rows - 1
    real = np.concatenate([np.ones((q, n_extra), bool), batch["attention_mask"][:q]], 1)
    err_logits = float(np.abs(out["logits"][:q] - r["logits"].numpy())[real].max())
    slots = np.asarray(out["seg_valid"])
    ours = np.asarray(out["mask_logits"])[slots]
    theirs = [m.numpy() for m in r["mask_logits"]]
    assert ours.shape[0] == sum(m.shape[0] for m in theirs) > 0
    err_masks, i = 0.0, 0
    for img, m in enumerate(theirs):
        h, w = batch["original_hw"][img]
        err_masks = max(err_masks, float(np.abs(ours[i:i + len(m), :h, :w] - m).max()))
        i += len(m)
    print(f"exported run in PyTorch vs JAX (LoRA unmerged): max abs err logits "
          f"{err_logits:.1e}, mask logits {err_masks:.1e}")
    assert err_logits <= 1e-4
    assert err_masks <= 1e-3

    # The workdir itself as a model source (the resolver: latest step, LoRA merged, the run's
    # tokenizer, no experiment config): its teacher-forced masks equal the PyTorch reference's.
    from m2sa_jax.checkpoints.resolve import resolve

    loaded = resolve(runs["full_dir"])
    assert loaded.kind == "workdir" and loaded.description.endswith(f"step {STEPS}")
    assert loaded.tokenizer.seg_token_id == tokenizer.seg_token_id
    model_w = M2SA(loaded.config)
    out_w = jax.device_get(jax.jit(lambda p, b: model_w.apply({"params": p}, b,
                                                              method=M2SA.forward_batch))(
        loaded.params, batch))
    ours_w = np.asarray(out_w["mask_logits"])[slots]
    err_w, i = 0.0, 0
    for img, m in enumerate(theirs):
        h, w = batch["original_hw"][img]
        err_w = max(err_w, float(np.abs(ours_w[i:i + len(m), :h, :w] - m).max()))
        i += len(m)
    print(f"the workdir through the resolver vs PyTorch: mask logits max abs err {err_w:.1e}")
    assert err_w <= 1e-4

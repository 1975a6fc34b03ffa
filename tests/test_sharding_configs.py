"""The paper configs load, have the synthetic config's structure, state SPEC §4's recipe, and
describe models whose parameter counts, trainable set and per-device shards are right.

Nothing here has weights: the models are abstract (jax.eval_shape), the meshes abstract.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from jax.sharding import AbstractMesh

from m2sa_jax import config_file, sharding
from m2sa_jax.models import llama
from m2sa_jax.tree import flatten
from m2sa_jax.training import memory_plan, optim, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = ("m2sa_7b", "m2sa_llama2_13b", "lisa_7b")

# SPEC §1 parameter counts (vocabulary 32,003)
LLAMA_7B, LLAMA2_13B = 6_738_440_192, 13_015_895_040
SAM_H, COMPRESS_VIT, SAM_DECODER = 641_090_608, 3_539_968, 4_058_340
CLIP_L = 303_179_776


def load(name: str, arg: str | None = None):
    return config_file.load(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else ""))


def _keys(c, prefix=""):
    out = set()
    for k, v in c.items():
        out.add(prefix + k)
        if hasattr(v, "items") and not isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.mark.parametrize("name", PAPER)
def test_structure_matches_synthetic(name):
    c, synthetic = load(name), load("synthetic")
    data_keys = {"data." + k for k in ("kind", "root", "mmr_root", "image_root", "max_questions",
                                       "images_per_batch", "max_targets", "token_buckets",
                                       "mask_hw", "model_max_length", "released_pairing",
                                       "read_threads")}
    # architecture dicts differ by model (the SAM ViT-H is named by model_type alone)
    arch = ("data.", "model.llm.", "model.clip.", "model.sam.")
    want = {k for k in _keys(synthetic) if not k.startswith(arch)} | data_keys
    want |= {"model.llm.scan_layers", "model.llm.remat_policy", "model.sam.model_type"}
    missing = want - _keys(c)
    assert not missing, f"configs/{name}.py lacks {sorted(missing)}"
    assert c.model.init == "checkpoint" and c.data.kind == "mixture"
    assert set(c.mesh) == {"data", "fsdp", "tensor", "rules"}


@pytest.mark.parametrize("name", PAPER)
def test_recipe(name):
    c = load(name)
    t = c.train
    assert (t.lr, t.b1, t.b2, t.weight_decay, t.clip_norm, t.warmup_steps, t.grad_accum) == \
        (3e-4, 0.9, 0.95, 0.0, 1.0, 100, 10)
    assert dict(t.lora) == dict(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
    assert tuple(t.trainable) == optim.M2SA_TRAINABLE
    assert c.model.compute_dtype == "bfloat16"
    assert dict(c.data.ratios) == dict(sem_seg=2.0, refer_seg=9.0, vqa=2.0, mmr=6.0)
    assert c.data.max_questions == 3
    if name == "lisa_7b":
        assert c.model.variant == "lisa" and c.data.model_max_length == 512
        assert (t.ce_weight, t.bce_weight, t.dice_weight) == (1.0, 2.0, 0.5)
        assert t.steps == 5_000 and max(c.data.token_buckets) <= 512
    else:
        assert c.model.variant == "m2sa" and c.data.model_max_length == 2048
        assert (t.ce_weight, t.bce_weight, t.dice_weight) == (1.0, 0.5, 2.0)   # the paper's
        assert t.steps == 50_000                                                # 10 × 5,000
    public = load("m2sa_7b", "public")
    assert (public.train.bce_weight, public.train.dice_weight, public.train.steps) == (2.0, 0.5, 5_000)
    with pytest.raises(ValueError, match="unknown variant"):
        load(name, "nope")


@pytest.mark.parametrize("name", PAPER)
def test_checkpoint_init_says_what_to_set(name):
    with pytest.raises(ValueError, match="model.llava_checkpoint and model.sam_checkpoint"):
        setup.init_from_checkpoints(load(name), seed=0)


@pytest.fixture(scope="module")
def abstract_7b():
    cfg = load("m2sa_7b")
    config = memory_plan.model_config(cfg)
    variables, labels, optimizer, lora_cfg, _ = memory_plan.train_parts(cfg, config)
    return cfg, config, variables, labels


def _count(tree, prefix=""):
    return sum(int(np.prod(v.shape)) for p, v in flatten(tree).items() if p.startswith(prefix))


def test_7b_parameter_counts_and_trainable_set(abstract_7b):
    cfg, config, variables, labels = abstract_7b
    p = variables["params"]
    assert _count(p["llava"]["language_model"]) == LLAMA_7B
    assert _count(p["llava"]["vision_tower"]) == CLIP_L
    # + the prompt encoder's random-Fourier matrix (2×128), a buffer in PyTorch, a leaf here
    assert _count(p["sam"]) == SAM_H + COMPRESS_VIT + 2 * 128
    d, vocab = 4096, 32003
    lora = 32 * 2 * (d * 8 + 8 * d)                              # q_proj, v_proj of 32 layers
    fcs = d * d + d + d * 256 + 256
    want = lora + 2 * vocab * d + SAM_DECODER + COMPRESS_VIT + fcs
    flat = flatten(labels)
    shapes = flatten(variables)
    trainable_count = sum(int(np.prod(shapes[p].shape)) for p, label in flat.items()
                          if label == optim.TRAINABLE)
    assert trainable_count == want
    for path, label in flat.items():
        trainable = (path.startswith("lora/") or "/mask_decoder/" in path
                     or "/text_hidden_fcs/" in path or "/embed_tokens/" in path
                     or "/lm_head/" in path)
        assert (label == optim.TRAINABLE) == trainable, path


def test_13b_parameter_count():
    config = memory_plan.model_config(load("m2sa_llama2_13b"))

    assert _count(llama.param_shapes(config.llava.text)) == LLAMA2_13B
    assert config.llava.text.rms_norm_eps == 1e-5


def test_7b_shards_on_8_devices(abstract_7b):
    """fsdp=8: every big matrix is split 8 ways, so a device holds about 1/8 of the float32
    state (the odd-sized vocabulary stays unsplit on the tensor axis but splits on fsdp)."""
    cfg, config, variables, labels = abstract_7b
    mesh = AbstractMesh((1, 8, 1), sharding.MESH_AXES)
    sh = sharding.param_shardings(variables, mesh)
    full = 4 * _count(variables)
    per_device = memory_plan.shard_bytes(variables, sh)
    print(f"7B state float32: {full / 1e9:.2f} GB in all, {per_device / 1e9:.3f} GB per device")
    assert per_device < full / 8 * 1.02
    specs = {p: s.spec for p, s in flatten(sh).items()}
    big = [p for p, v in flatten(variables).items() if int(np.prod(v.shape)) >= 1 << 22]   # ≥ 16 MB
    unsplit = [p for p in big if "fsdp" not in str(specs[p])]
    assert not unsplit, unsplit[:5]
    # scanned LLM layers keep the layer axis whole
    q = "params/llava/language_model/layers/layer/self_attn/q_proj/kernel"
    assert tuple(specs[q]) == (None, "fsdp", None)
    tp = sharding.spec_for(q, (32, 4096, 4096), AbstractMesh((1, 2, 4), sharding.MESH_AXES))
    assert tuple(tp) == (None, "fsdp", "tensor")
    emb = "params/llava/language_model/embed_tokens/embedding"
    assert tuple(sharding.spec_for(emb, (32003, 4096), AbstractMesh((1, 2, 4), sharding.MESH_AXES))) \
        == (None, "fsdp")


def test_sharding_rules_are_chosen_by_name(abstract_7b):
    """config.mesh.rules names a registered logical-axis table; the train state's layout (what
    the memory plan and the loop use) follows it."""
    cfg, config, variables, _ = abstract_7b
    assert cfg.mesh.rules == "fsdp_tensor"
    q = "params/llava/language_model/layers/layer/self_attn/q_proj/kernel"
    mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
    specs = {name: tuple(sharding.spec_for(q, (32, 4096, 4096), mesh, name))
             for name in sharding.RULES}
    assert specs == {"fsdp_tensor": (None, "fsdp", "tensor"), "fsdp": (None, "fsdp", None),
                     "replicated": (None, None, None)}
    with pytest.raises(ValueError, match="fsdp_tensor, fsdp, replicated"):
        sharding.spec_for(q, (32, 4096, 4096), mesh, "zero3")
    fsdp8 = AbstractMesh((1, 8, 1), sharding.MESH_AXES)
    split = memory_plan.state_bytes_per_device(cfg, config, fsdp8)["params"]
    replicated = cfg.copy_and_resolve_references()
    replicated.mesh.rules = "replicated"
    whole = memory_plan.state_bytes_per_device(replicated, config, fsdp8)["params"]
    assert whole == 4 * _count(variables["params"]) and split < whole / 8 * 1.02

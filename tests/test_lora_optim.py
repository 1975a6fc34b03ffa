"""LoRA through optax masks (issue 6 item 2), on the tiny synthetic M²SA of ``train_tiny``
with the paper's trainable set (SPEC §4: LoRA, embed_tokens, lm_head, the mask decoder,
text_hidden_fcs) and LoRA rank 4 on q_proj/v_proj.

* frozen parameters stay bit-identical over several real train steps and own no Adam moments;
* gradient accumulation over k micro-batches equals one k-times-larger batch;
* LoRA merged into the kernels equals the LoRA branch applied at run time;
* LoRA on nn.scan'ed LLaMA layers equals LoRA on unrolled layers.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2sa_jax.tree import flatten, unflatten
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.models import llama
from m2sa_jax.models import lora as lora_lib
from m2sa_jax.models.m2sa import M2SA
from m2sa_jax import sharding
from m2sa_jax.training import loop, optim
from m2sa_jax.training.step import make_train_step
from tests.support import train_tiny

WEIGHTS = dict(ce_weight=1.0, bce_weight=2.0, dice_weight=0.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora") / "data")
    cfg = train_tiny.config(root, train__lora__rank=4, train__lora__dropout=0.0,
                            train__trainable=optim.M2SA_TRAINABLE, train__lr=1e-2,
                            train__warmup_steps=0)
    config, params, tokenizer, root, images, *_ = loop.build(cfg)
    mesh = sharding.mesh_from_config(cfg.mesh)
    state, _, optimizer, _, labels, lora_cfg = loop.init_state(cfg, config, params, mesh)
    stream = loop._train_stream(cfg, config, tokenizer, root, images, SkipCounter())
    batches = [next(stream) for _ in range(4)]
    model = M2SA(config)
    # one compiled step, on batches twice the stream's (those the accumulation test compares)
    step = jax.jit(make_train_step(model, optimizer, labels, WEIGHTS, lora_cfg))
    return dict(cfg=cfg, config=config, state=state, optimizer=optimizer, labels=labels,
                lora_cfg=lora_cfg, batches=batches, model=model, step=step)


@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_and_have_no_adam_moments(run):
    labels = flatten(run["labels"])
    trainable = sorted(k for k, v in labels.items() if v == optim.TRAINABLE)
    frozen = sorted(k for k, v in labels.items() if v == optim.FROZEN)
    # the paper's set: LoRA, embed_tokens, lm_head, mask decoder, text_hidden_fcs — nothing else
    roots = {k.split("/")[0] + "/" + "/".join(k.split("/")[1:3]) for k in trainable}
    assert any(k.startswith("lora/") for k in trainable)
    assert any(k.startswith("params/llava/language_model/embed_tokens/") for k in trainable), roots
    assert any(k.startswith("params/llava/language_model/lm_head/") for k in trainable), roots
    assert any(k.startswith("params/sam/mask_decoder/compress_vit") for k in trainable), roots
    assert any(k.startswith("params/text_hidden_fcs/") for k in trainable), roots
    for prefix in ("params/llava/vision_tower/", "params/llava/mm_projector/",
                   "params/sam/image_encoder/", "params/sam/prompt_encoder/",
                   "params/llava/language_model/layers_0/"):
        assert any(k.startswith(prefix) for k in frozen), prefix
        assert not any(k.startswith(prefix) for k in trainable), prefix

    before = jax.tree.map(np.asarray, flatten(run["state"]["variables"]))
    state = run["state"]
    for a, b in ((0, 1), (2, 3), (1, 2)):
        state, metrics = run["step"](state, _concat(run["batches"][a], run["batches"][b]))
        assert bool(metrics["finite"])
    after = jax.tree.map(np.asarray, flatten(state["variables"]))
    for k in frozen:
        assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
    # Every trainable leaf the loss reaches moved. Single-mask decoding never reads the IoU
    # head nor the hypernetworks of masks 1-3: zero gradients, so Adam leaves them in place.
    unused = re.compile(r"params/sam/mask_decoder/(iou_prediction_head|"
                        r"output_hypernetworks_mlps_[123])/.*")
    still = sorted(k for k in trainable if np.array_equal(after[k], before[k]))
    assert all(unused.fullmatch(k) for k in still), [k for k in still if not unused.fullmatch(k)]
    # LoRA sits on the LLM's q_proj/v_proj only (not CLIP's or SAM's, also named so)
    lora_paths = [k for k in trainable if k.startswith("lora/")]
    n_layers = run["config"].llava.text.num_hidden_layers
    assert len(lora_paths) == n_layers * 2 * 2, lora_paths
    assert all(k.startswith("lora/llava/language_model/layers_") for k in lora_paths), lora_paths

    # multi_transform: the frozen group's state is set_to_zero's (empty); the trainable
    # group's Adam moments hold an array exactly for each trainable leaf, MaskedNode elsewhere.
    opt = state["opt_state"]
    assert isinstance(opt, optax.MultiTransformState)
    frozen_state = opt.inner_states[optim.FROZEN]
    assert jax.tree.leaves(frozen_state) == []
    assert isinstance(frozen_state.inner_state, optax.EmptyState)
    adam = _adam(opt)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    for moment in (adam.mu, adam.nu):
        leaves = jax.tree_util.tree_flatten_with_path(moment, is_leaf=is_masked)[0]
        paths = {"/".join(str(getattr(p, "key", p)) for p in path): leaf for path, leaf in leaves}
        assert sorted(paths) == sorted(labels)
        for k, leaf in paths.items():
            if labels[k] == optim.TRAINABLE:
                assert not is_masked(leaf) and leaf.shape == after[k].shape, k
            else:
                assert is_masked(leaf), k
    n_moment = sum(x.size for x in jax.tree.leaves(adam.mu))
    assert n_moment == sum(after[k].size for k in trainable)
    print(f"\ntrainable {len(trainable)} leaves ({n_moment:,} values with Adam moments), "
          f"frozen {len(frozen)} leaves bit-identical after 3 steps")


def _adam(opt_state) -> optax.ScaleByAdamState:
    """The one Adam state inside multi_transform's trainable group."""
    found = [s for s in jax.tree.leaves(
        opt_state.inner_states[optim.TRAINABLE],
        is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


def _same_layout(a, b):
    """Micro-batch 2: batch ``b``'s images and masks in batch ``a``'s text layout, so both
    micro-batches have the same supervised-token and target counts."""
    out = dict(a)
    for k in ("sam_images", "clip_images", "gt_masks"):
        out[k] = b[k]
    return out


def _concat(a, b):
    """One batch holding both: images stacked, conversations stacked, b's image indices
    shifted past a's images."""
    n_img = a["sam_images"].shape[0]
    out = {}
    for k in a:
        x, y = a[k], b[k]
        if k == "conv_image_index":
            y = y + n_img
        out[k] = np.concatenate([x, y])
    return out


@pytest.mark.slow
def test_gradient_accumulation_equals_one_larger_batch(run):
    """k = 2 micro-batches vs one batch of both.

    The step averages the micro-batches' losses and gradients; the larger batch normalises once:
    CE by its supervised tokens, BCE/Dice by its masks. The two agree when every micro-batch
    has the same number of supervised tokens and of masks (mean of equal-size means = mean of
    the union), so micro-batch 2 carries other images and masks in micro-batch 1's text and
    target layout. The gradients are compared through Adam's first moment after one step
    (mu = (1 - b1)·g, g clipped by the same global norm in both): the first parameter update
    itself is g/(|g| + eps), which rounding in gradients far below eps can move by up to lr.
    """
    b1 = run["batches"][0]
    b2 = _same_layout(b1, run["batches"][1])
    assert not np.array_equal(b1["sam_images"], b2["sam_images"])
    assert not np.array_equal(b1["gt_masks"], b2["gt_masks"])
    stacked = {k: np.stack([b1[k], b2[k]]) for k in b1}
    big = _concat(b1, b2)
    accum = jax.jit(make_train_step(run["model"], run["optimizer"], run["labels"], WEIGHTS,
                                    run["lora_cfg"], grad_accum=2))
    s_acc, m_acc = accum(run["state"], stacked)
    s_big, m_big = run["step"](run["state"], big)
    errs = {}
    for k in ("loss", "ce", "bce", "dice", "grad_norm"):
        errs[k] = abs(float(m_acc[k]) - float(m_big[k]))
        assert errs[k] <= 1e-5 * max(1.0, abs(float(m_big[k]))), (k, m_acc[k], m_big[k])
    g_acc, g_big = (_adam(s["opt_state"]).mu for s in (s_acc, s_big))
    scale = 1.0 / (1.0 - run["cfg"].train.b1)
    errs["grads"] = max(float(jnp.max(jnp.abs(a - b))) * scale
                        for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_big)))
    g_max = max(float(jnp.max(jnp.abs(a))) * scale for a in jax.tree.leaves(g_big))
    print("\ngrad accumulation (k=2) vs one 2x batch, max abs err: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (largest grad {g_max:.1e})")
    assert g_max > 1e-3
    assert errs["grads"] <= 1e-5


def _random_lora(lora_tree, seed):
    """LoRA factors with B ≠ 0 (init makes B = 0, which would make merging trivial)."""
    flat = flatten(lora_tree)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return unflatten({k: jax.random.normal(key, v.shape, v.dtype) * 0.2
                      for key, (k, v) in zip(keys, sorted(flat.items()))})


@pytest.mark.slow
def test_lora_merged_equals_unmerged_on_the_m2sa_forward(run):
    model, lora_cfg = run["model"], run["lora_cfg"]
    params = run["state"]["variables"]["params"]
    lora = _random_lora(run["state"]["variables"]["lora"], 1)
    batch = run["batches"][0]

    @jax.jit
    def forward(params, lora, batch):
        with nn.intercept_methods(lora_lib.lora_interceptor(lora_cfg, deterministic=True)):
            return model.apply({"params": params, "lora": lora}, batch, method=M2SA.forward_batch)

    # merged: the same compiled forward with the factors folded in and a zero LoRA branch
    merged_params = lora_lib.merge(params, lora, lora_cfg)
    u = forward(params, lora, batch)
    m = forward(merged_params, jax.tree.map(jnp.zeros_like, lora), batch)
    err = {k: float(jnp.max(jnp.abs(u[k] - m[k]))) for k in ("logits", "mask_logits")}
    flat_p, flat_m = flatten(params), flatten(merged_params)
    changed = sorted(k for k in flat_p if not np.array_equal(flat_p[k], flat_m[k]))
    print(f"\nLoRA merged vs unmerged max abs err: {err}")
    assert changed and all("/language_model/" in k and k.endswith(("q_proj/kernel", "v_proj/kernel"))
                           for k in changed), changed
    assert max(float(jnp.max(jnp.abs(flat_p[k] - flat_m[k]))) for k in changed) > 1e-2
    assert err["logits"] <= 1e-5
    assert err["mask_logits"] <= 1e-4


def _stack_layers(flat, n, prefix):
    """Unrolled ``layers_i/<rest>`` leaves → scanned ``layers/layer/<rest>`` with a layer axis."""
    out = {k: v for k, v in flat.items() if not k.startswith(prefix + "layers_")}
    rests = {k.split("/", 1)[1] for k in flat if k.startswith(prefix + "layers_0/")}
    for rest in rests:
        out[f"{prefix}layers/layer/{rest}"] = jnp.stack(
            [flat[f"{prefix}layers_{i}/{rest}"] for i in range(n)])
    return out


def test_lora_on_scanned_layers_equals_unrolled():
    """models/llama.py scans with the "lora" collection along the layer axis: each layer
    must see its own LoRA slice, forward and backward."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    unrolled = llama.LlamaForCausalLM(llama.LlamaConfig(**base))
    scanned = llama.LlamaForCausalLM(llama.LlamaConfig(**base, scan_layers=True))
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
    params = unrolled.init(jax.random.key(1), ids)["params"]
    cfg = lora_lib.LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj", "v_proj"))
    lora = _random_lora(lora_lib.init(jax.random.key(2), params, cfg), 3)
    s_params = unflatten(_stack_layers(flatten(params), 3, ""))
    s_lora = unflatten(_stack_layers(flatten(lora), 3, ""))
    assert flatten(s_lora).keys() == flatten(
        lora_lib.init(jax.random.key(2), s_params, cfg)).keys()

    def loss(model):
        def f(params, lora):
            with nn.intercept_methods(lora_lib.lora_interceptor(cfg, deterministic=True)):
                logits = model.apply({"params": params, "lora": lora}, ids)["logits"]
            return jnp.mean(jnp.square(logits)), logits
        return jax.jit(jax.value_and_grad(f, argnums=1, has_aux=True))

    (_, lu), gu = loss(unrolled)(params, lora)
    (_, ls), gs = loss(scanned)(s_params, s_lora)
    lp = unrolled.apply({"params": params}, ids)["logits"]
    err_logits = float(jnp.max(jnp.abs(lu - ls)))
    gu_stacked = _stack_layers(flatten(gu), 3, "")
    err_grads = max(float(jnp.max(jnp.abs(gu_stacked[k] - v))) for k, v in flatten(gs).items())
    print(f"\nscanned vs unrolled with LoRA: logits {err_logits:.1e}, LoRA grads {err_grads:.1e}")
    assert float(jnp.max(jnp.abs(lu - lp))) > 1e-3          # LoRA changes the output
    assert err_logits <= 1e-5
    assert err_grads <= 1e-5


def test_lora_config_from_a_configs_train_lora():
    assert lora_lib.LoraConfig.from_dict(dict(rank=0, alpha=16.0, dropout=0.05,
                                              targets=("q_proj",))) is None
    cfg = lora_lib.LoraConfig.from_dict(dict(rank=8, alpha=16, dropout=0, targets=["q_proj", "v_proj"]))
    assert cfg == lora_lib.LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"))
    assert cfg.scale == 2.0

"""LLaMA decoder parity against transformers' LlamaForCausalLM (tiny random configs).

The checkpoints are written in both upstream formats: ``save_pretrained`` (safetensors) and a
sharded ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json``, so both readers run.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from m2sa_jax.checkpoints import llava as convert_llava
from checkpoints_convert.__main__ import main as convert_main
from m2sa_jax.models import llama
from m2sa_jax.checkpoints.converted import load_meta, load_params
from m2sa_jax.tree import count_params
from tests.support.m2sa_helpers import write_sharded_bin

pytestmark = pytest.mark.torch

VOCAB = 101


def save_sharded_bin(model, folder, shards=3):
    """The pre-safetensors Hugging Face format: pickled shards plus a JSON index."""
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    write_sharded_bin({k: v.detach().clone() for k, v in model.state_dict().items()}, folder,
                      shards)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (folder, torch model)}: GQA + non-default rope_theta (safetensors), MHA (.bin)."""
    root = tmp_path_factory.mktemp("llama")
    out = {}
    torch.manual_seed(0)
    gqa = HFLlama(HFLlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6,
        max_position_embeddings=256)).eval()
    gqa.save_pretrained(root / "gqa")
    out["gqa_safetensors"] = (str(root / "gqa"), gqa)
    mha = HFLlama(HFLlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=3, rms_norm_eps=1e-5, max_position_embeddings=256)).eval()
    save_sharded_bin(mha, str(root / "mha_bin"))
    out["mha_bin"] = (str(root / "mha_bin"), mha)
    return out


def _load(folder, scan=False, **overrides):
    params, layout, config, _ = convert_llava.convert_folder(folder, scan=scan)
    assert layout.name == "llama"
    return params, dataclasses.replace(config, scan_layers=scan, **overrides)


def _jit_apply(config):
    return jax.jit(llama.LlamaForCausalLM(config).apply, static_argnames=("return_all_hidden",))


def _hf_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else dict(attention_mask=torch.tensor(mask, dtype=torch.long))
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("name", ["gqa_safetensors", "mha_bin"])
def test_logits_match_transformers(checkpoints, name):
    folder, hf = checkpoints[name]
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 13))
    ref = _hf_logits(hf, ids)
    for scan in (False, True):
        params, config = _load(folder, scan)
        out = _jit_apply(config)({"params": params}, jnp.asarray(ids))
        err = np.abs(np.asarray(out["logits"]) - ref).max()
        print(f"{name} scan={scan}: logits max abs error {err:.2e}")
        assert err <= 1e-4


def test_scanned_and_unrolled_agree(checkpoints):
    folder, _ = checkpoints["gqa_safetensors"]
    ids = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, 10)))
    outs = []
    for scan, remat in ((False, "none"), (True, "none"), (True, "nothing_saveable"),
                        (False, "dots_saveable")):
        params, config = _load(folder, scan, remat_policy=remat)
        outs.append(np.asarray(_jit_apply(config)(
            {"params": params}, ids, return_all_hidden=True)["logits"]))
    for o in outs[1:]:
        err = np.abs(o - outs[0]).max()
        print(f"scanned/remat vs unrolled: max abs difference {err:.1e}")
        assert err <= 1e-6


def test_hidden_states_match_transformers(checkpoints):
    folder, hf = checkpoints["gqa_safetensors"]
    ids = np.random.RandomState(2).randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        ref = hf(torch.tensor(ids), output_hidden_states=True).hidden_states
    params, config = _load(folder, scan=True)
    out = _jit_apply(config)({"params": params}, jnp.asarray(ids), return_all_hidden=True)
    assert len(out["hidden_states"]) == len(ref) == config.num_hidden_layers + 1
    for ours, theirs in zip(out["hidden_states"], ref):
        assert np.abs(np.asarray(ours) - theirs.numpy()).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(out["last_hidden_state"]),
                                  np.asarray(out["hidden_states"][-1]))


def test_padded_batch_equals_rows(checkpoints):
    """Left- and right-padded rows give the logits of the unpadded row at the real tokens."""
    folder, hf = checkpoints["gqa_safetensors"]
    params, config = _load(folder)
    apply = _jit_apply(config)
    rs = np.random.RandomState(3)
    a, b = rs.randint(0, VOCAB, 11), rs.randint(0, VOCAB, 6)
    ids = np.zeros((3, 11), np.int32)
    mask = np.zeros((3, 11), bool)
    ids[0], mask[0] = a, True
    ids[1, 5:], mask[1, 5:] = b, True  # left padded
    ids[2, :6], mask[2, :6] = b, True  # right padded
    out = np.asarray(apply({"params": params}, jnp.asarray(ids),
                           attention_mask=jnp.asarray(mask))["logits"])
    alone_a = np.asarray(apply({"params": params}, jnp.asarray(a[None]))["logits"])[0]
    alone_b = np.asarray(apply({"params": params}, jnp.asarray(b[None]))["logits"])[0]
    assert np.abs(out[0] - alone_a).max() <= 1e-5
    assert np.abs(out[1, 5:] - alone_b).max() <= 1e-5
    assert np.abs(out[2, :6] - alone_b).max() <= 1e-5
    # and transformers agrees on the left-padded batch (its position ids come from the mask)
    with torch.no_grad():
        m = torch.tensor(mask[:2], dtype=torch.long)
        ref = hf(torch.tensor(ids[:2]), attention_mask=m,
                 position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits.numpy()
    assert np.abs(out[1, 5:] - ref[1, 5:]).max() <= 1e-4


def test_cached_decoding_equals_uncached_forward(checkpoints):
    for scan in (False, True):
        folder, _ = checkpoints["gqa_safetensors"]
        params, config = _load(folder, scan)
        apply = _jit_apply(config)
        ids = np.random.RandomState(4).randint(0, VOCAB, (2, 12))
        full = np.asarray(apply({"params": params}, jnp.asarray(ids))["logits"])
        cache = llama.init_cache(config, 2, 16)
        out = apply({"params": params}, jnp.asarray(ids[:, :7]), cache=cache)
        steps = [np.asarray(out["logits"])]
        cache = out["cache"]
        for t in range(7, 12):
            out = apply({"params": params}, jnp.asarray(ids[:, t:t + 1]), cache=cache)
            cache = out["cache"]
            steps.append(np.asarray(out["logits"]))
        err = np.abs(np.concatenate(steps, axis=1) - full).max()
        print(f"scan={scan}: cached vs uncached logits max abs difference {err:.1e}")
        assert err <= 1e-5
        assert np.asarray(cache["index"]).tolist() == [12, 12]


def test_parameter_counts():
    base = dict(vocab_size=32003, max_position_embeddings=2048, rms_norm_eps=1e-6)
    seven = llama.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, head_dim=128, **base)
    thirteen = llama.LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, head_dim=128,
                                 **base)
    assert count_params(llama.param_shapes(seven)) == 6_738_440_192
    assert count_params(llama.param_shapes(thirteen)) == 13_015_895_040
    scanned = dataclasses.replace(thirteen, scan_layers=True)
    assert count_params(llama.param_shapes(scanned)) == 13_015_895_040


def test_bfloat16_compute_close_to_float32(checkpoints):
    """bf16 weights and activations (8-bit mantissa, relative rounding 2^-9 ≈ 0.2 %) over
    3 layers: errors stay a few percent of the logit scale. Bound: max abs error ≤ 5 % of the
    float32 logits' max magnitude, and the argmax agrees on ≥ 90 % of positions."""
    folder, _ = checkpoints["gqa_safetensors"]
    params, config = _load(folder)
    ids = jnp.asarray(np.random.RandomState(5).randint(0, VOCAB, (2, 16)))
    f32 = np.asarray(_jit_apply(config)({"params": params}, ids)["logits"])
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    c16 = dataclasses.replace(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    b16 = np.asarray(_jit_apply(c16)({"params": p16}, ids)["logits"], np.float32)
    scale = np.abs(f32).max()
    err = np.abs(b16 - f32).max()
    agree = (b16.argmax(-1) == f32.argmax(-1)).mean()
    print(f"bf16 vs f32: max abs error {err:.3e} = {err / scale:.2%} of logit scale "
          f"{scale:.3f}; argmax agreement {agree:.0%}")
    assert err <= 0.05 * scale
    assert agree >= 0.9


def test_export_round_trip(checkpoints):
    """Our tree exported to Hugging Face names loads into transformers bit-exactly."""
    folder, hf = checkpoints["mha_bin"]
    params, layout, config, _ = convert_llava.convert_folder(folder, scan=True)
    exported = dict(convert_llava.export_params(params, layout, config, scan=True))
    ref = hf.state_dict()
    assert set(exported) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(exported[k], v.numpy())


def test_cli_writes_orbax_and_tokenizer(checkpoints, tmp_path):
    folder, hf = checkpoints["gqa_safetensors"]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512}, f)
    dst = tmp_path / "out"
    assert convert_main(["llava", "--src", folder, "--dst", str(dst), "--dtype", "bfloat16",
                 "--scan"]) == 0
    meta = load_meta(str(dst))
    assert meta["model"] == "llama" and meta["scan_layers"] and meta["dtype"] == "bfloat16"
    config = llama.LlamaConfig.from_hf(meta["text_config"], scan_layers=True)
    params = load_params(str(dst), expected=llama.param_shapes(config))
    assert params["embed_tokens"]["embedding"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["layer"]["mlp"]["up_proj"]["kernel"][1], np.float32),
        hf.model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16).float().numpy().T)
    assert os.path.isfile(dst / "tokenizer_config.json")
    assert not os.path.exists(dst / ".convert_tmp")


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(ValueError, match="rope type 'linear' is not supported"):
        llama.LlamaConfig.from_hf(dict(vocab_size=10, hidden_size=8, intermediate_size=8,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       rope_scaling={"type": "linear", "factor": 2.0}))

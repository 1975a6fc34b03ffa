"""Jitted generation: token-identical to transformers' greedy ``generate``, one trace per
bucket, padding-invariant, embeddings prompts, the hidden state behind each token."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from m2sa_jax.checkpoints import llava as convert_llava
from m2sa_jax.inference import decode
from m2sa_jax.models import llama

pytestmark = pytest.mark.torch

VOCAB = 101
EOS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode")
    torch.manual_seed(0)
    hf = HFLlama(HFLlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
        max_position_embeddings=256, eos_token_id=EOS, bos_token_id=1, pad_token_id=0)).eval()
    hf.save_pretrained(folder)
    params, _, config, _ = convert_llava.convert_folder(str(folder))
    return hf, params, config


def _prompt(seed, n):
    return np.random.RandomState(seed).randint(3, VOCAB, n)


def test_greedy_matches_transformers_generate(model):
    hf, params, config = model
    gen = decode.Generator(config, max_new_tokens=32, eos_id=EOS, bucket=16)
    for seed, n in ((1, 9), (2, 14)):
        ids = _prompt(seed, n)[None]
        with torch.no_grad():
            ref = hf.generate(torch.tensor(ids), max_new_tokens=32, do_sample=False,
                              eos_token_id=EOS, pad_token_id=0).numpy()[0, n:]
        out = gen(params, ids)
        got = out["tokens"][0, :out["lengths"][0]]
        print(f"prompt {n}: {len(ref)} tokens from transformers, {len(got)} ours")
        np.testing.assert_array_equal(got, ref)
    assert gen.traces == 1  # both prompts fall in the 16-token bucket


def test_no_retrace_within_a_bucket(model):
    _, params, config = model
    gen = decode.Generator(config, max_new_tokens=8, eos_id=EOS, bucket=16)
    # two traces allowed: greedy and sampled are different programs; lengths 3…16 and new
    # temperature/top-p values must reuse them
    gen._fn = jax.jit(chex.assert_max_traces(gen._generate, n=2), static_argnames=("greedy",))
    for n in (3, 9, 16):
        gen(params, _prompt(n, n)[None])
    gen(params, _prompt(4, 5)[None], temperature=0.7, top_p=0.9)  # sampled: its own trace
    gen(params, _prompt(5, 7)[None], temperature=1.3, top_p=0.5)  # new values, same trace
    assert gen.traces == 2
    chex.clear_trace_counter()


def test_padded_batch_decodes_like_single_rows(model):
    _, params, config = model
    gen = decode.Generator(config, max_new_tokens=12, eos_id=EOS, bucket=16, return_hidden=True)
    a, b = _prompt(6, 11), _prompt(7, 4)
    ids = np.zeros((3, 11), np.int32)
    mask = np.zeros((3, 11), bool)
    ids[0], mask[0] = a, True
    ids[1, 7:], mask[1, 7:] = b, True  # left padded
    ids[2, :4], mask[2, :4] = b, True  # right padded
    batch = gen(params, ids, mask)
    alone_a, alone_b = gen(params, a[None]), gen(params, b[None])
    np.testing.assert_array_equal(batch["tokens"][0], alone_a["tokens"][0])
    np.testing.assert_array_equal(batch["tokens"][1], alone_b["tokens"][0])
    np.testing.assert_array_equal(batch["tokens"][2], alone_b["tokens"][0])
    assert np.abs(batch["hidden"][2] - alone_b["hidden"][0]).max() <= 1e-5


def test_hidden_is_the_state_that_produced_each_token(model):
    """hidden[i] = final-norm state at the position whose logits chose token i (the [SEG]
    embedding rule), checked against one uncached forward over prompt + generation."""
    _, params, config = model
    gen = decode.Generator(config, max_new_tokens=10, eos_id=None, bucket=16, return_hidden=True)
    ids = _prompt(8, 6)[None]
    out = gen(params, ids)
    seq = np.concatenate([ids, out["tokens"]], axis=1)
    full = llama.LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(seq))
    states = np.asarray(full["last_hidden_state"])[0, 5:5 + 10]  # positions 5 … 14
    assert np.abs(out["hidden"][0] - states).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(full["logits"])[0, 5:15].argmax(-1),
                                  out["tokens"][0])


def test_embeddings_prompt_equals_ids_prompt(model):
    _, params, config = model
    gen = decode.Generator(config, max_new_tokens=8, eos_id=EOS, bucket=16)
    ids = _prompt(9, 10)[None]
    embeds = jnp.asarray(params["embed_tokens"]["embedding"])[ids]  # [1, 10, d]
    np.testing.assert_array_equal(gen(params, inputs_embeds=embeds)["tokens"],
                                  gen(params, ids)["tokens"])


def test_eos_stops_each_row_and_pads_after(model):
    _, params, config = model
    ids = _prompt(10, 8)[None]
    first = decode.Generator(config, max_new_tokens=6, eos_id=None, bucket=16)(params, ids)
    stop = int(first["tokens"][0, 2])  # pretend the third greedy token is eos
    out = decode.Generator(config, max_new_tokens=6, eos_id=stop, pad_id=0, bucket=16)(
        params, ids)
    k = int(np.argmax(first["tokens"][0] == stop))
    assert out["lengths"][0] == k + 1
    np.testing.assert_array_equal(out["tokens"][0, :k + 1], first["tokens"][0, :k + 1])
    assert (out["tokens"][0, k + 1:] == 0).all()


def test_sampling_top_p(model):
    _, params, config = model
    gen = decode.Generator(config, max_new_tokens=8, eos_id=None, bucket=16)
    ids = _prompt(11, 7)[None]
    greedy = gen(params, ids)["tokens"]
    tiny_p = gen(params, ids, temperature=1.0, top_p=1e-6, rng=jax.random.key(1))["tokens"]
    np.testing.assert_array_equal(tiny_p, greedy)  # top-p that keeps one token is greedy
    s1 = gen(params, ids, temperature=1.5, rng=jax.random.key(2))["tokens"]
    s2 = gen(params, ids, temperature=1.5, rng=jax.random.key(3))["tokens"]
    assert not np.array_equal(s1, s2)  # a near-uniform tiny model: different draws differ
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(decode._top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])

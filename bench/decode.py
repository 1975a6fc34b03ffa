"""Greedy decoding speed, JAX (jitted while_loop, static KV cache) vs transformers (PyTorch),
same random weights, same machine, one process.

    python -m bench.decode [--hidden 512] [--layers 8] [--new 64] [--prompt 32] [--repeats 3]
    python -m bench.decode --quantize int8,int4 [--repeats 5]

For each batch size (``--batches``, default 1 and 4): tokens/s (generated tokens × batch / wall
time, prefill included) of both, median [min–max] of ``--repeats`` runs alternating between
the two after a warm-up each (JAX: the compile), the speed ratio and whether the greedy tokens
agree. With ``--quantize``, the same JAX decoder also runs with its weights quantized
(m2sa_jax.quantization: LLM linear layers and lm_head, weight-only) as further sides of the
same rounds: their tokens/s, the ratio to float32 and the share of tokens equal to float32's.
``--prefill`` adds, for both frameworks, a side that generates one token only (the prefill),
which splits the time into prefill and per-token work. The environment is printed first.
"""

from __future__ import annotations

import argparse

from bench import common


def build(args):
    """(transformers model, JAX params, LlamaConfig) with the same random weights."""
    import jax
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from m2sa_jax.checkpoints import llava as convert_llava
    from m2sa_jax.checkpoints.table import convert
    from m2sa_jax.models import llama

    torch.manual_seed(0)
    hf_config = HFLlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                              intermediate_size=int(args.hidden * 8 / 3 / 64 + 1) * 64,
                              num_hidden_layers=args.layers, num_attention_heads=args.heads,
                              max_position_embeddings=4096, eos_token_id=None)
    hf = HFLlama(hf_config).eval()
    config = llama.LlamaConfig.from_hf(hf_config.to_dict())
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = convert(state.items(), convert_llava.llama_rules("model.", False)
                     + convert_llava.lm_head_rules("lm_head.weight", False),
                     llama.param_shapes(config), name="random LLaMA")
    return hf, jax.device_put(params), config



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--quantize", default="", help="comma-separated schemes, e.g. int8,int4")
    ap.add_argument("--prefill", action="store_true",
                    help="also time JAX generating one token (prefill + one step)")
    common.add_arguments(ap)
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch

    from m2sa_jax import quantization
    from m2sa_jax.inference.decode import Generator

    common.set_torch_threads(args.threads)
    common.print_environment(
        "greedy decoding, JAX Generator vs transformers generate (float32)",
        workload=f"LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
                 f"prompt {args.prompt}, {args.new} new tokens")
    hf, params, config = build(args)
    gen = Generator(config, max_new_tokens=args.new, eos_id=None, bucket=args.prompt)
    variants = {}
    for scheme in (s for s in args.quantize.split(",") if s):
        variants[scheme] = (
            Generator(config, max_new_tokens=args.new, eos_id=None, bucket=args.prompt,
                      quantization=scheme),
            jax.block_until_ready(quantization.quantize_params(params, scheme)))
    one = Generator(config, max_new_tokens=1, eos_id=None, bucket=args.prompt)
    rs = np.random.RandomState(0)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    for b in args.batches:
        ids = rs.randint(3, args.vocab, (b, args.prompt))

        def run_torch():
            with torch.no_grad():
                return hf.generate(torch.tensor(ids), **kw).numpy()[:, args.prompt:]

        sides = {"JAX": lambda: np.asarray(gen(params, ids)["tokens"]), "PyTorch": run_torch}
        for name, (g, p) in variants.items():
            sides[f"JAX {name}"] = lambda g=g, p=p: np.asarray(g(p, ids)["tokens"])
        if args.prefill:
            sides["JAX 1 token"] = lambda: np.asarray(one(params, ids)["tokens"])
            kw1 = dict(kw, max_new_tokens=1, min_new_tokens=1)

            def torch_one():
                with torch.no_grad():
                    return hf.generate(torch.tensor(ids), **kw1).numpy()

            sides["PyTorch 1 token"] = torch_one
        runs = common.alternate(sides, repeats=args.repeats, warmup=args.warmup)
        jx, pt = runs["JAX"], runs["PyTorch"]
        same = np.mean(jx.result == pt.result)
        print(f"batch {b} (median [min–max] of {args.repeats}; tokens equal: {same:.0%}):")
        common.report([jx, pt], units=b * args.new, unit="tok/s", label_width=12)
        common.report_ratio(jx, pt, "speed JAX / PyTorch")
        for name in variants:
            q = runs[f"JAX {name}"]
            common.report([q], units=b * args.new, unit="tok/s", label_width=12)
            common.report_ratio(q, jx, f"speed {name} / float32")
            print(f"  {name} tokens equal to float32's: {np.mean(q.result == jx.result):.0%}")
        if args.prefill:
            for name, full in (("JAX", jx), ("PyTorch", pt)):
                p1 = runs[f"{name} 1 token"]
                per_token = (full.median - p1.median) / max(args.new - 1, 1)
                print(f"  {name}: prefill + first token {p1.median * 1000:.1f} ms, then "
                      f"{per_token * 1000:.2f} ms per token (medians)")


if __name__ == "__main__":
    main()

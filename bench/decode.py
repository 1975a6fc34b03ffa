"""Greedy decoding speed, JAX (jitted while_loop, static KV cache) vs transformers (PyTorch),
same random weights, same machine, one run each after a warm-up.

    python -m bench.decode [--hidden 512] [--layers 8] [--new 64] [--prompt 32]
    python -m bench.decode --quantize int8,int4 [--repeats 5]

Prints tokens/s (generated tokens × batch / wall time, prefill included) for batch 1 and 4
and the JAX / PyTorch ratio. With ``--quantize``, the same JAX decoder also runs with its
weights quantized (m2sa_jax.quantization: LLM linear layers and lm_head, weight-only) in the
same process: median tokens/s over ``--repeats`` timed runs each (min–max in brackets), the
ratio to float32, and the share of tokens equal to float32's greedy tokens.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--quantize", default="", help="comma-separated schemes, e.g. int8,int4")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (--quantize)")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from m2sa_jax import quantization
    from m2sa_jax.checkpoints import llava as convert_llava
    from m2sa_jax.checkpoints.table import convert
    from m2sa_jax.inference.decode import Generator
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
    params = jax.device_put(params)
    gen = Generator(config, max_new_tokens=args.new, eos_id=None, bucket=args.prompt)
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; prompt "
          f"{args.prompt}, {args.new} new tokens; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    rs = np.random.RandomState(0)
    for b in args.batches:
        ids = rs.randint(3, args.vocab, (b, args.prompt))
        gen(params, ids)  # compile
        t0 = time.perf_counter()
        out = gen(params, ids)
        jax_s = time.perf_counter() - t0
        with torch.no_grad():
            kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                      pad_token_id=0)
            hf.generate(torch.tensor(ids[:, :8]), **dict(kw, max_new_tokens=4, min_new_tokens=4))
            t0 = time.perf_counter()
            ref = hf.generate(torch.tensor(ids), **kw).numpy()[:, args.prompt:]
            torch_s = time.perf_counter() - t0
        same = np.mean(out["tokens"] == ref)
        jax_tps, torch_tps = b * args.new / jax_s, b * args.new / torch_s
        print(f"batch {b}: JAX {jax_tps:8.1f} tok/s   PyTorch {torch_tps:8.1f} tok/s   "
              f"JAX/PyTorch {jax_tps / torch_tps:5.2f}x   (tokens equal: {same:.0%})")
    if args.quantize:
        schemes = [s for s in args.quantize.split(",") if s]
        variants = {"float32": (gen, params)}
        for scheme in schemes:
            variants[scheme] = (
                Generator(config, max_new_tokens=args.new, eos_id=None, bucket=args.prompt,
                          quantization=scheme),
                jax.block_until_ready(quantization.quantize_params(params, scheme)))
        print(f"weight-only quantization, {args.repeats} timed runs each (median [min–max]):")
        for b in args.batches:
            ids = rs.randint(3, args.vocab, (b, args.prompt))
            rates, tokens = {}, {}
            for name, (g, p) in variants.items():
                tokens[name] = g(p, ids)["tokens"]  # compile
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    g(p, ids)
                    times.append(time.perf_counter() - t0)
                rates[name] = b * args.new / np.array(times)
            base = np.median(rates["float32"])
            for name, r in rates.items():
                same = np.mean(tokens[name] == tokens["float32"])
                print(f"batch {b}: {name:7s} {np.median(r):8.1f} tok/s [{r.min():.1f}–{r.max():.1f}]"
                      f"   vs float32 {np.median(r) / base:5.2f}x   (tokens equal: {same:.0%})")


if __name__ == "__main__":
    main()

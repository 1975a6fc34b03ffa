"""LLaMA-7B-shaped greedy decoding on one H100/H200: JAX vs transformers (PyTorch CUDA), bf16.

    python -m bench.gpu_decode [--prompt 128] [--new 256] [--batches 1 8]

Random weights are created directly on the device (no conversion, no host copy). Each
framework runs in its own subprocess, one after the other, so only one 7B copy (13.5 GB) is on
the GPU at a time. Reported per batch size: tokens/s (prefill included) and the fraction of the
HBM-bandwidth roofline, i.e. (bytes of weights + KV cache read per step) / step time divided by
the peak bandwidth (3.35 TB/s H100 SXM, 4.8 TB/s H200; detected from the device name).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # children: -m bench.gpu_decode

SEVEN_B = dict(vocab_size=32003, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6,
               max_position_embeddings=4096)
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}


def peak_bandwidth(name: str) -> float:
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name.upper():
            return bw
    return float("nan")


def bytes_per_step(batch: int, context: float) -> float:
    """Weights read once per step (embedding rows are gathered, not streamed) + KV read."""
    c = SEVEN_B
    d, f, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    layer = d * (d + 2 * kv + d) + 3 * d * f + 2 * d
    weights = n * layer + d + d * c["vocab_size"]
    kv_bytes = 2 * n * batch * context * kv
    return 2 * (weights + kv_bytes)  # bfloat16


def run_jax(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2sa_jax.evaluation.decode import Generator
    from m2sa_jax.models import llama

    config = llama.LlamaConfig(**SEVEN_B, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                               scan_layers=args.scan)
    model = llama.LlamaForCausalLM(config)
    t0 = time.perf_counter()
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32))["params"])(
        jax.random.key(0))
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    gen = Generator(config, max_new_tokens=args.new, eos_id=None, bucket=args.prompt)
    rows = []
    for b in args.batches:
        ids = np.random.RandomState(b).randint(3, 32000, (b, args.prompt))
        t0 = time.perf_counter()
        gen(params, ids)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen(params, ids)
        rows.append(dict(framework="jax", batch=b, seconds=time.perf_counter() - t0,
                         compile_s=compile_s, init_s=init_s,
                         device=jax.devices()[0].device_kind,
                         peak_mem_gb=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
                         / 1e9))
    return rows


def run_torch(args) -> list[dict]:
    import numpy as np
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.backends.cuda.matmul.allow_tf32 = True
    config = HFLlamaConfig(**SEVEN_B, eos_token_id=None)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = HFLlama(config).eval()
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    rows = []
    for b in args.batches:
        ids = torch.tensor(np.random.RandomState(b).randint(3, 32000, (b, args.prompt)),
                           device="cuda")
        kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=args.new,
                  min_new_tokens=args.new)
        with torch.no_grad():
            model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
        rows.append(dict(framework="torch", batch=b, seconds=time.perf_counter() - t0,
                         init_s=init_s, device=torch.cuda.get_device_name(),
                         peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--scan", action="store_true", help="scanned layers in the JAX model")
    ap.add_argument("--part", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--frameworks", nargs="+", default=["jax", "torch"])
    args = ap.parse_args()
    if args.part:
        rows = run_jax(args) if args.part == "jax" else run_torch(args)
        print("RESULT " + json.dumps(rows))
        return

    results = []
    for part in args.frameworks:
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.8")
        cmd = [sys.executable, "-m", "bench.gpu_decode", "--part", part, "--prompt",
               str(args.prompt), "--new", str(args.new), "--batches",
               *map(str, args.batches)] + (["--scan"] if args.scan else [])
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{part} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        results += json.loads(lines[-1][len("RESULT "):])

    print(f"LLaMA-7B shape, bf16, greedy, prompt {args.prompt}, {args.new} new tokens")
    by = {(r["framework"], r["batch"]): r for r in results}
    for r in results:
        b = r["batch"]
        step = r["seconds"] / args.new
        context = args.prompt + args.new / 2  # average tokens in the cache per step
        bw = bytes_per_step(b, context) / step
        frac = bw / peak_bandwidth(r["device"])
        extra = f", compile {r['compile_s']:.0f}s" if "compile_s" in r else ""
        print(f"{r['framework']:5s} batch {b}: {b * args.new / r['seconds']:8.1f} tok/s  "
              f"{step * 1e3:6.2f} ms/step  {bw / 1e12:5.2f} TB/s = {frac:5.1%} of roofline "
              f"({r['device']}; peak mem {r['peak_mem_gb']:.1f} GB{extra})")
    for b in args.batches:
        if ("jax", b) in by and ("torch", b) in by:
            print(f"batch {b}: JAX/PyTorch speed ratio "
                  f"{by[('torch', b)]['seconds'] / by[('jax', b)]['seconds']:.2f}x")


if __name__ == "__main__":
    main()

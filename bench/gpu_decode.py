"""LLaMA-7B-shaped greedy decoding on one H100/H200: JAX vs transformers (PyTorch CUDA), bf16.

    python -m bench.gpu_decode [--prompt 128] [--new 256] [--batches 1 8]
    python -m bench.gpu_decode --quantize int8,int4 --frameworks jax   # bf16 vs weight-only int
    python -m bench.gpu_decode --tiny --quantize int8,int4 --frameworks jax   # CPU check

Random weights are created directly on the device (no conversion, no host copy); quantized
variants (``--quantize``, m2sa_jax.quantization: the decoder's linear layers and lm_head) get
random integer values and scales of the quantized layout directly, so no float copy of those
weights is ever allocated and the peak memory is the quantized model's own. Each framework and
scheme runs in its own subprocess, one after the other, so only one 7B copy is on the GPU at a
time. Reported per batch size: tokens/s (prefill included), the ratio to JAX bf16, the peak
device memory, and the fraction of the HBM-bandwidth roofline, i.e. (bytes of weights + KV cache
read per step) / step time divided by the peak bandwidth (3.35 TB/s H100 SXM, 4.8 TB/s H200;
detected from the device name). ``--tiny`` runs a 2-layer, width-256 model of the same code
path (for checking the script on a CPU; its timings mean nothing).
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
TINY = dict(SEVEN_B, vocab_size=1027, hidden_size=256, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}


def peak_bandwidth(name: str) -> float:
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name.upper():
            return bw
    return float("nan")


def bytes_per_step(batch: int, context: float, weight_bytes: float | None = None,
                   shape: dict = SEVEN_B) -> float:
    """Weights read once per step (embedding rows are gathered, not streamed) + KV read
    (bfloat16). ``weight_bytes``: the streamed weights' bytes when not all bfloat16."""
    c = shape
    d, f, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    layer = d * (d + 2 * kv + d) + 3 * d * f + 2 * d
    weights = 2 * (n * layer + d + d * c["vocab_size"])
    kv_bytes = 2 * 2 * n * batch * context * kv
    return (weights if weight_bytes is None else weight_bytes) + kv_bytes


def random_quantized(abstract, key):
    """Random integer values and scales in the layout of a quantized tree (float leaves random
    normal), made on the device leaf by leaf: no float copy of the quantized weights."""
    import jax
    import jax.numpy as jnp

    from m2sa_jax import quantization

    leaves, treedef = jax.tree.flatten(abstract, is_leaf=quantization.is_quantized_leaf)
    out = []
    for i, leaf in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if quantization.is_quantized_leaf(leaf):
            q, s = leaf.array.qvalue, leaf.array.scale
            bound = 7 if q.dtype == jnp.int4 else 127
            qvalue = jax.jit(lambda k: jax.random.randint(k, q.shape, -bound, bound + 1)
                             .astype(q.dtype))(k)
            scale = jnp.full(s.shape, 0.02 * 3 / bound, s.dtype)
            out.append(leaf.replace(array=leaf.array.replace(qvalue=qvalue, scale=scale)))
        else:
            out.append(jax.jit(lambda k: 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype))(k))
    return jax.tree.unflatten(treedef, out)


def run_jax(args, scheme: str = "bf16") -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2sa_jax import quantization
    from m2sa_jax.inference.decode import Generator
    from m2sa_jax.models import llama

    shape = TINY if args.tiny else SEVEN_B
    config = llama.LlamaConfig(**shape, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                               scan_layers=args.scan)
    model = llama.LlamaForCausalLM(config)
    spec = None if scheme == "bf16" else quantization.as_spec(scheme)
    t0 = time.perf_counter()
    if spec is None:
        params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32))["params"])(
            jax.random.key(0))
    else:
        params = random_quantized(quantization.abstract_quantized(llama.param_shapes(config),
                                                                  spec), jax.random.key(0))
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    nbytes = quantization.weight_bytes(params)
    streamed = nbytes["total"] - 2 * shape["vocab_size"] * shape["hidden_size"]  # minus embed
    gen = Generator(config, max_new_tokens=args.new, eos_id=None, bucket=args.prompt,
                    quantization=spec)
    rows = []
    for b in args.batches:
        ids = np.random.RandomState(b).randint(3, 32000, (b, args.prompt))
        t0 = time.perf_counter()
        gen(params, ids)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen(params, ids)
        rows.append(dict(framework="jax", scheme=scheme, batch=b,
                         seconds=time.perf_counter() - t0, weight_bytes=streamed,
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
        rows.append(dict(framework="torch", scheme="bf16", batch=b,
                         seconds=time.perf_counter() - t0,
                         init_s=init_s, device=torch.cuda.get_device_name(),
                         peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--scan", action="store_true", help="scanned layers in the JAX model")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--frameworks", nargs="+", default=["jax", "torch"])
    ap.add_argument("--quantize", default="", help="also JAX with these weight-only schemes "
                                                   "(comma-separated: int8,int4)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer width-256 model (CPU check)")
    args = ap.parse_args()
    if args.part:
        framework, _, scheme = args.part.partition(":")
        rows = run_jax(args, scheme or "bf16") if framework == "jax" else run_torch(args)
        print("RESULT " + json.dumps(rows))
        return

    parts = list(args.frameworks)
    if "jax" in parts:
        parts[parts.index("jax") + 1:parts.index("jax") + 1] = [
            f"jax:{s}" for s in args.quantize.split(",") if s]
    shape = TINY if args.tiny else SEVEN_B
    results = []
    for part in parts:
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.8")
        cmd = [sys.executable, "-m", "bench.gpu_decode", "--part", part, "--prompt",
               str(args.prompt), "--new", str(args.new), "--batches",
               *map(str, args.batches)] + (["--scan"] if args.scan else []) \
            + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{part} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        results += json.loads(lines[-1][len("RESULT "):])

    print(f"LLaMA-{'tiny' if args.tiny else '7B'} shape, bf16 compute, greedy, prompt "
          f"{args.prompt}, {args.new} new tokens")
    by = {(r["framework"], r["scheme"], r["batch"]): r for r in results}
    for r in results:
        b = r["batch"]
        step = r["seconds"] / args.new
        context = args.prompt + args.new / 2  # average tokens in the cache per step
        bw = bytes_per_step(b, context, r.get("weight_bytes"), shape) / step
        frac = bw / peak_bandwidth(r["device"])
        extra = f", compile {r['compile_s']:.0f}s" if "compile_s" in r else ""
        base = by.get(("jax", "bf16", b))
        ratio = f"  {base['seconds'] / r['seconds']:5.2f}x JAX bf16" if base else ""
        print(f"{r['framework']:5s} {r['scheme']:4s} batch {b}: "
              f"{b * args.new / r['seconds']:8.1f} tok/s{ratio}  {step * 1e3:6.2f} ms/step  "
              f"{bw / 1e12:5.2f} TB/s = {frac:5.1%} of roofline "
              f"({r['device']}; peak mem {r['peak_mem_gb']:.1f} GB{extra})")
    for b in args.batches:
        if ("jax", "bf16", b) in by and ("torch", "bf16", b) in by:
            print(f"batch {b}: JAX/PyTorch speed ratio "
                  f"{by[('torch', 'bf16', b)]['seconds'] / by[('jax', 'bf16', b)]['seconds']:.2f}x")


if __name__ == "__main__":
    main()

"""SAM ViT-H image encoder on one GPU: JAX vs PyTorch, float32 and bfloat16, same weights.

    python -m bench.gpu_sam [--iters 10] [--budget-s 170]

Runs PyTorch float32 (TF32 off), PyTorch bfloat16, JAX float32 (highest matmul precision)
and JAX bfloat16 compute on one random 1024×1024 image with identical random weights,
prints ms/image after a warm-up run (and JAX compile time), and the float32 parity (max abs
difference of the image embeddings). Each run is independent: a failure is reported and
the others go on; runs that would start after ``--budget-s`` are skipped.
"""

from __future__ import annotations

import os

# JAX must not grab most of the GPU before PyTorch has run.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="vit_h", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=170.0)
    args = ap.parse_args(argv)
    start = time.perf_counter()

    import jax
    import torch

    from bench.sam_encoder import jax_params_from, jax_side, torch_side, torch_reference

    def time_torch(sam, x, dtype, iters, device):
        run, to_np = torch_side(sam, x, dtype, device)
        run()                                                      # warm-up
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()
        return (time.perf_counter() - t0) * 1000 / iters, to_np(out)

    def time_jax(params, cfg, x, dtype, iters, device):
        run, to_np = jax_side(params, cfg, x, dtype, device)
        t0 = time.perf_counter()
        run()                                                      # compile
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()
        return (time.perf_counter() - t0) * 1000 / iters, to_np(out), compile_s

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if not torch.cuda.is_available():
        print("no CUDA device visible to PyTorch")
        return 1
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; jax {jax.__version__} "
          f"{jax.devices()[0]}; SAM {args.model_type} encoder, 1×1024×1024, {args.iters} runs")

    sam = torch_reference(args.model_type, "cuda")
    params, cfg = jax_params_from(sam, args.model_type)
    x = np.random.default_rng(0).standard_normal((1, 1024, 1024, 3)).astype(np.float32)
    print(f"weights ready in {time.perf_counter() - start:.1f} s")

    results, outputs = {}, {}

    def run(name, fn):
        if time.perf_counter() - start > args.budget_s:
            results[name] = "skipped (time budget)"
            return
        try:
            out = fn()
            results[name] = out[0]
            outputs[name] = out[1]
            extra = f" (compile {out[2]:.1f} s)" if len(out) > 2 else ""
            print(f"  {name:14s} {out[0]:8.1f} ms/image{extra}", flush=True)
        except Exception as e:  # report and go on with the other runs
            results[name] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()

    run("torch float32", lambda: time_torch(sam, x, "float32", args.iters, "cuda"))
    run("torch bfloat16", lambda: time_torch(sam, x, "bfloat16", args.iters, "cuda"))
    del sam
    torch.cuda.empty_cache()

    def jax_f32():
        with jax.default_matmul_precision("highest"):
            return time_jax(params, cfg, x, "float32", args.iters, "gpu")

    run("jax float32", jax_f32)
    run("jax bfloat16", lambda: time_jax(params, cfg, x, "bfloat16", args.iters, "gpu"))

    print("\nsummary (ms/image, after warm-up):")
    for name, v in results.items():
        print(f"  {name:14s} {v:8.1f}" if isinstance(v, float) else f"  {name:14s} {v}")
    for dt in ("float32", "bfloat16"):
        a, b = results.get(f"jax {dt}"), results.get(f"torch {dt}")
        if isinstance(a, float) and isinstance(b, float):
            print(f"  ratio jax/torch {dt}: {a / b:.2f}")
    if "jax float32" in outputs and "torch float32" in outputs:
        err = np.max(np.abs(outputs["jax float32"] - outputs["torch float32"]))
        print(f"  float32 parity, embedding max abs diff: {err:.2e}")
    if "jax bfloat16" in outputs and "torch float32" in outputs:
        err = np.max(np.abs(outputs["jax bfloat16"] - outputs["torch float32"]))
        print(f"  jax bfloat16 vs torch float32 max abs diff: {err:.2e}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

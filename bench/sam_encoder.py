"""SAM image encoder speed: the same random weights in JAX and PyTorch (segment_anything).

    python -m bench.sam_encoder [--model-type vit_b] [--dtype float32] [--repeats 3] [--device cpu]

One 1024×1024 image (batch 1). Prints the environment, then images/s of both (median [min–max]
of ``--repeats`` runs alternating between the two, after a warm-up run each that includes JAX's
compile), their speed ratio and the max abs difference of the image embeddings (a float32
sanity check of the shared weights).
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np

from bench import common


def torch_reference(model_type: str, device: str, seed: int = 0):
    """segment_anything's encoder with every weight random (built on the meta device, then
    filled where it runs, so even ViT-H starts in seconds)."""
    import torch
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        sam = sam_model_registry[model_type]()
    sam = sam.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            p.normal_(0.0, 0.02, generator=g)
            if p.ndim == 1 and name.endswith("weight") and ("norm" in name or "neck" in name
                                                           or "upscaling" in name
                                                           or "downscaling" in name):
                p.add_(1.0)
        sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.normal_(generator=g)
    return sam.eval()


def jax_params_from(sam, model_type: str):
    from m2sa_jax.checkpoints.torch_io import to_numpy
    from m2sa_jax.checkpoints.sam import convert_sam
    from m2sa_jax.models.sam import sam_config

    cfg = sam_config(model_type)
    items = ((k, to_numpy(v)) for k, v in sam.state_dict().items())
    return convert_sam(items, cfg), cfg


def torch_side(sam, x, dtype: str, device: str):
    """A call that encodes ``x`` once (synchronised) and returns the embedding (NHWC)."""
    import torch

    enc = sam.image_encoder
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    if dtype == "bfloat16":  # a bf16 copy; the float32 weights stay intact for other runs
        enc = copy.deepcopy(enc).to(torch.bfloat16)
        xt = xt.to(torch.bfloat16)

    def run():
        with torch.no_grad():
            out = enc(xt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return run, lambda out: out.float().permute(0, 2, 3, 1).cpu().numpy()


def jax_side(params, cfg, x, dtype: str, device: str | None = None):
    import jax
    import jax.numpy as jnp

    from m2sa_jax.dtypes import compute_dtype
    from m2sa_jax.models.sam import Sam

    model = Sam(cfg, compute_dtype(dtype))
    dev = jax.devices(device)[0] if device else jax.devices()[0]
    params = jax.device_put(params, dev)
    xj = jax.device_put(jnp.asarray(x), dev)
    fn = jax.jit(lambda p, im: model.apply({"params": p}, im,
                                           method=Sam.encode_image)["image_embeddings"])
    run = lambda: fn(params, xj).block_until_ready()                     # noqa: E731
    run.flops = lambda: flops_of(fn, params, xj)
    return run, lambda out: np.asarray(out, np.float32)


def flops_of(fn, *args) -> float | None:
    """XLA's count of the floating-point operations of one call of jitted ``fn``."""
    try:
        cost = fn.lower(*args).compile().cost_analysis()
    except Exception:                                  # noqa: BLE001 - a count is optional
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (JAX uses the matching platform)")
    common.add_arguments(ap)
    args = ap.parse_args(argv)

    import jax
    import torch

    if args.dtype == "float32":  # compare exact float32 on both sides (no TF32 / bf16 passes)
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    common.set_torch_threads(args.threads)
    jax_platform = "gpu" if args.device.startswith("cuda") else "cpu"
    common.print_environment(
        f"SAM {args.model_type} image encoder, JAX vs PyTorch (segment_anything), {args.dtype}",
        workload=f"1×1024×1024 image; torch on {args.device}, jax on "
                 f"{jax.devices(jax_platform)[0]}")
    sam = torch_reference(args.model_type, args.device)
    params, cfg = jax_params_from(sam, args.model_type)
    x = np.random.default_rng(0).standard_normal((1, 1024, 1024, 3)).astype(np.float32)
    t_run, t_np = torch_side(sam, x, args.dtype, args.device)
    j_run, j_np = jax_side(params, cfg, x, args.dtype, jax_platform)
    runs = common.alternate({"JAX": j_run, "PyTorch": t_run}, repeats=args.repeats,
                            warmup=args.warmup)
    jx, pt = runs["JAX"], runs["PyTorch"]
    print(f"results (median [min–max] of {args.repeats}):")
    common.report([jx, pt], units=1, unit="images/s", label_width=8)
    common.report_ratio(jx, pt, "speed JAX / PyTorch")
    print(f"  embedding max abs diff: {np.max(np.abs(j_np(jx.result) - t_np(pt.result))):.2e}")
    flops = j_run.flops()
    if flops:
        print(f"  work: {flops / 1e9:.0f} GFLOP per image (XLA's count); achieved "
              f"{flops / jx.median / 1e9:.1f} GFLOP/s JAX, {flops / pt.median / 1e9:.1f} GFLOP/s "
              f"PyTorch (the same arithmetic) on {common.environment()['cpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

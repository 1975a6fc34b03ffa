"""How fast SAM's image encoder could be on this machine: its matrix products alone, JAX vs
PyTorch, and the encoder itself in the same run.

    python -m bench.gemm_bound [--model-type vit_b] [--repeats 5] [--encoder-repeats 3]

The encoder's arithmetic is almost all matrix products: every block's qkv / proj / MLP linears,
the attention products (global blocks over all 4,096 tokens, windowed blocks over 14×14
windows of the padded grid), the patch embedding and the neck. Each distinct product is timed
alone on both sides (random float32 operands of the encoder's shapes, one call per round,
rounds alternating between the sides), and its median time multiplied by the number of times
one 1024² image needs it gives **the encoder at pure GEMM speed**: a lower bound on any
implementation that does the same arithmetic with that library's products (everything else
— LayerNorm, GELU, softmax, the relative-position terms, reshapes — comes on top).

Then the two encoders themselves (as in ``bench.sam_encoder``) are timed in the same process.
The line that matters: PyTorch's encoder time divided by JAX's GEMM-only time is the largest
speed ratio a JAX encoder doing this arithmetic can reach on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import numpy as np

from bench import common


@dataclasses.dataclass(frozen=True)
class Product:
    """``batch`` independent [m, k] × [k, n] products, needed ``count`` times per image."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    count: int
    linear: bool = False        # a Linear layer: torch F.linear (x @ Wᵀ), JAX x @ kernel

    @property
    def gflop(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n / 1e9


def encoder_products(cfg) -> list[Product]:
    """The matrix products of one image through SAM's encoder ``cfg`` (segment_anything's
    arithmetic: windows on the grid padded to a multiple of the window size)."""
    g = cfg.img_size // cfg.patch_size                     # 64
    d, heads = cfg.encoder_embed_dim, cfg.encoder_num_heads
    hd, hidden = d // heads, int(d * cfg.mlp_ratio)
    n_global = len(cfg.global_attn_indexes)
    n_window = cfg.encoder_depth - n_global
    ws = cfg.window_size
    gp = math.ceil(g / ws) * ws                            # 70 for a 64 grid and 14 windows
    nwin, wt = (gp // ws) ** 2, ws * ws
    tokens = g * g
    out = [
        Product("patch embed (16×16×3 → D)", 1, tokens, 3 * cfg.patch_size ** 2, d, 1, True),
        Product("qkv, global blocks", 1, tokens, d, 3 * d, n_global, True),
        Product("proj, global blocks", 1, tokens, d, d, n_global, True),
        Product("qkv, windowed blocks (padded grid)", 1, nwin * wt, d, 3 * d, n_window, True),
        Product("proj, windowed blocks", 1, nwin * wt, d, d, n_window, True),
        Product("MLP up", 1, tokens, d, hidden, cfg.encoder_depth, True),
        Product("MLP down", 1, tokens, hidden, d, cfg.encoder_depth, True),
        Product("attention q·kᵀ, global", heads, tokens, hd, tokens, n_global),
        Product("attention p·v, global", heads, tokens, tokens, hd, n_global),
        Product("attention q·kᵀ, windows", nwin * heads, wt, hd, wt, n_window),
        Product("attention p·v, windows", nwin * heads, wt, wt, hd, n_window),
        Product("neck 1×1 conv", 1, tokens, d, cfg.prompt_embed_dim, 1, True),
        Product("neck 3×3 conv (as GEMM)", 1, tokens, 9 * cfg.prompt_embed_dim,
                cfg.prompt_embed_dim, 1, True),
    ]
    return out


def jax_product(p: Product, rng: np.random.Generator):
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(rng.standard_normal((p.batch, p.m, p.k), np.float32))
    b = jnp.asarray(rng.standard_normal((p.batch, p.k, p.n), np.float32))
    if p.batch == 1:
        a, b = a[0], b[0]
    fn = jax.jit(jnp.matmul)
    return lambda: fn(a, b).block_until_ready()


def torch_product(p: Product, rng: np.random.Generator):
    import torch
    import torch.nn.functional as F

    a = torch.from_numpy(rng.standard_normal((p.batch, p.m, p.k), np.float32))
    if p.linear:                                  # nn.Linear keeps its weight as [out, in]
        a = a[0]
        w = torch.from_numpy(rng.standard_normal((p.n, p.k), np.float32))

        def run():
            with torch.no_grad():
                return F.linear(a, w)
        return run
    b = torch.from_numpy(rng.standard_normal((p.batch, p.k, p.n), np.float32))

    def run():
        with torch.no_grad():
            return torch.matmul(a, b)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--encoder-repeats", type=int, default=3,
                    help="timed runs of each whole encoder (0: products only)")
    common.add_arguments(ap, repeats=5)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    common.set_torch_threads(args.threads)
    from m2sa_jax.models.sam import sam_config

    cfg = sam_config(args.model_type)
    prods = encoder_products(cfg)
    common.print_environment(
        f"SAM {args.model_type} encoder: its matrix products alone vs the whole encoder, "
        f"JAX vs PyTorch, float32",
        workload=f"{len(prods)} distinct products, "
                 f"{sum(p.gflop * p.count for p in prods):.0f} GFLOP per 1024² image")
    rng = np.random.default_rng(0)
    rows = []
    for p in prods:
        print(f"  {p.name}: {p.batch}×[{p.m}×{p.k}]·[{p.k}×{p.n}] ×{p.count}", file=sys.stderr,
              flush=True)
        runs = common.alternate({"JAX": jax_product(p, rng), "PyTorch": torch_product(p, rng)},
                                repeats=args.repeats, warmup=args.warmup, progress=False)
        rows.append((p, runs["JAX"], runs["PyTorch"]))

    print(f"\nper product (median of {args.repeats}; GFLOP/s [min–max]):")
    print(f"  {'product':<36s} {'count':>5s} {'GFLOP':>7s}   {'JAX GFLOP/s':<22s} "
          f"{'PyTorch GFLOP/s':<22s}")
    t_jax = t_torch = total = 0.0
    for p, j, t in rows:
        jr, tr = common.fmt_range(*j.rate(p.gflop)), common.fmt_range(*t.rate(p.gflop))
        print(f"  {p.name:<36s} {p.count:>5d} {p.gflop:>7.2f}   {jr:<22s} {tr:<22s}")
        t_jax += p.count * j.median
        t_torch += p.count * t.median
        total += p.count * p.gflop
    print(f"\nthe encoder's products at each library's GEMM speed ({total:.0f} GFLOP):")
    print(f"  JAX     {t_jax:.2f} s per image ({total / t_jax:.1f} GFLOP/s)")
    print(f"  PyTorch {t_torch:.2f} s per image ({total / t_torch:.1f} GFLOP/s)")
    if args.encoder_repeats <= 0:
        return 0

    from bench import sam_encoder

    sam = sam_encoder.torch_reference(args.model_type, "cpu")
    params, cfg = sam_encoder.jax_params_from(sam, args.model_type)
    x = rng.standard_normal((1, 1024, 1024, 3)).astype(np.float32)
    t_run, _ = sam_encoder.torch_side(sam, x, "float32", "cpu")
    j_run, _ = sam_encoder.jax_side(params, cfg, x, "float32", "cpu")
    print(f"\nthe whole encoders (median [min–max] of {args.encoder_repeats}):", flush=True)
    enc = common.alternate({"JAX": j_run, "PyTorch": t_run}, repeats=args.encoder_repeats,
                           warmup=args.warmup)
    je, pe = enc["JAX"], enc["PyTorch"]
    for name, s, g in (("JAX", je, t_jax), ("PyTorch", pe, t_torch)):
        spread = common.fmt_range(s.median, min(s.seconds), max(s.seconds))
        print(f"  {name:<8s} {spread} s per image; its products alone {g:.2f} s "
              f"= {g / s.median:.0%} of it")
    common.report([je, pe], units=1, unit="images/s", label_width=8)
    common.report_ratio(je, pe, "speed JAX / PyTorch (whole encoders)")
    print(f"  largest ratio a JAX encoder with this arithmetic can reach here: PyTorch's encoder "
          f"/ JAX's products alone = {pe.median / t_jax:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())

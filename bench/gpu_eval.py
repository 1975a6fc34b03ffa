"""Teacher-forced evaluation throughput of an M²SA-7B-shaped model on one H100/H200, bfloat16:
the JAX evaluation forward vs the PyTorch reference composition
(tests/support/torch_m2sa_reference.py).

    python -m bench.gpu_eval [--images 4] [--questions 2] [--tokens 128] [--iters 5]

LLaMA-7B (vocab 32,003) + CLIP ViT-L/14 @224 + SAM ViT-H @1024 with the compress_vit fusion,
random weights created directly on the device in bfloat16 (no conversion). One batch is
``--images`` COCO-sized images (640×480) with ``--questions`` questions each of ``--tokens``
tokens holding 3 [SEG]s, masks decoded to full size. Each framework runs in its own subprocess,
JAX first, so one model copy (~15 GB) is on the GPU at a time. A sample is one question.
Prints samples/s (after a warm-up/compile call), peak GPU memory and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # children: -m bench.gpu_eval

VOCAB, SEG_ID = 32003, 32002
LLAMA_7B = dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                max_position_embeddings=2048)
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=224, patch_size=14)
H, W = 480, 640


def make_inputs(args):
    """Token rows (one image placeholder, 3 [SEG]s each) and per-image sizes, as numpy."""
    import numpy as np

    rng = np.random.default_rng(0)
    q = args.images * args.questions
    ids = rng.integers(3, 32000, (q, args.tokens)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 20] = -200
    for k in (args.tokens - 12, args.tokens - 8, args.tokens - 4):
        ids[:, k] = SEG_ID
    resized = np.array([[768, 1024]] * args.images, np.int32)
    original = np.array([[H, W]] * args.images, np.int32)
    image_of = np.repeat(np.arange(args.images), args.questions).astype(np.int32)
    return ids, resized, original, image_of


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2sa_jax.evaluation import teacher_forced
    from m2sa_jax.models import clip, llama, llava
    from m2sa_jax.models.m2sa import M2SA, M2SAConfig, abstract_params
    from m2sa_jax.models.sam import sam_config

    bf16 = jnp.bfloat16
    text = llama.LlamaConfig(**LLAMA_7B, dtype=bf16, param_dtype=bf16, scan_layers=True)
    vision = clip.CLIPVisionConfig(**CLIP_L, dtype=bf16, param_dtype=bf16)
    config = M2SAConfig(llava=llava.LlavaConfig(text=text, vision=vision),
                        sam=sam_config("vit_h", use_compress_vit=True), seg_token_id=SEG_ID,
                        variant="m2sa", dtype=bf16)
    leaves, treedef = jax.tree.flatten_with_path(abstract_params(config))
    # One small jitted sampler per distinct shape: a single jit over all ~700 leaves compiles
    # for minutes.
    normal = jax.jit(lambda key, shape: jax.random.normal(key, shape, bf16) * 0.02,
                     static_argnums=1)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    values = []
    for i, (path, s) in enumerate(leaves):
        name = jax.tree_util.keystr(path).lower()
        if "norm" in name and ("scale" in name or "weight" in name):
            values.append(jnp.ones(s.shape, bf16))
        else:
            values.append(normal(jax.random.fold_in(key, i), tuple(s.shape)))
    params = jax.tree.unflatten(treedef, values)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    ids, resized, original, image_of = make_inputs(args)
    q = len(ids)
    rng = np.random.default_rng(1)
    batch = dict(sam_images=rng.standard_normal((args.images, 1024, 1024, 3), np.float32),
                 clip_images=rng.standard_normal((args.images, 224, 224, 3), np.float32),
                 input_ids=ids, attention_mask=np.ones(ids.shape, bool),
                 conv_image_index=image_of, resized_hw=resized, original_hw=original,
                 gt_masks=np.zeros((q, 3, H, W), bool))
    mesh = teacher_forced.data_mesh()
    forward = teacher_forced.make_forward(M2SA(config))
    variables = teacher_forced.replicate({"params": params}, mesh)
    batch = teacher_forced.place_batch(batch, mesh)
    t0 = time.perf_counter()
    out = forward(variables, batch)
    jax.block_until_ready(out["mask_logits"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        out = forward(variables, batch)
        jax.block_until_ready(out["mask_logits"])
    seconds = (time.perf_counter() - t0) / args.iters
    finite = bool(jnp.isfinite(out["mask_logits"].astype(jnp.float32)).all())
    dev = jax.devices()[0]
    return dict(framework="jax", seconds_per_batch=seconds, samples=q, init_s=init_s,
                compile_s=compile_s, params=n_params, device=dev.device_kind,
                finite=finite, masks=list(out["mask_logits"].shape),
                peak_mem_gb=(dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9)


def run_torch(args) -> dict:
    import numpy as np
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    from tests.support.torch_m2sa_reference import TorchM2SA, build_sam

    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        ref = TorchM2SA(LlamaConfig(**LLAMA_7B, attn_implementation="sdpa"),
                        CLIPVisionConfig(**CLIP_L, hidden_act="quick_gelu",
                                         attn_implementation="sdpa"),
                        build_sam(1280, 32, 16, (7, 15, 23, 31), use_compress_vit=True),
                        seg_token_id=SEG_ID, num_image_rows=256).eval()
        # segment_anything builds its positional-encoding grid in float32: keep its random
        # matrix float32 and hand the decoder a bfloat16 encoding (as a bf16 deployment must).
        pe = ref.sam.prompt_encoder
        pe.pe_layer.positional_encoding_gaussian_matrix = (
            pe.pe_layer.positional_encoding_gaussian_matrix.float())
        dense_pe = pe.get_dense_pe
        pe.get_dense_pe = lambda: dense_pe().to(torch.bfloat16)
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in ref.parameters())
    ids, resized, original, image_of = make_inputs(args)
    dev = "cuda"
    sam_in = torch.randn(args.images, 3, 1024, 1024, device=dev, dtype=torch.bfloat16)
    clip_in = torch.randn(args.images, 3, 224, 224, device=dev, dtype=torch.bfloat16)
    ids_t = torch.from_numpy(ids).long().to(dev)
    am = torch.ones_like(ids_t)
    image_of_t = torch.from_numpy(image_of).long().to(dev)
    sizes = ([tuple(r) for r in resized.tolist()], [tuple(o) for o in original.tolist()])

    def step():
        # Under the device context, index tensors the reference makes land on the GPU.
        with torch.no_grad(), torch.device(dev):
            r = ref(sam_in, clip_in, ids_t, am, image_of_t, *sizes)
        torch.cuda.synchronize()
        return r

    t0 = time.perf_counter()
    r = step()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        r = step()
    seconds = (time.perf_counter() - t0) / args.iters
    finite = all(bool(torch.isfinite(m.float()).all()) for m in r["mask_logits"])
    return dict(framework="torch", seconds_per_batch=seconds, samples=len(ids), init_s=init_s,
                compile_s=warm_s, params=n_params, device=torch.cuda.get_device_name(),
                finite=finite, masks=[sum(m.shape[0] for m in r["mask_logits"]), H, W],
                peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--frameworks", nargs="+", default=["jax", "torch"])
    ap.add_argument("--part", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        row = run_jax(args) if args.part == "jax" else run_torch(args)
        print("RESULT " + json.dumps(row))
        return

    rows = {}
    for part in args.frameworks:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        cmd = [sys.executable, "-m", "bench.gpu_eval", "--part", part, "--images",
               str(args.images), "--questions", str(args.questions), "--tokens",
               str(args.tokens), "--iters", str(args.iters)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{part} failed (exit {proc.returncode}) after {time.perf_counter() - t0:.0f}s:\n"
                  f"{proc.stderr[-4000:]}")
            continue
        rows[part] = json.loads(lines[-1][len("RESULT "):])
        rows[part]["wall_s"] = time.perf_counter() - t0

    print(f"M²SA-7B shape (LLaMA-7B + CLIP ViT-L + SAM ViT-H), bf16, teacher-forced; batch "
          f"{args.images} images × {args.questions} questions × {args.tokens} tokens, 3 [SEG] "
          f"each, masks {H}×{W}")
    for r in rows.values():
        print(f"{r['framework']:5s}: {r['samples'] / r['seconds_per_batch']:7.2f} samples/s "
              f"({r['seconds_per_batch'] * 1e3:.1f} ms/batch; {r['params'] / 1e9:.2f} B params; "
              f"init {r['init_s']:.0f}s, first call {r['compile_s']:.0f}s, process "
              f"{r['wall_s']:.0f}s; peak {r['peak_mem_gb']:.1f} GB; finite {r['finite']}; "
              f"{r['device']})")
    if len(rows) == 2:
        ratio = rows["torch"]["seconds_per_batch"] / rows["jax"]["seconds_per_batch"]
        print(f"ratio JAX / PyTorch samples/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()

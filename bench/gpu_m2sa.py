"""M²SA-7B-shaped model on one GPU, random weights in bfloat16: the teacher-forced forward
(one image, three questions, five [SEG]s) and one LoRA train step of the paper's recipe
(batch 2 per device, three questions per image).

    python -m bench.gpu_m2sa [--what forward train] [--iters 10]

Weights are created directly on the device (no conversion, no host copy): LLaMA-7B (vocab
32,003) + CLIP ViT-L/14 + SAM ViT-H with compress_vit. The train step keeps trainable leaves
(LoRA, embeddings, lm_head, mask decoder, text_hidden_fcs) in float32 as master weights and
the frozen ones in bfloat16, computes in bfloat16, and reports step time, XLA-counted FLOPs
and model-FLOPs utilisation against the chip's dense bf16 peak, and peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # children: -m bench.gpu_m2sa

PEAK_BF16 = {"H200": 989e12, "H100": 989e12}
SEVEN_B = dict(vocab_size=32003, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6,
               max_position_embeddings=4096)


TINY = False        # --tiny: the same code at toy sizes, to check the script on a CPU


def build(scan: bool, remat: str):
    import jax.numpy as jnp

    from m2sa_jax.models import clip, llama, llava
    from m2sa_jax.models.m2sa import M2SAConfig
    from m2sa_jax.models.sam import sam_config

    bf = jnp.bfloat16
    sizes = dict(SEVEN_B)
    vision_sizes, sam_sizes = {}, {}
    if TINY:
        sizes.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16)
        vision_sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2)
        sam_sizes = dict(encoder_embed_dim=32, encoder_num_heads=2, encoder_depth=4,
                         global_attn_indexes=(1, 3))
    text = llama.LlamaConfig(**sizes, dtype=bf, param_dtype=bf, scan_layers=scan,
                             remat_policy=remat)
    vision = clip.CLIPVisionConfig(dtype=bf, param_dtype=bf, **vision_sizes)
    return M2SAConfig(llava=llava.LlavaConfig(text=text, vision=vision),
                      sam=sam_config("vit_h", use_compress_vit=True, **sam_sizes),
                      seg_token_id=32000, variant="m2sa", dtype=bf)


def random_params(config, trainable_f32=None):
    """Random leaves of the full tree on the device: bf16, or f32 for trainable paths."""
    import jax
    import jax.numpy as jnp

    from m2sa_jax.tree import flatten, unflatten
    from m2sa_jax.models.m2sa import abstract_params

    flat = flatten(abstract_params(config))
    names = sorted(flat)

    def make(key):
        out = {}
        for i, p in enumerate(names):
            dt = jnp.float32 if trainable_f32 and trainable_f32(p) else jnp.bfloat16
            x = jax.random.normal(jax.random.fold_in(key, i), flat[p].shape, jnp.float32) * 0.02
            if p.endswith(("/weight", "/scale")):
                x = x + 1.0
            out[p] = x.astype(dt)
        return unflatten(out)

    return jax.jit(make)(jax.random.key(0))


def batch(n_images, questions, seg_per_question, tokens, targets, hw=(480, 640)):
    import numpy as np

    from m2sa_jax.models.llava import IMAGE_TOKEN_INDEX

    rng = np.random.default_rng(0)
    q = n_images * questions
    ids = rng.integers(3, 32000, (q, tokens)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 8] = IMAGE_TOKEN_INDEX
    segs = list(seg_per_question) * n_images
    for i, k in enumerate(segs):
        for j in range(k):
            ids[i, tokens - 4 - 3 * j] = 32000
    labels = ids.copy()
    labels[:, :40] = -100
    labels[ids == IMAGE_TOKEN_INDEX] = -100
    gt = np.zeros((q, targets) + hw, bool)
    gt[..., 100:300, 200:400] = True
    return dict(
        sam_images=rng.normal(size=(n_images, 1024, 1024, 3)).astype(np.float32),
        clip_images=rng.normal(size=(n_images, 224, 224, 3)).astype(np.float32),
        resized_hw=np.array([[768, 1024]] * n_images, np.int32),
        original_hw=np.array([list(hw)] * n_images, np.int32),
        image_valid=np.ones((n_images,), bool),
        input_ids=ids, labels=labels, attention_mask=np.ones((q, tokens), bool),
        conv_image_index=np.repeat(np.arange(n_images), questions).astype(np.int32),
        conv_valid=np.ones((q,), bool), gt_masks=gt,
        target_valid=np.array([[j < k for j in range(targets)] for k in segs], bool))


def bench_forward(args) -> dict:
    import jax

    from m2sa_jax.models.m2sa import M2SA

    config = build(scan=True, remat="none")
    params = random_params(config)
    b = batch(1, 3, (2, 2, 1), tokens=128, targets=2)
    model = M2SA(config)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, method=M2SA.forward_batch)["mask_logits"])
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(params, b))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        out = fwd(params, b)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / args.iters
    dev = jax.devices()[0]
    return dict(what="teacher-forced forward, 1 image, 3 questions, 5 [SEG]", seconds=dt,
                questions_per_s=3 / dt, compile_s=compile_s, device=dev.device_kind,
                peak_mem_gb=(dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9,
                paper_train_mem_gb=30.6)


def bench_train(args) -> dict:
    import re

    import jax

    from m2sa_jax.models import lora as lora_lib
    from m2sa_jax.models.m2sa import M2SA
    from m2sa_jax.training import optim
    from m2sa_jax.training.step import make_train_step

    config = build(scan=True, remat=args.remat)
    pats = [re.compile(p[len("params/"):]) for p in optim.M2SA_TRAINABLE if p.startswith("params/")]
    params = random_params(config, lambda p: any(r.fullmatch(p) for r in pats))
    lcfg = lora_lib.LoraConfig()
    variables = {"params": params, "lora": lora_lib.init(jax.random.key(1), params, lcfg)}
    labels = optim.label_tree(variables, optim.M2SA_TRAINABLE)
    counts = optim.count_by_label(variables, labels)
    opt, _ = optim.make_optimizer(labels, lr=3e-4, warmup_steps=100, total_steps=5000)
    state = dict(step=jax.numpy.zeros((), "int32"), variables=variables,
                 opt_state=jax.jit(opt.init)(variables),
                 rng=jax.random.key_data(jax.random.key(0)), nonfinite=jax.numpy.zeros((), "int32"))
    step = jax.jit(make_train_step(M2SA(config), opt, labels,
                                   dict(ce_weight=1.0, bce_weight=0.5, dice_weight=2.0), lcfg),
                   donate_argnums=(0,))
    b = batch(2, 3, (3, 2, 1), tokens=args.tokens, targets=3)
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        state, m = compiled(state, b)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.iters
    dev = jax.devices()[0]
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind.upper()), float("nan"))
    return dict(what=f"train step, 2 images x 3 questions, {args.tokens} tokens, LoRA r8, "
                     f"remat={args.remat}", seconds=dt, samples_per_s=2 / dt,
                compile_s=compile_s, xla_flops=flops, mfu=flops / dt / peak,
                trainable=counts["trainable"], frozen=counts["frozen"], loss=float(m["loss"]),
                device=dev.device_kind,
                peak_mem_gb=(dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--what", nargs="+", default=["forward", "train"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--remat", default="nothing_saveable")
    p.add_argument("--tiny", action="store_true", help="toy sizes (check the script on a CPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global TINY
    TINY = args.tiny
    if args.child:
        fn = {"forward": bench_forward, "train": bench_train}[args.child]
        print("RESULT " + json.dumps(fn(args)))
        return 0
    import subprocess

    results = []
    for what in args.what:      # one process each: the GPU is empty for every measurement
        cmd = [sys.executable, "-m", "bench.gpu_m2sa", "--child", what, "--iters", str(args.iters),
               "--tokens", str(args.tokens), "--remat", args.remat] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{what}: failed (rc {out.returncode})\n{out.stderr[-3000:]}")
            continue
        results.append(json.loads(lines[-1][7:]))
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory plan of inference: weight bytes and the compiled peak of a batch-1 generate-then-segment
for M²SA-7B and M²SA-Llama2-13B in bf16 / int8 / int4, from XLA's memory analysis, without any
weights (the inference sibling of bench/memory_plan.py).

    python -m bench.memory_plan_inference                      # the table of the quantization note
    python -m bench.memory_plan_inference --configs m2sa_7b --schemes int4 --vision \\
        --json out.json

One jitted function does what ``M2SAPredictor.segment`` does for one image and one question:
SAM + CLIP encoding, the multimodal embedding, greedy decoding with the static KV cache
(``Generator``: a 64-token prompt bucket + 255 image rows, 64 new tokens), and the mask decoder
on up to 8 [SEG] states, at a 1024×768 image. It is lowered on ShapeDtypeStructs (bfloat16
float weights — what ``load(dtype="bfloat16")`` gives — or the quantized tree of
:mod:`m2sa_jax.quantization`), compiled for the CPU, and ``compiled.memory_analysis()`` gives
argument (weights + inputs), output and temp (everything live inside at its peak); peak =
argument + output − alias + temp. Layers are scanned (``scan_layers=True``) so the decoder's
dequantized weights exist one layer at a time.

Read the temp column knowing that XLA:CPU has no bfloat16 matmul: it gives each dot a float32
copy of its bfloat16 (or dequantized) weight, which a GPU does not make, and keeps the copies of
an unrolled stack live together (CLIP's 24 layers: 1.2 GB at ViT-L). ``temp`` on the CPU is
therefore an upper bound of what a GPU needs; ``--stages`` adds the temp of each stage compiled
alone (SAM encoder, CLIP tower, decoding) to show where it goes, and the staged peak: weights +
the largest stage, which is what ``M2SAPredictor`` needs, since it runs the stages as separate
jitted calls. bench/gpu_decode.py measures the decoder's real peak on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GB = 1e9
GOALS_GB = {("m2sa_7b", "int4"): 8.0, ("m2sa_7b", "int8"): 12.0, ("m2sa_llama2_13b", "int8"): 20.0}


def load_config(name: str):
    from m2sa_jax import config_file

    return config_file.load(os.path.join(ROOT, "configs", f"{name}.py"))


def plan_row(name: str, scheme: str, vision: bool, *, prompt_tokens: int = 64,
             new_tokens: int = 64, targets: int = 8, image_hw=(768, 1024),
             stages: bool = False) -> dict:
    import jax
    import jax.numpy as jnp

    from m2sa_jax import quantization as Q
    from m2sa_jax.inference.decode import Generator, bucket_length
    from m2sa_jax.models.m2sa import M2SA, abstract_params
    from m2sa_jax.training import memory_plan

    cfg = load_config(name)
    config = memory_plan.model_config(cfg)
    text = dataclasses.replace(config.llava.text, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                               scan_layers=True, remat_policy="none")
    vis = dataclasses.replace(config.llava.vision, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    config = dataclasses.replace(config, dtype=jnp.bfloat16, llava=dataclasses.replace(
        config.llava, text=text, vision=vis))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                          abstract_params(config))
    spec = None if scheme == "bf16" else Q.as_spec(scheme, vision=vision)
    if spec is not None:
        params = Q.abstract_quantized(params, spec)
    weights = Q.weight_bytes(params)

    model = Q.quantize_model(M2SA(config), spec)
    generator = Generator(text, max_new_tokens=new_tokens, eos_id=2, pad_id=0,
                          bucket=prompt_tokens, return_hidden=True, quantization=spec)
    rows = config.llava.num_image_rows
    expanded = bucket_length(prompt_tokens - 1 + rows, prompt_tokens)
    mask_hw = tuple(image_hw)
    seg_id = config.seg_token_id

    def generate_then_segment(params, sam_image, clip_image, ids, attention_mask, hw):
        enc = model.apply({"params": params}, sam_image, clip_image, method="encode_images")
        mm = model.apply({"params": params}, ids, attention_mask, enc["image_rows"],
                         method=lambda m, *a: m.llava.embed_multimodal(*a))
        pad = expanded - mm["inputs_embeds"].shape[1]
        embeds = jnp.pad(mm["inputs_embeds"], ((0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mm["attention_mask"], ((0, 0), (0, pad)))
        gen = generator._generate(params["llava"]["language_model"], embeds, mask,
                                  jax.random.key(0), jnp.float32(1e-6), jnp.float32(1.0),
                                  greedy=True)
        at = jnp.nonzero(gen["tokens"][0] == seg_id, size=targets, fill_value=0)[0]  # [M]
        hidden = gen["hidden"][0, at]                                                 # [M, d]
        out = model.apply({"params": params}, hidden, jnp.zeros((targets,), jnp.int32),
                          enc["image_embeddings"], enc["early_features"], hw, hw,
                          mask_hw=mask_hw, method="masks_from_hidden")
        return gen["tokens"], out["mask_logits"]

    s, c = config.sam.img_size, config.llava.vision.image_size
    args = (params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, c, c, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, prompt_tokens), jnp.int32),
            jax.ShapeDtypeStruct((1, prompt_tokens), jnp.bool_),
            jax.ShapeDtypeStruct((1, 2), jnp.int32))
    t0 = time.perf_counter()
    compiled = jax.jit(generate_then_segment).lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = memory_plan.memory_of(compiled, seconds)
    row = {}
    if stages:
        def temp(f, *a):
            return jax.jit(f).lower(*a).compile().memory_analysis().temp_size_in_bytes / GB

        row["stage_temp_gb"] = dict(
            sam=temp(lambda p, x: model.apply({"params": p}, x, method=lambda m, x:
                                              m.sam.encode_image(x)), params, args[1]),
            clip=temp(lambda p, x: model.apply({"params": p}, x, method=lambda m, x:
                                               m.llava.encode_images(x)), params, args[2]),
            decode=temp(lambda p, e, k: generator._generate(
                p["llava"]["language_model"], e, k, jax.random.key(0), jnp.float32(1e-6),
                jnp.float32(1.0), greedy=True), params,
                jax.ShapeDtypeStruct((1, expanded, text.hidden_size), jnp.bfloat16),
                jax.ShapeDtypeStruct((1, expanded), jnp.bool_)))
    if stages:
        # M2SAPredictor runs the stages as separate jitted calls: its peak is the weights plus
        # the largest stage (the values passed between stages are a few MB).
        row["staged_peak_gb"] = m.argument / GB + max(row["stage_temp_gb"].values())
    return dict(config=name, scheme=scheme, vision=vision, **row, weights_gb=weights["total"] / GB,
                quantized_gb=weights["quantized"] / GB, scales_gb=weights["scales"] / GB,
                float_gb=weights["float"] / GB, **m.row())


def table(rows: list[dict]) -> str:
    head = ("| model | weights | weight GB (int / scales / float) | argument GB | temp GB | "
            "peak GB | goal | stage temp GB (SAM / CLIP / decode) | staged peak GB | "
            "compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        goal = GOALS_GB.get((r["config"], r["scheme"])) if not r["vision"] else None
        mark = "" if goal is None else f"≤ {goal:.0f}: {'yes' if r['peak_gb'] <= goal else 'no'}"
        scheme = r["scheme"] + (" + ViTs" if r["vision"] else "")
        st = r.get("stage_temp_gb")
        stages = f"{st['sam']:.2f} / {st['clip']:.2f} / {st['decode']:.2f}" if st else ""
        staged = f"{r['staged_peak_gb']:.2f}" if st else ""
        lines.append(
            f"| {r['config']} | {scheme} | {r['weights_gb']:.2f} ({r['quantized_gb']:.2f} / "
            f"{r['scales_gb']:.2f} / {r['float_gb']:.2f}) | {r['argument_gb']:.2f} | "
            f"{r['temp_gb']:.2f} | {r['peak_gb']:.2f} | {mark} | {stages} | {staged} | "
            f"{r['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default="m2sa_7b,m2sa_llama2_13b")
    ap.add_argument("--schemes", default="bf16,int8,int4")
    ap.add_argument("--vision", action="store_true",
                    help="also rows with CLIP's and SAM's ViT linear layers quantized")
    ap.add_argument("--stages", action="store_true",
                    help="also the temp of each stage compiled alone (3 more compiles a row)")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = []
    for name in args.configs.split(","):
        for scheme in args.schemes.split(","):
            for vision in ([False, True] if args.vision and scheme != "bf16" else [False]):
                row = plan_row(name, scheme, vision, stages=args.stages)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Where a teacher-forced evaluation batch spends its time, stage by stage, JAX vs PyTorch.

    python -m bench.profile_stages [--images 4] [--questions 2] [--repeats 3]

The model, split and preprocessing are bench/eval_throughput.py's (the mid-sized random M²SA at
SAM 1024, float32). One batch of ``--images`` images is run through the forward in stages, each
stage timed on its own, in rounds alternating between the two frameworks after a warm-up (JAX:
each stage compiled once):

- JAX: every stage is a jitted call on the whole batch (as the evaluator batches it), blocked
  on before the next one starts — so fusion *across* stages is lost; the last line times the
  evaluator's single jitted forward over the same batch for comparison;
- PyTorch: the reference's modules, one image and its questions at a time (as the public
  evaluation runs them), summed over the images of the batch.

Host preprocessing (image decoding, resizing, tokenisation: the same code for both) and
batching are timed once. Prints per-stage seconds per batch, median [min–max], the ratio, and
each stage's share of the JAX and PyTorch totals.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench import common

STAGES = ("SAM image encoder", "CLIP + projector", "LLM forward (+ lm_head)", "text_hidden_fcs",
          "mask decoder (+ compress_vit)", "upsample to original size", "metrics (I/U counts)")


def jax_stages(model, params, batch, targets):
    """{stage: call} for the JAX model on one collated batch; each call blocks on its result
    and feeds the next stage through ``box``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2sa_jax.evaluation.metrics import mask_stats
    from m2sa_jax.models import sam as sam_lib
    from m2sa_jax.models.m2sa import seg_slots

    v = {"params": params}
    b = {k: jnp.asarray(x) for k, x in batch.items()}
    seg_id = model.config.seg_token_id
    img = model.config.sam.img_size
    mh, mw = batch["gt_masks"].shape[-2:]

    sam = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.sam.encode_image(x)))
    clip = jax.jit(lambda v, x: model.apply(
        v, x, method=lambda m, x: m.llava.encode_images(x)["image_rows"]))

    def _lm(v, ids, am, rows, cii):
        out = model.apply(v, ids, am, rows[cii], method=lambda m, *a: m.language(*a))
        q, t, valid, _ = seg_slots(ids, seg_id, targets)
        pos = out["text_to_expanded"][q, t]
        return out["logits"], out["last_hidden_state"][q, pos], valid

    lm = jax.jit(_lm)
    fcs = jax.jit(lambda v, h: model.apply(v, h, method=lambda m, h: m.text_hidden_fcs(h)))
    dec = jax.jit(lambda v, e, i, emb, early: model.apply(
        v, e, i, emb, early, method=lambda m, *a: m.decode_masks(*a)))
    up = jax.jit(lambda lr, r, o: jax.vmap(lambda m, r, o: sam_lib.postprocess_masks_padded(
        m, r, o, (mh, mw), img_size=img))(lr, r, o))
    n_q = batch["input_ids"].shape[0]
    seg_image = jnp.asarray(np.repeat(batch["conv_image_index"], targets))
    gt = b["gt_masks"].reshape(n_q * targets, mh, mw)
    box = {}

    def s_sam():
        enc = jax.block_until_ready(sam(v, b["sam_images"]))
        box["emb"], box["early"] = enc["image_embeddings"], enc["early_features"]

    def s_clip():
        box["rows"] = jax.block_until_ready(clip(v, b["clip_images"]))

    def s_lm():
        box["logits"], box["hidden"], box["valid"] = jax.block_until_ready(
            lm(v, b["input_ids"], b["attention_mask"], box["rows"], b["conv_image_index"]))

    def s_fcs():
        box["seg"] = jax.block_until_ready(fcs(v, box["hidden"])).astype(jnp.float32)

    def s_dec():
        box["low"] = jax.block_until_ready(dec(v, box["seg"], seg_image, box["emb"],
                                               box["early"]))

    def s_up():
        box["full"] = jax.block_until_ready(up(box["low"], b["resized_hw"][seg_image],
                                               b["original_hw"][seg_image]))

    def s_metrics():
        st = mask_stats(box["full"], gt, valid=box["valid"], sizes=b["original_hw"][seg_image])
        box["iu"] = np.asarray(st["intersection"]), np.asarray(st["union"])

    return dict(zip(STAGES, (s_sam, s_clip, s_lm, s_fcs, s_dec, s_up, s_metrics)))


def torch_stages(ref, examples):
    """{stage: call} for the PyTorch reference, one image (and its questions) at a time."""
    import torch

    from bench.eval_throughput import torch_inputs, torch_intersection_union

    sam = ref.sam
    pe = sam.prompt_encoder
    inputs = [torch_inputs(ex) for ex in examples]
    n_extra = ref.num_image_rows - 1
    box = {}

    def each(fn):
        def run():
            with torch.no_grad():
                for i, x in enumerate(inputs):
                    fn(i, x)
        return run

    def s_sam(i, x):
        h = sam.image_encoder.patch_embed(x[0]) + sam.image_encoder.pos_embed
        early = None
        for blk in sam.image_encoder.blocks:
            h = blk(h)
            if blk.window_size == 0 and early is None:
                early = h
        box[i, "emb"] = sam.image_encoder.neck(h.permute(0, 3, 1, 2))
        box[i, "early"] = early

    def s_clip(i, x):
        box[i, "rows"] = ref.image_rows(x[1])

    def s_lm(i, x):
        ids, am = x[2], x[3]
        emb = ref.embed(ids, box[i, "rows"].expand(len(ids), -1, -1))
        attn = torch.cat([am[:, :1].expand(-1, n_extra), am], 1)
        last = ref.llm.model(inputs_embeds=emb, attention_mask=attn).last_hidden_state
        box[i, "logits"] = ref.llm.lm_head(last)
        seg = ids[:, 1:] == ref.seg_token_id
        seg = torch.cat([seg, torch.zeros_like(seg[:, :1])], 1)
        seg = torch.cat([torch.zeros_like(seg[:, :1]).expand(-1, n_extra), seg], 1)
        box[i, "last"], box[i, "mask"] = last, seg

    def s_fcs(i, x):
        box[i, "seg"] = ref.llm.model.text_hidden_fcs[0](box[i, "last"])[box[i, "mask"]]

    def s_dec(i, x):
        emb = box[i, "seg"]
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            len(emb), -1, *pe.image_embedding_size)
        fused = box[i, "emb"] + sam.mask_decoder.compress_vit(box[i, "early"].permute(0, 3, 1, 2))
        box[i, "low"], _ = sam.mask_decoder(
            image_embeddings=fused, image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=emb.unsqueeze(1), dense_prompt_embeddings=dense,
            multimask_output=False)

    def s_up(i, x):
        box[i, "full"] = sam.postprocess_masks(box[i, "low"], input_size=tuple(x[5][0]),
                                               original_size=tuple(x[6][0]))[:, 0]

    def s_metrics(i, x):
        gts = [m for ms in examples[i].masks for m in ms]
        box[i, "iu"] = [torch_intersection_union(lg, torch.from_numpy(g))
                        for lg, g in zip(box[i, "full"], gts)]

    fns = (s_sam, s_clip, s_lm, s_fcs, s_dec, s_up, s_metrics)
    return {name: each(fn) for name, fn in zip(STAGES, fns)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="images in the profiled batch")
    parser.add_argument("--questions", type=int, default=2, help="questions per image")
    common.add_arguments(parser)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    import m2sa_jax
    from bench import eval_throughput as et
    from checkpoints_convert.__main__ import main as convert_main
    from m2sa_jax.data.pipeline import collate, prepare_example
    from m2sa_jax.evaluation import teacher_forced

    common.set_torch_threads(args.threads)
    common.print_environment(
        "per-stage profile of one teacher-forced evaluation batch, JAX vs PyTorch (float32)",
        workload=f"{args.images} images × {args.questions} questions × {et.TARGETS} [SEG]")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "converted")
        ref, _ = et.write_folder(src)
        assert convert_main(["m2sa", "--src", src, "--dst", dst]) == 0
        predictor = m2sa_jax.load(dst)
        config, tok = predictor.config, predictor.tokenizer
        sam_size, clip_size = config.sam.img_size, config.llava.vision.image_size
        samples = et.load_split(os.path.join(tmp, "split"), args.images, args.questions)
        t0 = time.perf_counter()
        examples = [prepare_example(s, tok, sam_size, clip_size) for s in samples]
        host_s = time.perf_counter() - t0
        shapes = et.batch_shapes(samples, examples, args.images, args.questions)
        t0 = time.perf_counter()
        batch = collate(examples, shapes, tok.pad_token_id)
        collate_s = time.perf_counter() - t0
        jx = jax_stages(predictor.model, predictor.params, batch, shapes.max_targets)
        pt = torch_stages(ref, examples)
        forward = teacher_forced.make_forward(predictor.model)
        mesh = teacher_forced.data_mesh()
        variables = teacher_forced.replicate({"params": predictor.params}, mesh)
        placed = teacher_forced.place_batch(batch, mesh)
        one = lambda: jax.block_until_ready(forward(variables, placed))        # noqa: E731

        logs = {"JAX": [], "PyTorch": []}

        def chain(stages, log):
            def run():
                times = {}
                for name, fn in stages.items():
                    t = time.perf_counter()
                    fn()
                    times[name] = time.perf_counter() - t
                log.append(times)
            return run

        runs = common.alternate({"JAX": chain(jx, logs["JAX"]),
                                 "PyTorch": chain(pt, logs["PyTorch"]),
                                 "JAX one jitted forward": one},
                                repeats=args.repeats, warmup=args.warmup)
    for side, log in logs.items():
        runs[side].result = log[args.warmup:]
    print(f"host, same code for both: preprocessing {host_s / args.images * 1000:.0f} ms per "
          f"image (decode, resize, normalise, tokenise), collate {collate_s * 1000:.0f} ms per "
          f"batch")
    return report_stages(runs, args)


def report_stages(runs, args) -> int:
    import statistics

    j, p = runs["JAX"], runs["PyTorch"]
    jt = {n: statistics.median(r[n] for r in j.result) for n in STAGES}
    pt_ = {n: statistics.median(r[n] for r in p.result) for n in STAGES}
    total_j, total_p = sum(jt.values()), sum(pt_.values())
    print(f"stages of one batch ({args.images} images; each stage's median of "
          f"{args.repeats} rounds):")
    print(f"  {'stage':32s} {'JAX s':>8s} {'share':>6s} {'PyTorch s':>10s} {'share':>6s} "
          f"{'speed':>6s}")
    for name in STAGES:
        a, b = jt[name], pt_[name]
        print(f"  {name:32s} {a:8.3f} {a / total_j:6.1%} {b:10.3f} {b / total_p:6.1%} "
              f"{b / max(a, 1e-9):5.2f}×")
    common.report([j, p, runs["JAX one jitted forward"]], units=args.images, unit="images/s")
    common.report_ratio(j, p, "speed JAX stages / PyTorch")
    common.report_ratio(runs["JAX one jitted forward"], p, "speed JAX forward / PyTorch")
    print(f"  JAX one forward vs the sum of its stages: "
          f"{statistics.median(runs['JAX one jitted forward'].seconds):.3f} s vs "
          f"{j.median:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

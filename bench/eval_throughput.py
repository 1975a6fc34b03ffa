"""Teacher-forced evaluation throughput on the CPU: the JAX evaluator vs the PyTorch reference
composition (tests/support/torch_m2sa_reference.py), same weights, same split, one process.

    python -m bench.eval_throughput [--images 8] [--questions 2] [--batch 4] [--repeats 3]

A mid-sized random M²SA (LLaMA hidden 512 × 4 layers, CLIP hidden 256 × 4 layers at 224, SAM
ViT width 256 × depth 12 at 1024 with global attention at 2/5/8/11 and the compress_vit fusion)
is written as a released-layout LISA/M²SA folder and converted with ``python -m
checkpoints_convert m2sa``. The split is an MMR-format set of ``--images`` photographs of
different sizes (bench/fixtures.py), ``--questions`` questions each with 2 targets, read through
the MMR reader with the evaluation prompt. A sample is one question (its [SEG]s decoded to
full-size masks and scored).

Both sides do the whole evaluation of the split, float32:

- JAX: ``evaluation.teacher_forced.evaluate`` as eval.py runs it — image decoding,
  preprocessing and tokenisation, static batches of ``--batch`` images, the jitted forward, gIoU/cIoU.
- PyTorch: as the public evaluation runs it — the same preprocessing (m2sa_jax.data.pipeline,
  with the same ``--read-threads``), one image and its questions per forward, masks
  post-processed to the original size and scored per mask with the public code's 2-bin
  histogram (``intersectionAndUnionGPU``).

Prints the environment, samples/s of each side (median [min–max] of ``--repeats`` alternating
runs after a warm-up that includes JAX's compile), the speed ratio, both sides' gIoU/cIoU (the
same masks must score the same) and the largest mask-logit difference on the first image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench import common

SP_VOCAB = 400
TARGETS = 2


def write_folder(folder: str, seed: int = 0):
    """A released-layout M²SA folder of the mid-sized model; returns (reference, [SEG] id)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from tests.support.m2sa_helpers import (make_tokenizer_files, randomize,
                                            write_sharded_safetensors)
    from tests.support.torch_m2sa_reference import TorchM2SA, build_sam

    os.makedirs(folder, exist_ok=True)
    seg_id = make_tokenizer_files(folder, SP_VOCAB)
    llama_cfg = LlamaConfig(vocab_size=SP_VOCAB + 3, hidden_size=512, intermediate_size=1376,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                            rms_norm_eps=1e-6, max_position_embeddings=1024,
                            attn_implementation="sdpa")
    clip_cfg = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                num_attention_heads=4, image_size=224, patch_size=14,
                                hidden_act="quick_gelu", attn_implementation="sdpa")
    sam = build_sam(embed_dim=256, depth=12, num_heads=4, global_attn_indexes=(2, 5, 8, 11),
                    img_size=1024, use_compress_vit=True)
    ref = TorchM2SA(llama_cfg, clip_cfg, sam, seg_token_id=seg_id, num_image_rows=256)
    randomize(ref, seed, std=0.02)
    ref.eval()
    write_sharded_safetensors({k: v.contiguous() for k, v in ref.state_dict().items()}, folder, 2)
    hf = dict(llama_cfg.to_dict(), architectures=["LISAForCausalLM"], mm_vision_tower="clip",
              vision_config=clip_cfg.to_dict(), mm_use_im_start_end=True,
              mm_vision_select_layer=-2, out_dim=256)
    hf.pop("attn_implementation", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, default=str)
    return ref, seg_id


def load_split(folder: str, n_images: int, questions: int):
    """The benchmark split's Samples (evaluation prompt, every question)."""
    from bench.fixtures import write_mmr_split
    from m2sa_jax.data.mmr import MMRDataset

    path, root = write_mmr_split(folder, n_images, questions=questions, targets=TARGETS)
    dataset = MMRDataset(path, root, prompt="val", strict=True)
    return [dataset.sample(i, all_questions=True) for i in range(len(dataset))]


def batch_shapes(samples, examples, images_per_batch: int, questions: int):
    """Static shapes as eval.py picks them: the canvas is the largest image rounded up to 64,
    one token bucket holding the longest conversation (rounded up to 64)."""
    from m2sa_jax.data.pipeline import BatchShapes

    up = lambda n: -(-n // 64) * 64                                   # noqa: E731
    longest = max(len(c.input_ids) for ex in examples for c in ex.conversations)
    return BatchShapes(images=images_per_batch, conversations=images_per_batch * questions,
                       token_buckets=(up(longest),), max_targets=TARGETS,
                       mask_hw=(up(max(s.height for s in samples)),
                                up(max(s.width for s in samples))))


def torch_inputs(ex):
    """One Example as the reference's forward takes it (its questions right-padded)."""
    import numpy as np
    import torch

    t = max(len(c.input_ids) for c in ex.conversations)
    ids = np.zeros((len(ex.conversations), t), np.int64)
    am = np.zeros_like(ids)
    for k, c in enumerate(ex.conversations):
        ids[k, :len(c.input_ids)], am[k, :len(c.input_ids)] = c.input_ids, 1
    return (torch.from_numpy(ex.sam_image).permute(2, 0, 1)[None],
            torch.from_numpy(ex.clip_image).permute(2, 0, 1)[None],
            torch.from_numpy(ids), torch.from_numpy(am),
            torch.zeros(len(ex.conversations), dtype=torch.long),
            [ex.resized_hw], [ex.original_hw])


def torch_intersection_union(logits, gt):
    """The public evaluation's per-mask counts: binarise at 0, 2-bin histograms of the
    prediction, the target and their agreement (``intersectionAndUnionGPU``, K=2)."""
    import torch

    output = (logits > 0).int().flatten()
    target = gt.int().flatten()
    agree = output[output == target]
    area_i = torch.histc(agree.float(), bins=2, min=0, max=1)
    area_o = torch.histc(output.float(), bins=2, min=0, max=1)
    area_t = torch.histc(target.float(), bins=2, min=0, max=1)
    return float(area_i[1]), float((area_o + area_t - area_i)[1])


def scores(inter, union) -> dict:
    import numpy as np

    inter, union = np.asarray(inter, float), np.asarray(union, float)
    iou = np.where(union == 0, 1.0, inter / (union + 1e-5))
    return dict(giou=float(iou.mean()), ciou=float(inter.sum() / max(union.sum(), 1e-9)),
                masks=int(len(iou)))


def make_torch_side(ref, samples, tokenizer, sam_size, clip_size, read_threads):
    import torch

    from m2sa_jax.data.pipeline import iter_examples
    from m2sa_jax.data.skips import SkipCounter

    def run():
        inter, union = [], []
        examples = iter_examples(samples, tokenizer, SkipCounter(strict=True),
                                 num_workers=read_threads, sam_size=sam_size, clip_size=clip_size)
        for ex in examples:
            with torch.no_grad():
                out = ref(*torch_inputs(ex))
            logits = out["mask_logits"][0]                           # [n, H, W]
            gts = [m for masks in ex.masks for m in masks]
            for lg, gt in zip(logits, gts):
                i, u = torch_intersection_union(lg, torch.from_numpy(gt))
                inter.append(i)
                union.append(u)
        return scores(inter, union)

    return run


def make_jax_side(predictor, samples, shapes, sam_size, clip_size, read_threads):
    from m2sa_jax.evaluation import teacher_forced

    mesh = teacher_forced.data_mesh()
    forward = teacher_forced.make_forward(predictor.model)
    variables = teacher_forced.replicate({"params": predictor.params}, mesh)

    def run():
        metrics, skips, _ = teacher_forced.evaluate(
            forward, variables, samples, predictor.tokenizer, shapes, split="val",
            sam_size=sam_size, clip_size=clip_size, progress=False, mesh=mesh,
            read_threads=read_threads)
        if skips.total:
            raise RuntimeError(f"the benchmark split lost records: {dict(skips.counts)}")
        r = metrics.result()["val"]["all"]
        return dict(giou=r["giou"], ciou=r["ciou"], masks=r["masks"])

    return run, forward, variables, mesh


def first_image_difference(ref, forward, variables, mesh, examples, shapes, pad_id) -> float:
    """max |JAX − PyTorch| over the first image's full-size mask logits."""
    import numpy as np
    import torch

    from m2sa_jax.data.pipeline import collate
    from m2sa_jax.evaluation import teacher_forced

    ex = examples[0]
    batch = collate([ex], shapes, pad_id)
    logits = np.asarray(forward(variables, teacher_forced.place_batch(batch, mesh))["mask_logits"])
    with torch.no_grad():
        want = ref(*torch_inputs(ex))["mask_logits"][0].numpy()       # [n, H, W]
    h, w = ex.original_hw
    got = np.concatenate([logits[k * shapes.max_targets:k * shapes.max_targets + len(m), :h, :w]
                          for k, m in enumerate(ex.masks)])
    return float(np.abs(got - want).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--questions", type=int, default=2, help="questions per image")
    parser.add_argument("--batch", type=int, default=4, help="images per JAX batch")
    parser.add_argument("--read-threads", type=int, default=0,
                        help="image-decoding threads of both sides (0: in the main thread)")
    common.add_arguments(parser)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import m2sa_jax
    from checkpoints_convert.__main__ import main as convert_main
    from m2sa_jax.data.pipeline import prepare_example

    common.set_torch_threads(args.threads)
    common.print_environment(
        "teacher-forced evaluation, JAX evaluator vs PyTorch reference (float32)",
        workload=f"{args.images} images × {args.questions} questions × {TARGETS} [SEG]; JAX "
                 f"batches of {args.batch} images; read threads {args.read_threads}")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "converted")
        ref, _ = write_folder(src)
        assert convert_main(["m2sa", "--src", src, "--dst", dst]) == 0
        predictor = m2sa_jax.load(dst)
        config, tok = predictor.config, predictor.tokenizer
        sam_size, clip_size = config.sam.img_size, config.llava.vision.image_size
        samples = load_split(os.path.join(tmp, "split"), args.images, args.questions)
        examples = [prepare_example(s, tok, sam_size, clip_size) for s in samples]
        shapes = batch_shapes(samples, examples, args.batch, args.questions)
        jax_run, forward, variables, mesh = make_jax_side(predictor, samples, shapes, sam_size,
                                                          clip_size, args.read_threads)
        torch_run = make_torch_side(ref, samples, tok, sam_size, clip_size, args.read_threads)
        diff = first_image_difference(ref, forward, variables, mesh, examples, shapes,
                                      tok.pad_token_id)
        print(f"  batch shapes: {shapes}")
        runs = common.alternate({"JAX (teacher_forced.evaluate)": jax_run,
                                 "PyTorch reference (1 image/forward)": torch_run},
                                repeats=args.repeats, warmup=args.warmup)
    jx, pt = runs.values()
    samples_n = args.images * args.questions
    print(f"results ({samples_n} samples per repeat; median [min–max] of {args.repeats}):")
    common.report([jx, pt], units=samples_n, unit="samples/s")
    common.report_ratio(jx, pt, "speed JAX / PyTorch")
    print(f"  gIoU / cIoU: JAX {jx.result['giou']:.4f} / {jx.result['ciou']:.4f}, PyTorch "
          f"{pt.result['giou']:.4f} / {pt.result['ciou']:.4f} ({jx.result['masks']} masks); "
          f"max |mask logit diff| on the first image {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teacher-forced evaluation throughput on the CPU: the JAX evaluation forward vs the PyTorch
reference composition (tests/support/torch_m2sa_reference.py), same weights, same inputs, one run.

    python -m bench.eval_throughput [--images 8] [--questions 2] [--batch 4] [--threads N]

A mid-sized random M²SA (LLaMA hidden 512 × 4 layers, CLIP hidden 256 × 4 layers at 224, SAM
ViT width 256 × depth 12 at 1024 with global attention at 2/5/8/11 and the compress_vit fusion)
is written as a released-layout LISA/M²SA folder, converted with ``python -m checkpoints_convert
m2sa``, and both sides run it in float32. PyTorch runs as the public evaluation does (one image
and its questions per forward); JAX runs the teacher-forced evaluator's jitted forward on static
batches of ``--batch`` images (compiled once before timing). A sample is one question (its
[SEG]s decoded to full-size masks). Prints samples/s of each, the ratio and the largest mask
logit difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

SP_VOCAB = 400


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


def make_inputs(n_images: int, questions: int, seg_id: int, seed: int = 0):
    """Real photographs (not square) and per image ``questions`` rows of ~60 tokens holding 2
    [SEG]s each, right-padded to one length."""
    import numpy as np
    from skimage import data

    from m2sa_jax.data.preprocess import clip_preprocess, sam_preprocess
    from m2sa_jax.data.tokenizer import IMAGE_TOKEN_INDEX

    rng = np.random.default_rng(seed)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    images = []
    for i in range(n_images):
        img = photos[i % len(photos)]
        img = img[: img.shape[0] - 7 * i % 50, : img.shape[1] - 11 * i % 60]
        sam, resized, original = sam_preprocess(img)
        images.append(dict(sam=sam, clip=clip_preprocess(img), resized=resized, original=original))
    rows = []
    for _ in range(n_images * questions):
        body = lambda n: list(rng.integers(3, SP_VOCAB, n))
        rows.append([1] + body(40) + [IMAGE_TOKEN_INDEX] + body(12) + [seg_id] + body(3) +
                    [seg_id] + body(2) + [2])
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int32)
    am = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], am[i, :len(r)] = r, True
    return images, ids, am


def run_torch(ref, images, ids, am, questions, threads):
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    outs = []

    def one(i):
        im = images[i]
        q = slice(i * questions, (i + 1) * questions)
        with torch.no_grad():
            r = ref(torch.from_numpy(im["sam"]).permute(2, 0, 1)[None],
                    torch.from_numpy(im["clip"]).permute(2, 0, 1)[None],
                    torch.from_numpy(ids[q]).long(), torch.from_numpy(am[q]).long(),
                    torch.zeros(questions, dtype=torch.long), [im["resized"]], [im["original"]])
        return r["mask_logits"][0].numpy()

    one(0)                                                           # warm-up
    t0 = time.perf_counter()
    for i in range(len(images)):
        outs.append(one(i))
    return time.perf_counter() - t0, outs


def run_jax(predictor, images, ids, am, questions, batch):
    import jax
    import numpy as np

    from m2sa_jax.evaluation import teacher_forced

    model, params = predictor.model, predictor.params
    mesh = teacher_forced.data_mesh()
    forward = teacher_forced.make_forward(model)
    variables = teacher_forced.replicate({"params": params}, mesh)
    n_img = len(images)
    mh = -(-max(im["original"][0] for im in images) // 64) * 64
    mw = -(-max(im["original"][1] for im in images) // 64) * 64

    def collated(first):
        idx = list(range(first, min(first + batch, n_img)))
        qn = batch * questions
        b = dict(sam_images=np.zeros((batch, 1024, 1024, 3), np.float32),
                 clip_images=np.zeros((batch, 224, 224, 3), np.float32),
                 resized_hw=np.zeros((batch, 2), np.int32), original_hw=np.zeros((batch, 2), np.int32),
                 input_ids=np.zeros((qn, ids.shape[1]), np.int32),
                 attention_mask=np.zeros((qn, ids.shape[1]), bool),
                 conv_image_index=np.zeros((qn,), np.int32),
                 gt_masks=np.zeros((qn, 2, mh, mw), bool))
        b["input_ids"][:, 0] = -200                        # padding rows: just an image
        b["attention_mask"][:, 0] = True
        for j, i in enumerate(idx):
            im = images[i]
            b["sam_images"][j], b["clip_images"][j] = im["sam"], im["clip"]
            b["resized_hw"][j], b["original_hw"][j] = im["resized"], im["original"]
            rows = slice(j * questions, (j + 1) * questions)
            b["input_ids"][rows] = ids[i * questions:(i + 1) * questions]
            b["attention_mask"][rows] = am[i * questions:(i + 1) * questions]
            b["conv_image_index"][rows] = j
        return idx, teacher_forced.place_batch(b, mesh)

    jax.block_until_ready(forward(variables, collated(0)[1]))       # compile
    t0 = time.perf_counter()
    outs = []
    for first in range(0, n_img, batch):
        idx, b = collated(first)
        logits = np.asarray(forward(variables, b)["mask_logits"])   # [B·Q·2, mh, mw]
        for j, i in enumerate(idx):
            h, w = images[i]["original"]
            outs.append(logits[j * questions * 2:(j + 1) * questions * 2, :h, :w])
    return time.perf_counter() - t0, outs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--questions", type=int, default=2, help="questions per image")
    parser.add_argument("--batch", type=int, default=4, help="images per JAX batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from checkpoints_convert.__main__ import main as convert_main
    import m2sa_jax

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "converted")
        ref, seg_id = write_folder(src)
        assert convert_main(["m2sa", "--src", src, "--dst", dst]) == 0
        predictor = m2sa_jax.load(dst)
        images, ids, am = make_inputs(args.images, args.questions, seg_id)
        jax_s, jax_out = run_jax(predictor, images, ids, am, args.questions, args.batch)
        torch_s, torch_out = run_torch(ref, images, ids, am, args.questions, args.threads)
    samples = args.images * args.questions
    err = max(float(np.abs(a - b).max()) for a, b in zip(jax_out, torch_out))
    jax_sps, torch_sps = samples / jax_s, samples / torch_s
    print(f"teacher-forced eval, {args.images} images × {args.questions} questions × 2 [SEG], "
          f"float32, {args.threads} CPU threads, device {jax.devices()[0].platform}")
    print(f"  JAX (batches of {args.batch} images): {jax_sps:.3f} samples/s ({jax_s:.1f} s)")
    print(f"  PyTorch reference (1 image/forward): {torch_sps:.3f} samples/s ({torch_s:.1f} s)")
    print(f"  ratio JAX / PyTorch: {jax_sps / torch_sps:.2f}×; max |mask logit diff| {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the full input pipeline: MMR record → decoded image, SAM + CLIP inputs, tokens,
masks → static-shape batch. Reports samples/s (one sample = one image with its questions).

Two datasets: the synthetic MMR set (160 px PNGs) and COCO-sized JPEGs (640×480 made from
scikit-image's sample photos, random ellipse masks as RLE in an MMR-format JSON,
bench/fixtures.py).

    python -m bench.input_pipeline [--images 50] [--workers 0 2] [--sam-size 1024] [--repeats 3]

Each worker setting of a dataset is one side: warmed up, then timed ``--repeats`` times in
alternating order; samples/s median [min–max]. The environment is printed first.

The tokenizer is the real LLaMA vocabulary rebuilt by tests/support/llama_vocab.py (run
scripts/setup.sh first).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from bench import common
from bench.fixtures import write_mmr_split
from m2sa_jax.data import mmr, pipeline, synthetic
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from tests.support import llama_vocab


def make_run(ds: mmr.MMRDataset, tok, workers: int, sam_size: int,
             shapes: pipeline.BatchShapes, passes: int):
    """A call that streams ``passes`` passes over the dataset into batches; returns
    (samples, skipped)."""
    rng = np.random.default_rng(0)
    samples = [ds.sample(i % len(ds), rng) for i in range(len(ds) * passes)]

    def run():
        skips = SkipCounter()
        n = 0
        examples = pipeline.iter_examples(samples, tok, skips, num_workers=workers,
                                          sam_size=sam_size)
        for batch in pipeline.batches(examples, shapes, tok.pad_token_id, skips):
            n += int(batch["image_valid"].sum())
        return n, skips.total

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--sam-size", type=int, default=1024)
    parser.add_argument("--passes", type=int, default=2, help="passes over the images per run")
    common.add_arguments(parser)
    args = parser.parse_args(argv)
    tok = LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder())
    common.print_environment("input pipeline: MMR records → static-shape batches",
                             workload=f"{args.images} images × {args.passes} passes, SAM input "
                                      f"{args.sam_size}, 3 questions per image")
    with tempfile.TemporaryDirectory() as tmp:
        syn = synthetic.generate(os.path.join(tmp, "syn"), args.images, 0, seed=0)
        coco_json, coco_root = write_mmr_split(os.path.join(tmp, "coco"), args.images,
                                               questions=3, targets=(1, 3),
                                               sizes=[(480, 640)], split="bench")
        datasets = {
            "synthetic 160px PNG": (mmr.MMRDataset(syn["train"], os.path.join(tmp, "syn", "images")),
                                    (160, 160)),
            "COCO-sized 640x480 JPEG": (mmr.MMRDataset(coco_json, coco_root), (480, 640)),
        }
        for name, (ds, mask_hw) in datasets.items():
            shapes = pipeline.BatchShapes(images=2, conversations=6, token_buckets=(128, 256, 512),
                                          max_targets=4, mask_hw=mask_hw)
            sides = {f"workers={w}": make_run(ds, tok, w, args.sam_size, shapes, args.passes)
                     for w in args.workers}
            runs = common.alternate(sides, repeats=args.repeats, warmup=args.warmup)
            n, skipped = next(iter(runs.values())).result
            print(f"{name} ({n} samples per run, {skipped} skipped; median [min–max] of "
                  f"{args.repeats}):")
            common.report(list(runs.values()), units=n, unit="samples/s", label_width=10)
    print("7B training consumes ≈0.7 samples/s per A6000 (paper); 4 GPUs ≈ 2.8 samples/s.")


if __name__ == "__main__":
    main()

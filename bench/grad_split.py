"""Where the learning demo's gradients cost their time (JAX only): the jitted forward + losses,
then forward + gradients with respect to one parameter group at a time.

    python -m bench.grad_split [--config configs/synthetic.py] [--repeats 5]

A gradient with respect to a group needs the backward pass from the losses down to that group
only, so the differences between groups show what each part of the backward costs (e.g.
``text_hidden_fcs`` = back through the mask losses, the resize and the mask decoder;
``llava/mm_projector`` = that plus back through the whole LLM). One batch of the config's
training stream; milliseconds, median [min–max] of ``--repeats`` calls after a compile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from bench import common
from bench.train_step import REPO, load_config

GROUPS = ("", "llava/language_model", "llava/vision_tower", "llava/mm_projector",
          "sam/image_encoder", "sam/mask_decoder", "sam/prompt_encoder", "text_hidden_fcs")


def demo_batch_and_loss(config_path: str):
    """(flat parameters, one device batch of the config's training stream, loss function) of a
    freshly initialised model: what the JAX-only gradient benchmarks time."""
    import jax
    import jax.numpy as jnp

    from m2sa_jax.data.skips import SkipCounter
    from m2sa_jax.models.m2sa import M2SA
    from m2sa_jax.training import loop
    from m2sa_jax.training.step import make_loss_fn
    from m2sa_jax.tree import flatten

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config_path, os.path.join(tmp, "data"), 20)
        built = loop.build(cfg)
        stream = loop._train_stream(cfg, built.config, built.tokenizer, built.root,
                                    built.images, SkipCounter())
        batch = jax.device_put(next(stream))
    flat = {k: jnp.asarray(v) for k, v in flatten({"params": built.params}).items()}
    t = cfg.train
    loss_fn = make_loss_fn(M2SA(built.config), dict(ce_weight=t.ce_weight,
                                                    bce_weight=t.bce_weight,
                                                    dice_weight=t.dice_weight), None)
    return flat, batch, loss_fn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "synthetic.py"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import jax

    common.print_environment("gradient cost by parameter group (JAX)",
                             workload=os.path.relpath(args.config, REPO))
    flat, batch, loss_fn = demo_batch_and_loss(args.config)
    rng = jax.random.key(0)

    def timed_ms(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append((time.perf_counter() - t0) * 1000)
        return common.fmt_range(statistics.median(times), min(times), max(times))

    fwd = jax.jit(lambda tr, fr: loss_fn(tr, fr, batch, rng)[0])
    print(f"  {'forward + losses':46s} {timed_ms(fwd, flat, {})} ms")
    for group in GROUPS:
        prefix = f"params/{group}"
        train = {k: v for k, v in flat.items() if k.startswith(prefix)}
        frozen = {k: v for k, v in flat.items() if not k.startswith(prefix)}
        grad = jax.jit(jax.value_and_grad(lambda tr, fr: loss_fn(tr, fr, batch, rng)[0]))
        n = sum(v.size for v in train.values())
        print(f"  {'+ gradients of ' + (group or 'everything'):32s} ({n:>9,d}) "
              f"{timed_ms(grad, train, frozen)} ms   load {common.load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train-step speed of the learning demo (configs/synthetic.py): the JAX step vs the PyTorch
reference composition (tests/support/torch_m2sa_reference.py) on the same model, weights and
batches, one process.

    python -m bench.train_step [--steps 20] [--repeats 3] [--config configs/synthetic.py]

The model, batch shapes, loss weights and optimizer are the config's (everything trains,
AdamW, gradient clipping); the data is a small synthetic MMR set generated with the config's
generator into a temporary folder and read by the training stream. The reference is built at
the same sizes, its random weights converted to JAX with the LISA/M²SA conversion table.

Three sides, each ``--steps`` steps per repeat, alternating, after a warm-up (JAX compiles):

- JAX loop: what ``train.py`` does per step — the next batch from the training stream (its
  read threads decode ahead), the jitted, donating step, the step's metrics fetched;
- JAX step: the jitted step alone on batches drawn beforehand;
- PyTorch step: the reference's forward (CE + BCE + Dice as the public code computes them),
  backward, gradient clipping and AdamW on the same batches drawn beforehand.

With ``--stages``, four more sides split one step into its parts on the same batches: JAX
forward + losses alone and forward + gradients alone (each jitted by itself), PyTorch forward +
losses alone (no_grad) and forward + backward (no optimizer).

Prints the environment, steps/s median [min–max] of each and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from bench import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, data_root: str, train_images: int):
    from m2sa_jax import config_file

    cfg = config_file.load(path)
    cfg.data.root = data_root
    cfg.data.train_images = train_images
    cfg.data.val_images = 2
    return cfg


def torch_reference(cfg, config):
    """The reference at the config's sizes (random weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from tests.support.m2sa_helpers import randomize
    from tests.support.torch_m2sa_reference import TorchM2SA, build_sam

    text, vision, s = config.llava.text, config.llava.vision, config.sam
    llama_cfg = LlamaConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                            intermediate_size=text.intermediate_size,
                            num_hidden_layers=text.num_hidden_layers,
                            num_attention_heads=text.num_attention_heads,
                            num_key_value_heads=text.num_key_value_heads,
                            rms_norm_eps=text.rms_norm_eps, rope_theta=text.rope_theta,
                            max_position_embeddings=text.max_position_embeddings,
                            attn_implementation="sdpa")
    clip_cfg = CLIPVisionConfig(hidden_size=vision.hidden_size,
                                intermediate_size=vision.intermediate_size,
                                num_hidden_layers=vision.num_hidden_layers,
                                num_attention_heads=vision.num_attention_heads,
                                image_size=vision.image_size, patch_size=vision.patch_size,
                                hidden_act=vision.hidden_act, attn_implementation="sdpa")
    sam = build_sam(embed_dim=s.encoder_embed_dim, depth=s.encoder_depth,
                    num_heads=s.encoder_num_heads, global_attn_indexes=s.global_attn_indexes,
                    img_size=s.img_size, patch=s.patch_size, window=s.window_size,
                    prompt_dim=s.prompt_embed_dim, use_compress_vit=s.use_compress_vit,
                    decoder_mlp_dim=s.decoder_mlp_dim, decoder_num_heads=s.decoder_num_heads,
                    iou_head_hidden_dim=s.iou_head_hidden_dim)
    ref = TorchM2SA(llama_cfg, clip_cfg, sam, seg_token_id=config.seg_token_id,
                    num_image_rows=config.llava.num_image_rows)
    randomize(ref, cfg.seed, std=0.02)
    return ref.train()


def jax_params_of(ref, config) -> dict:
    from m2sa_jax.checkpoints.m2sa import m2sa_rules
    from m2sa_jax.checkpoints.table import convert
    from m2sa_jax.models.m2sa import abstract_params

    state = ((k, v.detach().numpy()) for k, v in ref.state_dict().items())
    return convert(state, m2sa_rules(config), abstract_params(config), name="reference")


def torch_batch(batch):
    """A collated batch as the reference takes it: real images and conversations only, ground
    truth per image at its original size."""
    import numpy as np
    import torch

    img = np.flatnonzero(batch["image_valid"])
    conv = np.flatnonzero(batch["conv_valid"])
    remap = {int(i): k for k, i in enumerate(img)}
    image_of = np.array([remap[int(i)] for i in batch["conv_image_index"][conv]])
    order = np.argsort(image_of, kind="stable")             # the reference wants image order
    conv, image_of = conv[order], image_of[order]
    gts = []
    for k, i in enumerate(img):
        h, w = batch["original_hw"][i]
        rows = [m[:h, :w] for c in conv[image_of == k]
                for m, v in zip(batch["gt_masks"][c], batch["target_valid"][c]) if v]
        gt = np.stack(rows)       # the training stream's uint8 coverage (255 = inside), or bool
        gt = gt.astype(np.float32) / 255.0 if gt.dtype == np.uint8 else gt.astype(np.float32)
        gts.append(torch.from_numpy(gt))
    args = (torch.from_numpy(batch["sam_images"][img]).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(batch["clip_images"][img]).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(batch["input_ids"][conv].astype(np.int64)),
            torch.from_numpy(batch["attention_mask"][conv].astype(np.int64)),
            torch.from_numpy(image_of.astype(np.int64)),
            [tuple(batch["resized_hw"][i]) for i in img],
            [tuple(batch["original_hw"][i]) for i in img])
    return args, torch.from_numpy(batch["labels"][conv].astype(np.int64)), gts


def make_torch_step(ref, cfg):
    import torch

    from tests.support.torch_m2sa_reference import mask_loss_terms

    t = cfg.train
    opt = torch.optim.AdamW(ref.parameters(), lr=t.lr, betas=(t.b1, t.b2),
                            weight_decay=t.weight_decay)

    def step(tb):
        args, labels, gts = tb
        out = ref(*args, labels=labels)
        bce, dice = mask_loss_terms(out["mask_logits"], gts)
        loss = t.ce_weight * out["ce"] + t.bce_weight * bce + t.dice_weight * dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), t.clip_norm)
        opt.step()
        return float(loss.detach())

    return step


def build_jax(cfg, built, params):
    """(jitted step, state, stream, mesh): the pieces train.py's loop builds."""
    import jax

    from m2sa_jax import sharding
    from m2sa_jax.data.skips import SkipCounter
    from m2sa_jax.models.m2sa import M2SA
    from m2sa_jax.training import loop
    from m2sa_jax.training.step import make_train_step

    mesh = sharding.mesh_from_config(cfg.mesh)
    state, state_sh, optimizer, _, labels, lora_cfg = loop.init_state(cfg, built.config, params,
                                                                      mesh)
    weights = dict(ce_weight=cfg.train.ce_weight, bce_weight=cfg.train.bce_weight,
                   dice_weight=cfg.train.dice_weight)
    step_fn = jax.jit(make_train_step(M2SA(built.config), optimizer, labels, weights, lora_cfg,
                                      cfg.train.grad_accum),
                      in_shardings=(state_sh, None),
                      out_shardings=(state_sh, sharding.replicated(mesh)),
                      donate_argnums=(0,))
    stream = loop._train_stream(cfg, built.config, built.tokenizer, built.root, built.images,
                                SkipCounter())
    return step_fn, state, stream, mesh


def first_losses(cfg, config, params, ref, batch, tb) -> tuple[float, float]:
    """The loss of one batch before any update, JAX and PyTorch (the same weights)."""
    import jax
    import torch

    from m2sa_jax.models.m2sa import M2SA
    from m2sa_jax.training.losses import compute_losses
    from tests.support.torch_m2sa_reference import mask_loss_terms

    t = cfg.train
    weights = dict(ce_weight=t.ce_weight, bce_weight=t.bce_weight, dice_weight=t.dice_weight)
    model = M2SA(config)
    loss = jax.jit(lambda p, b: compute_losses(
        model.apply({"params": p}, b, method=M2SA.forward_batch), b, **weights)[0])
    args, labels, gts = tb
    with torch.no_grad():
        out = ref(*args, labels=labels)
        bce, dice = mask_loss_terms(out["mask_logits"], gts)
        want = t.ce_weight * out["ce"] + t.bce_weight * bce + t.dice_weight * dice
    return float(loss(params, batch)), float(want)


def stage_sides(cfg, config, state, placed, ref, torch_batches, labels):
    """The ``--stages`` sides: each runs its part of a step over every batch."""
    import jax
    import torch

    from m2sa_jax.models.m2sa import M2SA
    from m2sa_jax.training.step import make_loss_fn, split_trainable
    from tests.support.torch_m2sa_reference import mask_loss_terms

    t = cfg.train
    weights = dict(ce_weight=t.ce_weight, bce_weight=t.bce_weight, dice_weight=t.dice_weight)
    loss_fn = make_loss_fn(M2SA(config), weights, None)
    train, frozen = split_trainable(jax.tree.map(lambda x: x.copy(), state["variables"]),
                                    labels)
    rng = jax.random.key(0)
    fwd = jax.jit(lambda tr, fr, b: loss_fn(tr, fr, b, rng)[0])
    grad = jax.jit(lambda tr, fr, b: jax.value_and_grad(
        lambda x: loss_fn(x, fr, b, rng)[0])(tr))

    def jax_forward():
        for b in placed:
            out = fwd(train, frozen, b)
        return float(out)

    def jax_grad():
        for b in placed:
            out = grad(train, frozen, b)
        return float(jax.block_until_ready(out)[0])

    def torch_loss(tb):
        args, labels_t, gts = tb
        out = ref(*args, labels=labels_t)
        bce, dice = mask_loss_terms(out["mask_logits"], gts)
        return t.ce_weight * out["ce"] + t.bce_weight * bce + t.dice_weight * dice

    def torch_forward():
        with torch.no_grad():
            for tb in torch_batches:
                loss = torch_loss(tb)
        return float(loss.detach())

    def torch_backward():
        for tb in torch_batches:
            ref.zero_grad(set_to_none=True)
            loss = torch_loss(tb)
            loss.backward()
        return float(loss.detach())

    return {"JAX forward + losses": jax_forward, "JAX forward + gradients": jax_grad,
            "PyTorch forward + losses": torch_forward,
            "PyTorch forward + backward": torch_backward}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "synthetic.py"))
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--train-images", type=int, default=60,
                        help="images of the generated training split")
    parser.add_argument("--stages", action="store_true",
                        help="also time forward alone and forward + gradients on both sides")
    common.add_arguments(parser)
    args = parser.parse_args(argv)

    import jax

    from m2sa_jax import sharding
    from m2sa_jax.training import loop

    common.set_torch_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, os.path.join(tmp, "data"), args.train_images)
        if cfg.train.grad_accum != 1 or cfg.train.lora.rank:
            raise SystemExit("the reference step here has no gradient accumulation or LoRA")
        built = loop.build(cfg)                      # generates the data and its tokenizer
        ref = torch_reference(cfg, built.config)
        params = jax_params_of(ref, built.config)
        step_fn, state, stream, mesh = build_jax(cfg, built, params)
        common.print_environment(
            f"train step of {os.path.relpath(args.config, REPO)}: JAX vs PyTorch reference",
            workload=f"{args.steps} steps per repeat; batch {cfg.data.images_per_batch} images × "
                     f"≤{cfg.data.max_questions} questions × ≤{cfg.data.max_targets} targets, "
                     f"tokens {tuple(cfg.data.token_buckets)}, masks {tuple(cfg.data.mask_hw)}, "
                     f"SAM {built.config.sam.img_size}px; data read threads "
                     f"{cfg.data.read_threads}")
        drawn = [next(stream) for _ in range(args.steps)]
        placed = [sharding.put_batch(b, mesh, False) for b in drawn]
        torch_batches = [torch_batch(b) for b in drawn]
        with jax.default_matmul_precision("highest"):
            loss_jax, loss_torch = first_losses(cfg, built.config, params, ref, drawn[0],
                                                torch_batches[0])
        torch_step = make_torch_step(ref, cfg)
        box = {"state": state}

        def jax_loop():
            for _ in range(args.steps):
                batch = next(stream)
                box["state"], m = step_fn(box["state"], sharding.put_batch(batch, mesh, False))
                m = jax.device_get(m)
            return float(m["loss"])

        def jax_step():
            for b in placed:
                box["state"], m = step_fn(box["state"], b)
            return float(jax.device_get(m)["loss"])

        def torch_steps():
            for tb in torch_batches:
                loss = torch_step(tb)
            return loss

        sides = {"JAX loop (stream + step + metrics)": jax_loop,
                 "JAX step (batches drawn before)": jax_step,
                 "PyTorch reference step": torch_steps}
        if args.stages:
            labels = loop.init_state(cfg, built.config, params, mesh)[4]
            sides.update(stage_sides(cfg, built.config, box["state"], placed, ref,
                                     torch_batches, labels))
        runs = common.alternate(sides, repeats=args.repeats, warmup=args.warmup)
    loop_s, step_s, torch_s = (runs[k] for k in list(sides)[:3])
    print(f"results ({args.steps} steps per repeat; median [min–max] of {args.repeats}):")
    common.report(list(runs.values()), units=args.steps, unit="steps/s")
    common.report_ratio(step_s, torch_s, "speed JAX step / PyTorch step")
    common.report_ratio(loop_s, torch_s, "speed JAX loop / PyTorch step")
    print(f"  loss of the first batch before training (same weights, float32 highest "
          f"precision): JAX {loss_jax:.6f}, PyTorch {loss_torch:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""M²SA-7B: the MMR paper's recipe (paper §5.1; SPEC §4), LLaVA-Lightning-7B-v1 + SAM ViT-H.

    python train.py --config configs/m2sa_7b.py --workdir runs/m2sa_7b \\
        --config.model.llava_checkpoint=converted/llava-lightning-7b-v1 \\
        --config.model.sam_checkpoint=converted/sam_vit_h --config.data.root=/data/m2sa

Initial weights (``model.init = "checkpoint"``, see training/setup.py): a fresh run takes a
converted LLaVA (``model.llava_checkpoint``, ``python -m checkpoints_convert llava``) and a
converted SAM ViT-H (``model.sam_checkpoint``); text_hidden_fcs and compress_vit start random
and the vocabulary grows by [SEG], <im_start>, <im_end>. To continue from a released LISA/M²SA
model instead, set ``model.checkpoint`` (``python -m checkpoints_convert m2sa``) and leave the
other two empty. The architecture comes from the checkpoints; the sizes below describe the same
model so that the memory plan (python -m bench.memory_plan) can compile this config without weights.

Where each value comes from — [paper] MMR paper §5.1, [code] the authors' public training
script (LISA's train_ds.py defaults), [plan] chosen from docs/training.md's memory plan:

* variant m2sa (early fusion of SAM block 7 through compress_vit)                 [paper]
* LoRA r 8, alpha 16, dropout 0.05 on q_proj, v_proj                              [paper, code]
* trainable: LoRA, embed_tokens, lm_head, SAM mask decoder incl. compress_vit,
  text_hidden_fcs; everything else frozen (training/optim.M2SA_TRAINABLE)           [code]
* AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0, clip 1.0                      [code]
* 100 linear warmup steps, then linear decay to 0 (DeepSpeed WarmupDecayLR)      [code]
* batch 2 images per device, gradient accumulation 10                             [paper, code]
* bf16 compute, float32 master weights                                            [paper: bf16]
* 10 epochs × 5,000 steps = 50,000 optimizer steps                                 [paper; the
  code's default steps_per_epoch is 500: set train.steps=5000 to reproduce that]
* loss ce 1.0, bce 0.5, dice 2.0                                                   [paper; the
  code's defaults are ce 1.0, bce 2.0, dice 0.5 — LISA's, see lisa_7b.py]
* data sem_seg : refer_seg : vqa : mmr = 2 : 9 : 2 : 6, up to 3 questions/image   [code]
* model_max_length 2048                                                           [code, MMR]
* mesh fsdp over all devices, remat of LLM layers, scanned layers                  [plan]
"""

from m2sa_jax.config_file import sibling
from m2sa_jax.training import optim

base = sibling(__file__, "base")


def get_config(arg: str | None = None):
    c = base.get_config()
    c.workdir = "runs/m2sa_7b"

    c.model.init = "checkpoint"              # model.llava_checkpoint + model.sam_checkpoint
    # Vicuna-7B (LLaVA-Lightning-7B-v1's config.json); how to run it: scan + remat [plan].
    c.model.llm = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                       scan_layers=True, remat_policy="nothing_saveable")
    # CLIP ViT-L/14 at 224 (openai/clip-vit-large-patch14), 256 image rows.
    c.model.clip = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16, image_size=224, patch_size=14)
    c.model.sam = dict(model_type="vit_h")   # SPEC §1: embed 1280, depth 32, 1024×1024 input
    c.model.compute_dtype = "bfloat16"

    c.data.kind = "mixture"
    c.data.root = ""                          # one dataset root, laid out as docs/datasets.md
    c.data.ratios = dict(sem_seg=2.0, refer_seg=9.0, vqa=2.0, mmr=6.0)
    c.data.sem_seg = ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary")
    c.data.refer_seg = ("refclef", "refcoco", "refcoco+", "refcocog")
    c.data.vqa_data = "llava_instruct_150k"
    c.data.images_per_batch = 8               # 2 per device × 4 GPUs (paper); scale with devices
    c.data.token_buckets = (256, 512, 1024)
    c.data.mask_hw = (1024, 1024)
    c.data.model_max_length = 2048
    c.data.read_threads = 8

    c.train.steps = 50_000
    c.train.lr = 3e-4
    c.train.grad_accum = 10
    c.train.ce_weight, c.train.bce_weight, c.train.dice_weight = 1.0, 0.5, 2.0
    c.train.lora.rank = 8
    c.train.trainable = optim.M2SA_TRAINABLE
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.max_nonfinite = 10
    c.train.max_minutes = 0.0                 # no wall-time cap

    c.mesh.data, c.mesh.fsdp = 1, -1          # fsdp over every device [plan]

    c.eval.images_per_batch = 8
    c.eval.overlays = 8
    c.eval.before_training = False
    c.eval.read_threads = 8

    if arg == "public":                       # the public script's defaults where they differ
        c.train.steps = 5_000
        c.train.ce_weight, c.train.bce_weight, c.train.dice_weight = 1.0, 2.0, 0.5
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (known: public)")
    return c

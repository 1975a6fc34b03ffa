"""LISA-7B trained by this codebase: the same LLaVA-7B + SAM ViT-H without M²SA's early fusion
(variant "lisa": no compress_vit), with LISA's own loss weights and context length.

    python train.py --config configs/lisa_7b.py --workdir runs/lisa_7b \\
        --config.model.llava_checkpoint=converted/llava-lightning-7b-v1 \\
        --config.model.sam_checkpoint=converted/sam_vit_h --config.data.root=/data/m2sa

Differences from configs/m2sa_7b.py (see its docstring for every shared value and source):

* variant "lisa": SAM's mask decoder reads the image embedding only                [LISA code]
* loss ce 1.0, bce 2.0, dice 0.5                                                   [LISA code]
* model_max_length 512 (token buckets up to 512)                                  [LISA code]
* 10 epochs × 500 steps = 5,000 optimizer steps (LISA's steps_per_epoch default)  [LISA code]
* data: the M²SA mix 2 : 9 : 2 : 6 with MMR, so that a comparison with M²SA isolates the
  early fusion. LISA's own release trained on sem_seg : refer_seg : vqa : reason_seg =
  9 : 3 : 3 : 1 with ReasonSeg, a training group this mixture does not read; set
  data.ratios to change the mix.
"""

from m2sa_jax.config_file import sibling

m2sa_7b = sibling(__file__, "m2sa_7b")


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"unknown variant {arg!r} (lisa_7b has none)")
    c = m2sa_7b.get_config()
    c.workdir = "runs/lisa_7b"
    c.model.variant = "lisa"
    c.train.steps = 5_000
    c.train.ce_weight, c.train.bce_weight, c.train.dice_weight = 1.0, 2.0, 0.5
    c.data.model_max_length = 512
    c.data.token_buckets = (256, 512)
    return c

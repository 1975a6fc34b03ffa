"""Every key an experiment config has. The experiments (synthetic.py, m2sa_7b.py, and those
deriving from m2sa_7b.py) start from ``get_config()`` and set values; none adds a key.

* A value every experiment shares is set here (the eval readers' paths, optimizer betas, ...).
* ``None`` marks a value each experiment decides (learning rate, steps, model sizes, ...):
  loading a config that leaves one unset fails and names it (``m2sa_jax.config_file.load``).
* Keys read for one ``data.kind`` only default to "not used" (the mixture's groups, the
  synthetic generator's sizes).

The returned config is locked: setting a key that is not here fails where it is set (a
variant's typo), and ``train.py`` / ``eval.py`` / the export refuse ``--config.<key>=...``
overrides of keys that do not exist, listing the ones that do.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = None

    c.model = ml_collections.ConfigDict()
    c.model.variant = "m2sa"               # "m2sa": early fusion through compress_vit; "lisa"
    c.model.init = None                    # "random" (the sizes below) or "checkpoint"
    c.model.checkpoint = ""                # a converted LISA/M²SA folder to continue from
    c.model.llava_checkpoint = ""          # converted LLaVA + converted SAM: a fresh M²SA
    c.model.sam_checkpoint = ""
    c.model.llm = None                     # LlamaConfig sizes, scan_layers, remat_policy
    c.model.clip = None                    # CLIPVisionConfig sizes
    c.model.sam = None                     # model_type (vit_b/l/h) and SamConfig overrides
    c.model.compute_dtype = None           # m2sa_jax/dtypes.py names

    c.data = ml_collections.ConfigDict()
    c.data.kind = None                     # synthetic | mmr | mixture (training/loop.DATA_KINDS)
    c.data.root = None
    c.data.mmr_root = ""                   # MMR_{split}.json folder (mixture: root/MMR)
    c.data.image_root = ""                 # COCO images of MMR (mixture: under root/refer_seg)
    c.data.mmr_format = "json"             # MMR training split: "json" or "array_record" (the
                                           # split built into mmr_root by m2sa_jax.data.tfds_mmr)
    c.data.allow_no_target = False         # MMR answers without [SEG] are samples, not errors
    # data.kind = "synthetic": the generated set (m2sa_jax/data/synthetic.py) and its tokenizer
    c.data.train_images = 0
    c.data.val_images = 0
    c.data.generator_seed = 0
    c.data.vocab_size = 0
    # data.kind = "mixture": the four training groups (m2sa_jax/data/mixed.py)
    c.data.ratios = ml_collections.ConfigDict()
    c.data.sem_seg = ()
    c.data.refer_seg = ()
    c.data.vqa_data = ""
    c.data.max_questions = 3               # questions per image
    c.data.images_per_batch = None
    c.data.max_targets = 3                 # [SEG]s per question
    c.data.token_buckets = None
    c.data.mask_hw = None                  # masks padded to this; larger images: SAM's grid
    c.data.model_max_length = None
    c.data.released_pairing = False        # True reproduces the released loader's pairing bug
    c.data.read_threads = None

    c.train = ml_collections.ConfigDict()
    c.train.steps = None
    c.train.lr = None
    c.train.warmup_steps = 100
    c.train.grad_accum = None
    c.train.b1, c.train.b2 = 0.9, 0.95
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.ce_weight = None
    c.train.bce_weight = 0.5
    c.train.dice_weight = 2.0
    c.train.lora = dict(rank=None, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
    c.train.trainable = None               # path patterns (training/optim.py)
    c.train.log_every = None
    c.train.checkpoint_every = None
    c.train.keep_checkpoints = None
    c.train.max_nonfinite = None           # stop after this many non-finite steps in a row
    c.train.max_minutes = None             # guard: past this, save and fail loudly; 0: none

    # Device mesh (-1: the devices the other axes leave) and the logical-axis rules by name
    # (m2sa_jax/sharding.RULES).
    c.mesh = dict(data=None, fsdp=None, tensor=1, rules="fsdp_tensor")

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "val"
    c.eval.protocol = "teacher_forced"     # or "generate"
    c.eval.images_per_batch = None
    c.eval.overlays = None                 # prediction | ground truth images written
    c.eval.checkpoint = ""                 # any model source (m2sa_jax.checkpoints.resolve)
    c.eval.vision_tower = ""               # CLIP tower for a folder saved without one
    c.eval.dtype = "float32"               # language-model dtype at load (bfloat16 halves 7B)
    c.eval.quantize = ""                   # "" | int8 | int4: weight-only LLM linear layers
    c.eval.quantize_vision = False         # with quantize: also CLIP's and SAM's ViT
    c.eval.before_training = None          # train.py: also score the untrained model
    # eval.py: benchmark, where it lives, and how to batch it (m2sa_jax/evaluation/run.py);
    # "" = the data.* roots
    c.eval.dataset = "mmr"                 # mmr reasonseg refcoco(+,g) multi_refcoco(+,g) refcocom
    c.eval.mmr_root = ""                   # MMR_*.json folder ("": data.mmr_root / data.root)
    c.eval.image_root = ""                 # COCO images the MMR file_names resolve under
    c.eval.reasonseg_root = ""             # .../reason_seg/ReasonSeg (split folders inside)
    c.eval.refer_root = ""                 # LISA's refer_seg folder (refcoco*, RefCOCO refs)
    c.eval.refer_image_dir = ""            # default: <refer_root>/images/mscoco/images/train2014
    c.eval.refcocom_json = ""              # RefCOCOm (CRIS layout): annotation JSON,
    c.eval.refcocom_masks = ""             # its masks/ folder
    c.eval.refcocom_images = ""            # and the COCO images
    c.eval.multi_target_protocol = "paper"  # multi_refcoco*: "paper" (Table 4) or "released"
    c.eval.seed = 0                        # multi-target category draw
    c.eval.conversations_per_batch = 0     # 0: images_per_batch × most questions of a record
    c.eval.max_targets = 0                 # 0: the most targets of any question
    c.eval.token_buckets = ()              # (): data.token_buckets
    c.eval.max_new_tokens = 64             # generate protocol
    c.eval.save_every = 10                 # batches between saves of the resumable results
    c.eval.read_threads = None

    c.lock()
    return c

"""From an experiment config to the things a run needs: model config, tokenizer, parameters.

Initial weights come from checkpoints: a LISA/M²SA model to continue (``model.checkpoint``: any
source the resolver takes — converted directory, PyTorch folder, training workdir, cached
Hugging Face id), or a LLaVA directory plus a SAM directory for a fresh M²SA
(``model.llava_checkpoint`` + ``model.sam_checkpoint``; text_hidden_fcs and compress_vit start
random, the vocabulary grows by the added tokens). ``model.init = "random"`` builds everything
from the config's sizes (the synthetic demo).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax.checkpoints import converted
from m2sa_jax.checkpoints import llava as llava_ckpt
from m2sa_jax.checkpoints import sam as sam_ckpt
from m2sa_jax.checkpoints.resolve import resolve
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.dtypes import compute_dtype
from m2sa_jax.models import clip, llama, llava
from m2sa_jax.models import sam as sam_lib
from m2sa_jax.models.m2sa import M2SA, M2SAConfig, abstract_params
from m2sa_jax.models.sam import sam_config
from m2sa_jax.tree import flatten, unflatten


def _compute(cfg):
    return compute_dtype(cfg.model.get("compute_dtype", "float32"))


def model_config_from_sizes(cfg, seg_token_id: int, vocab_size: int) -> M2SAConfig:
    """M2SAConfig from the config's explicit sizes (random init)."""
    dt = _compute(cfg)
    llm = dict(cfg.model.llm)
    llm.setdefault("head_dim", llm["hidden_size"] // llm["num_attention_heads"])
    text = llama.LlamaConfig(vocab_size=vocab_size, dtype=dt, **llm)
    vision = clip.CLIPVisionConfig(dtype=dt, **dict(cfg.model.clip))
    sam_fields = dict(cfg.model.sam)
    model_type = sam_fields.pop("model_type", "vit_h")
    if "global_attn_indexes" in sam_fields:
        sam_fields["global_attn_indexes"] = tuple(sam_fields["global_attn_indexes"])
    sam = sam_config(model_type, use_compress_vit=cfg.model.variant == "m2sa", **sam_fields)
    return M2SAConfig(llava=llava.LlavaConfig(text=text, vision=vision), sam=sam,
                      seg_token_id=seg_token_id, variant=cfg.model.variant, dtype=dt)


def with_run_options(config: M2SAConfig, cfg) -> M2SAConfig:
    """Applies how-to-run options (compute dtype, scan, remat) to a loaded model config."""
    dt = _compute(cfg)
    llm = dict(cfg.model.get("llm", {}))
    text = dataclasses.replace(config.llava.text, dtype=dt,
                               scan_layers=llm.get("scan_layers", config.llava.text.scan_layers),
                               remat_policy=llm.get("remat_policy", config.llava.text.remat_policy))
    vision = dataclasses.replace(config.llava.vision, dtype=dt)
    lv = dataclasses.replace(config.llava, text=text, vision=vision)
    return dataclasses.replace(config, llava=lv, dtype=dt)


def _run_once(fn, *args):
    """``jax.jit(fn)(*args)`` for a function run once, compiled without XLA's backend
    optimisations: an initialiser is a few hundred small random draws, and XLA:CPU spends most
    of their compile time optimising code that runs for milliseconds (the demo model's init:
    about 15 s instead of 30 s)."""
    compiled = jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)


def random_params(config: M2SAConfig, seed: int) -> dict:
    """Every parameter from the modules' own initialisers (plus the converted-only leaves that
    the forward never reads, e.g. the last CLIP layer, from the same initialisers)."""
    model = M2SA(config)
    shapes = abstract_params(config)
    v, s = config.llava.vision, config.sam
    rows = config.llava.num_image_rows
    ids = np.zeros((1, 4), np.int32)
    ids[0, 1] = config.llava.image_token_index
    ids[0, 2] = config.seg_token_id

    def init(key):
        return model.init(
            key, jnp.zeros((1, s.img_size, s.img_size, 3)),
            jnp.zeros((1, v.image_size, v.image_size, 3)), jnp.asarray(ids),
            jnp.ones((1, 4), bool), jnp.zeros((1,), jnp.int32),
            jnp.full((1, 2), s.img_size, jnp.int32), jnp.full((1, 2), s.img_size, jnp.int32),
            targets_per_question=1, mask_hw=(8, 8))["params"]

    params = _run_once(init, jax.random.key(seed))
    del rows
    full_clip = _run_once(lambda key: clip.CLIPVisionModel(v).init(
        key, jnp.zeros((1, v.image_size, v.image_size, 3))), jax.random.key(seed + 1))
    params = dict(params)
    params["llava"] = dict(params["llava"], vision_tower=full_clip["params"])
    # SAM leaves of paths this forward does not take (the mask-prompt convs) from SAM's own init.
    flat = flatten(params)
    for k, v in flatten({"sam": sam_lib.init_params(s, seed + 2)}).items():
        flat.setdefault(k, v)
    params = unflatten(flat)
    converted.check_tree(params, shapes, "random parameters")
    return params


def extend_rows(table: np.ndarray, new_rows: int) -> np.ndarray:
    """Grows an embedding / lm_head table to ``new_rows`` rows, new rows = mean of the old
    (LLaVA's initialize_vision_tokenizer). ``table`` is [V, d] (embedding) layout."""
    v, d = table.shape
    if new_rows < v:
        raise ValueError(f"cannot shrink a vocabulary from {v} to {new_rows} rows")
    if new_rows == v:
        return table
    mean = np.asarray(table, np.float32).mean(axis=0, keepdims=True)
    return np.concatenate([np.asarray(table), np.repeat(mean, new_rows - v, 0).astype(table.dtype)])


def load_tokenizer(folder: str, model_max_length: int | None = None) -> LegacyLlamaTokenizer:
    return LegacyLlamaTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def init_from_checkpoints(cfg, seed: int):
    """(M2SAConfig, float32 host params, tokenizer folder, source config.json) from the
    checkpoints the config names (see module doc)."""
    if cfg.model.checkpoint:
        model = resolve(cfg.model.checkpoint, device=False)      # any kind of model source
        config = with_run_options(model.config, cfg)
        if config.variant != cfg.model.variant:
            config = dataclasses.replace(config, variant=cfg.model.variant)
        params = model.params
        decoder = params["sam"]["mask_decoder"]
        if cfg.model.variant == "m2sa" and "compress_vit_conv0" not in decoder:
            fresh = random_params(config, seed)       # a LISA continued as M²SA: fusion starts new
            decoder.update({k: v for k, v in fresh["sam"]["mask_decoder"].items()
                            if k.startswith("compress_vit")})
        return config, params, model.tokenizer_folder, model.meta.get("source_config") or {}
    if not (cfg.model.llava_checkpoint and cfg.model.sam_checkpoint):
        raise ValueError("set model.checkpoint (a LISA/M²SA model to continue: converted "
                         "directory, PyTorch folder, training workdir or cached Hugging Face id) "
                         "or both model.llava_checkpoint and model.sam_checkpoint (a fresh "
                         "M²SA), or model.init=random")
    lmeta = converted.load_meta(cfg.model.llava_checkpoint)
    smeta = converted.load_meta(cfg.model.sam_checkpoint)
    if lmeta.get("model") != "llava" or smeta.get("model") != "sam":
        raise ValueError("model.llava_checkpoint must be a converted LLaVA and "
                         "model.sam_checkpoint a converted SAM")
    tok = load_tokenizer(cfg.model.llava_checkpoint)       # adds [SEG] etc. if missing
    lv = llava_ckpt.meta_to_config(lmeta)
    lv = dataclasses.replace(lv, text=dataclasses.replace(lv.text, vocab_size=len(tok)))
    config = with_run_options(M2SAConfig(llava=lv, sam=sam_ckpt.meta_to_config(smeta),
                                         seg_token_id=tok.seg_token_id,
                                         variant=cfg.model.variant), cfg)
    fresh = random_params(config, seed)
    llava_params = converted.load_params(cfg.model.llava_checkpoint)
    lm = llava_params["language_model"]
    lm["embed_tokens"]["embedding"] = extend_rows(lm["embed_tokens"]["embedding"], len(tok))
    if "lm_head" in lm:
        lm["lm_head"]["kernel"] = extend_rows(np.asarray(lm["lm_head"]["kernel"]).T, len(tok)).T
    sam_params = converted.load_params(cfg.model.sam_checkpoint)
    md = sam_params["mask_decoder"]
    for k, v in fresh["sam"]["mask_decoder"].items():
        md.setdefault(k, v)                                   # compress_vit starts random
    params = {"llava": llava_params, "sam": sam_params, "text_hidden_fcs": fresh["text_hidden_fcs"]}
    converted.check_tree(params, abstract_params(config), "initial parameters")
    return config, params, cfg.model.llava_checkpoint, {}

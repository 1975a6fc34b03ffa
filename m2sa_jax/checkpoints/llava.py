"""LLaMA / Vicuna and LLaVA checkpoints (Hugging Face folders) ⇄ our parameters: key tables.

Layouts are recognised from the keys present (:func:`detect_layout`):

* ``llama``: ``LlamaForCausalLM`` (``model.layers.N.*``, ``model.norm``, ``lm_head``);
* ``llava_v1``: LLaVA v1 / LISA, the LLaMA keys plus ``model.mm_projector.*`` and the CLIP tower
  ``model.vision_tower.vision_tower.vision_model.*`` — which released folders usually leave out
  (it then comes from ``mm_vision_tower``, see :mod:`m2sa_jax.checkpoints.clip_tower`);
* ``llava_hf``: ``LlavaForConditionalGeneration`` in its in-memory names
  (``model.language_model.*``, ``model.vision_tower[.vision_model].*``,
  ``model.multi_modal_projector.linear_{1,2}``, ``lm_head``);
* ``llava_hf_old``: the names llava-hf checkpoints are stored under (and transformers 5 still
  saves): ``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower[.vision_model].*``, ``multi_modal_projector.*``.

The rule builders (:func:`llama_rules`, :func:`clip_rules`, :func:`projector_rules`) are reused by
the M²SA converter. Tensors stream shard by shard; :func:`convert_to_directory` keeps the output
leaves in memory-mapped files while they are filled, so resident memory stays near one shard even
when the converted tree is larger than RAM (13B in bfloat16 is 26 GB). The command line is
``python -m checkpoints_convert llava``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil


from m2sa_jax import dtypes
from m2sa_jax.checkpoints import clip_tower, converted
from m2sa_jax.checkpoints import torch_io as ckpt_io
from m2sa_jax.checkpoints.table import ConversionError, Rule, convert, export, skip
from m2sa_jax.models import clip, llama, llava

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.json", "generation_config.json")

_LAYER = [
    ("self_attn.q_proj.weight", "self_attn/q_proj/kernel", "linear"),
    ("self_attn.k_proj.weight", "self_attn/k_proj/kernel", "linear"),
    ("self_attn.v_proj.weight", "self_attn/v_proj/kernel", "linear"),
    ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", "linear"),
    ("self_attn.q_proj.bias", "self_attn/q_proj/bias", "identity"),
    ("self_attn.k_proj.bias", "self_attn/k_proj/bias", "identity"),
    ("self_attn.v_proj.bias", "self_attn/v_proj/bias", "identity"),
    ("self_attn.o_proj.bias", "self_attn/o_proj/bias", "identity"),
    ("mlp.gate_proj.weight", "mlp/gate_proj/kernel", "linear"),
    ("mlp.up_proj.weight", "mlp/up_proj/kernel", "linear"),
    ("mlp.down_proj.weight", "mlp/down_proj/kernel", "linear"),
    ("mlp.gate_proj.bias", "mlp/gate_proj/bias", "identity"),
    ("mlp.up_proj.bias", "mlp/up_proj/bias", "identity"),
    ("mlp.down_proj.bias", "mlp/down_proj/bias", "identity"),
    ("input_layernorm.weight", "input_layernorm/weight", "identity"),
    ("post_attention_layernorm.weight", "post_attention_layernorm/weight", "identity"),
]


def llama_rules(prefix: str = "model.", scan: bool = False, *, lm_head: str | None = "lm_head.weight",
                target: str = "") -> list[Rule]:
    """LLaMA decoder keys under ``prefix`` → our tree under ``target`` (``""`` or ``"x/"``).

    ``lm_head=None`` for tied embeddings (a stray ``lm_head.weight`` is then skipped).
    ``scan=True`` stacks layer ``N`` along the leading axis of ``layers/layer/*``.
    """
    rules = [Rule(f"{prefix}embed_tokens.weight", f"{target}embed_tokens/embedding"),
             Rule(f"{prefix}norm.weight", f"{target}norm/weight"),
             skip(f"{prefix}layers.{{i}}.self_attn.rotary_emb.inv_freq"),
             skip(f"{prefix}rotary_emb.inv_freq")]
    for src, dst, tr in _LAYER:
        if scan:
            rules.append(Rule(f"{prefix}layers.{{i}}.{src}", f"{target}layers/layer/{dst}", tr,
                              stack="i"))
        else:
            rules.append(Rule(f"{prefix}layers.{{i}}.{src}", f"{target}layers_{{i}}/{dst}", tr))
    return rules


def lm_head_rules(key: str, tied: bool, target: str = "") -> list[Rule]:
    return [skip(key)] if tied else [Rule(key, f"{target}lm_head/kernel", "linear")]


def clip_rules(prefix: str, target: str = "vision_tower/") -> list[Rule]:
    """CLIPVisionModel keys (``prefix`` ends with ``vision_model.``) → ``target``."""
    rules = [
        Rule(f"{prefix}embeddings.patch_embedding.weight", f"{target}patch_embedding/kernel",
             "conv2d"),
        Rule(f"{prefix}embeddings.class_embedding", f"{target}class_embedding"),
        Rule(f"{prefix}embeddings.position_embedding.weight",
             f"{target}position_embedding/embedding"),
        skip(f"{prefix}embeddings.position_ids"),
    ]
    for ln in ("pre_layrnorm", "post_layernorm"):
        rules += [Rule(f"{prefix}{ln}.weight", f"{target}{ln}/scale"),
                  Rule(f"{prefix}{ln}.bias", f"{target}{ln}/bias")]
    layer = f"{prefix}encoder.layers.{{i}}."
    out = f"{target}layers_{{i}}/"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += [Rule(f"{layer}self_attn.{proj}.weight", f"{out}self_attn/{proj}/kernel", "linear"),
                  Rule(f"{layer}self_attn.{proj}.bias", f"{out}self_attn/{proj}/bias")]
    for fc in ("fc1", "fc2"):
        rules += [Rule(f"{layer}mlp.{fc}.weight", f"{out}{fc}/kernel", "linear"),
                  Rule(f"{layer}mlp.{fc}.bias", f"{out}{fc}/bias")]
    for ln in ("layer_norm1", "layer_norm2"):
        rules += [Rule(f"{layer}{ln}.weight", f"{out}{ln}/scale"),
                  Rule(f"{layer}{ln}.bias", f"{out}{ln}/bias")]
    return rules


def projector_rules(prefix: str, projector_type: str, target: str = "mm_projector/") -> list[Rule]:
    """``prefix`` is ``model.mm_projector.`` (LLaVA v1: a Linear, or a Sequential for
    ``mlp2x_gelu``) or ``model.multi_modal_projector.`` (llava-hf: ``linear_1``/``linear_2``)."""
    if prefix.endswith("multi_modal_projector."):
        names = {"linear_1": "linear_1.", "linear_2": "linear_2."}
    elif projector_type == "linear":
        names = {"linear_1": ""}
    else:
        names = {"linear_1": "0.", "linear_2": "2."}
    rules = []
    for ours, theirs in names.items():
        rules += [Rule(f"{prefix}{theirs}weight", f"{target}{ours}/kernel", "linear"),
                  Rule(f"{prefix}{theirs}bias", f"{target}{ours}/bias")]
    return rules


# --- layouts --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each part of a model lives in a checkpoint's key space."""

    name: str
    text: str  # prefix of the LLaMA body (embed_tokens, layers, norm)
    lm_head: str  # key of the LM head weight
    vision: str | None = None  # prefix of the CLIP vision transformer (…embeddings.*)
    projector: str | None = None

    @property
    def is_llava(self) -> bool:
        return self.projector is not None


_TEXT = ("model.language_model.", "language_model.model.", "model.")
_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")
# LLaVA v1 / LISA wrap a CLIPVisionModel (vision_model.*); llava-hf checkpoints on the hub keep
# ``vision_model.``, while transformers 5 saves the tower without it.
_VISION = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model.",
           "model.vision_tower.", "vision_tower.vision_model.", "vision_tower.")
_PROJECTOR = ("model.mm_projector.", "model.multi_modal_projector.", "multi_modal_projector.")


def detect_layout(keys, name: str = "checkpoint") -> Layout:
    """Finds the prefixes of the parts from the keys present; fails naming what is missing."""
    keys = set(keys)
    text = next((p for p in _TEXT if f"{p}embed_tokens.weight" in keys), None)
    head = next((k for k in _LM_HEAD if k in keys), None)
    vision = next((p for p in _VISION if f"{p}embeddings.patch_embedding.weight" in keys), None)
    projector = next((p for p in _PROJECTOR if any(k.startswith(p) for k in keys)), None)
    missing = []
    if text is None:
        missing.append(f"the LLaMA token embedding (one of {[p + 'embed_tokens.weight' for p in _TEXT]})")
    if vision is None and projector == "model.mm_projector.":
        # LLaVA v1 / LISA as released: the tower is named by config.json, not saved
        return Layout("llava_v1", text, head or "lm_head.weight", None, projector)
    if (vision is None) != (projector is None):
        missing.append(f"the CLIP tower (…embeddings.patch_embedding.weight under one of {_VISION})"
                       if vision is None else f"the projector (keys under one of {_PROJECTOR})")
    if missing:
        raise ConversionError(f"{name}: not a LLaMA or LLaVA checkpoint this converter knows; "
                              f"missing " + "; ".join(missing))
    if vision is None:
        return Layout("llama", text, head or "lm_head.weight")
    kind = ("llava_v1" if projector == "model.mm_projector." else
            "llava_hf" if projector.startswith("model.") else "llava_hf_old")
    return Layout(kind, text, head or ("lm_head.weight" if kind != "llava_hf_old"
                                      else "language_model.lm_head.weight"), vision, projector)


def layout_rules(layout: Layout, config, scan: bool) -> list[Rule]:
    """The full table. ``config`` is a LlamaConfig (plain LLaMA) or a LlavaConfig."""
    if not layout.is_llava:
        return (llama_rules(layout.text, scan)
                + lm_head_rules(layout.lm_head, config.tie_word_embeddings))
    lm = "language_model/"
    return (llama_rules(layout.text, scan, target=lm)
            + lm_head_rules(layout.lm_head, config.text.tie_word_embeddings, lm)
            + clip_rules(layout.vision or clip_tower.LISA_TOWER_PREFIX)
            + projector_rules(layout.projector, config.projector_type))


def read_config(folder: str, *, vision_tower: str | None = None):
    """(layout, model config, tower) of a Hugging Face folder; ``tower`` is the CLIP tower found
    outside the folder (:func:`clip_tower.find_tower`) or None."""
    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{folder}: no config.json (the model architecture); copy it "
                                f"from the checkpoint's release next to the weights")
    with open(p) as f:
        cfg = json.load(f)
    keys = ckpt_io.checkpoint_keys(folder)
    layout = detect_layout(keys, folder)
    if not layout.is_llava:
        return layout, llama.LlamaConfig.from_hf(cfg), None
    tower = None
    vision = None
    if layout.vision is None:
        shapes = ckpt_io.checkpoint_shapes(folder, ("model.mm_projector.",))
        proj = shapes.get("model.mm_projector.weight", shapes.get("model.mm_projector.0.weight"))
        tower = clip_tower.find_tower(folder, cfg, keys, vision_tower=vision_tower,
                                      projector_in=proj[1] if proj else None)
        vision = tower.config
    elif "vision_config" not in cfg and "text_config" not in cfg:
        shapes = ckpt_io.checkpoint_shapes(folder, (layout.vision,))
        vision = clip_tower.infer_vision_config(shapes, layout.vision)
    config = llava.llava_config_from_hf(cfg, vision=vision)
    if layout.name == "llava_v1" and config.projector_type == "linear":
        if any(k.startswith("model.mm_projector.2.") for k in keys):
            raise ConversionError(f"{p}: mm_projector_type is 'linear' but the weights hold a "
                                  f"two-layer projector; set \"mm_projector_type\": \"mlp2x_gelu\"")
    return layout, config, tower


def target_shapes(layout: Layout, config, scan: bool):
    if not layout.is_llava:
        return llama.param_shapes(dataclasses.replace(config, scan_layers=scan))
    text = dataclasses.replace(config.text, scan_layers=scan)
    return llava.param_shapes(dataclasses.replace(config, text=text))


def convert_folder(src: str, *, scan: bool = False, dtype=None, workdir: str | None = None,
                   vision_tower: str | None = None):
    """Converts a folder. Returns (params, layout, config, tower). With ``workdir``, leaves are
    memory-mapped raw files there."""
    layout, config, tower = read_config(src, vision_tower=vision_tower)
    shapes = target_shapes(layout, config, scan)
    rules = layout_rules(layout, config, scan)
    allocate = converted.MemmapAllocator(workdir) if workdir else None
    source = ckpt_io.iter_checkpoint(src)
    if tower is not None:
        source = itertools.chain(source, tower.iter_tensors(clip_tower.LISA_TOWER_PREFIX))
    params = convert(source, rules, shapes, dtype=dtype, name=src, allocate=allocate)
    return params, layout, config, tower


def config_meta(layout: Layout, config, scan, dtype, tower=None) -> dict:
    """``m2sa_meta.json`` of a converted LLaMA / LLaVA directory."""
    if not layout.is_llava:
        return dict(model="llama", layout=layout.name, scan_layers=scan, dtype=dtype or "as stored",
                    text_config=config.to_hf())
    return dict(model="llava", layout=layout.name, scan_layers=scan, dtype=dtype or "as stored",
                text_config=config.text.to_hf(), vision_config=config.vision.to_hf(),
                projector_type=config.projector_type, image_token_index=config.image_token_index,
                vision_feature_layer=config.vision_feature_layer,
                vision_tower=tower.describe() if tower is not None else {"origin": "checkpoint"})


def meta_to_config(meta: dict):
    """The LlavaConfig (or LlamaConfig) of a converted directory's metadata."""
    text = llama.LlamaConfig.from_hf(meta["text_config"], scan_layers=meta["scan_layers"])
    if meta.get("model") == "llama":
        return text
    return llava.LlavaConfig(text=text, vision=clip.CLIPVisionConfig.from_hf(meta["vision_config"]),
                             projector_type=meta["projector_type"],
                             image_token_index=meta["image_token_index"],
                             vision_feature_layer=meta["vision_feature_layer"])


def convert_to_directory(src: str, dst: str, *, scan: bool = False, dtype: str | None = None,
                         vision_tower: str | None = None, overwrite: bool = False) -> str:
    """Converts ``src`` into ``dst`` (orbax params + m2sa_meta.json + tokenizer files), written
    atomically, with the output tree in memory-mapped files."""
    with converted.atomic_directory(dst, overwrite=overwrite) as tmp:
        work = os.path.join(tmp, ".convert_tmp")
        try:
            params, layout, config, tower = convert_folder(
                src, scan=scan, dtype=dtypes.storage_dtype(dtype), workdir=work,
                vision_tower=vision_tower)
            params = converted.reopen_readonly(params)
            converted.save_streaming(tmp, params, config_meta(layout, config, scan, dtype, tower))
            del params
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for name in TOKENIZER_FILES:
            p = os.path.join(src, name)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(tmp, name))
    return dst


def export_params(params, layout: Layout, config, scan: bool, dtype=None):
    """Our tree → ``(hf_key, array)`` pairs in the given layout's names."""
    return export(params, layout_rules(layout, config, scan), dtype=dtype)

"""LISA / M²SA Hugging Face folders ⇄ our parameters (SPEC §7).

A released folder holds config.json, the tokenizer (with the added ``[SEG]``, ``<im_start>``,
``<im_end>``) and weights (sharded ``pytorch_model-*.bin`` or ``*.safetensors`` with an index)
whose keys are those of LLaVA v1 plus ``model.visual_model.*`` (SAM) and
``model.text_hidden_fcs.0.{0,2}.*``; M²SA adds ``model.visual_model.mask_decoder.compress_vit``.
The public merge script drops every key containing ``vision_tower``, so the CLIP tower usually
comes from elsewhere (:mod:`m2sa_jax.checkpoints.clip_tower`); its tensors are streamed in under
the in-memory names ``model.vision_tower.vision_tower.vision_model.*``. The table reuses the
LLaMA, CLIP, projector and SAM tables with prefixes.

The command line is ``python -m checkpoints_convert m2sa``; :mod:`m2sa_jax.checkpoints.resolve`
loads such a folder directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil

from m2sa_jax import dtypes, quantization
from m2sa_jax.checkpoints import clip_tower, converted, quantized, torch_io
from m2sa_jax.checkpoints.llava import (TOKENIZER_FILES, clip_rules, lm_head_rules, llama_rules,
                                        projector_rules)
from m2sa_jax.checkpoints.sam import infer_config, sam_rules
from m2sa_jax.checkpoints.table import ConversionError, Rule, convert, export
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.models import llava
from m2sa_jax.models.m2sa import M2SAConfig, abstract_params

# A folder is LISA/M²SA when keys start with each of these (the CLIP tower may live elsewhere).
REQUIRED_PREFIXES = {
    "model.layers.": "the LLaMA decoder layers",
    "model.embed_tokens.": "the token embedding",
    "model.mm_projector.": "the mm_projector",
    "model.visual_model.image_encoder.": "the SAM image encoder",
    "model.visual_model.prompt_encoder.": "the SAM prompt encoder",
    "model.visual_model.mask_decoder.": "the SAM mask decoder",
    "model.text_hidden_fcs.0.": "text_hidden_fcs (the [SEG] projector)",
}
SAM_PREFIX = "model.visual_model."
TOWER_PREFIX = clip_tower.LISA_TOWER_PREFIX


def prefixed(rules, target_prefix: str) -> list[Rule]:
    return [r if r.target is None else Rule(r.source, target_prefix + r.target, r.transform,
                                            r.stack) for r in rules]


def m2sa_rules(config: M2SAConfig, scan: bool = False) -> list[Rule]:
    """The whole table for a LISA/M²SA folder (tower keys under :data:`TOWER_PREFIX`)."""
    lm = "llava/language_model/"
    tied = config.llava.text.tie_word_embeddings
    fcs = "model.text_hidden_fcs.0."
    return (llama_rules("model.", scan, target=lm) + lm_head_rules("lm_head.weight", tied, lm)
            + clip_rules(TOWER_PREFIX, target="llava/vision_tower/")
            + projector_rules("model.mm_projector.", config.llava.projector_type,
                              target="llava/mm_projector/")
            + prefixed(sam_rules(SAM_PREFIX), "sam/")
            + [Rule(f"{fcs}0.weight", "text_hidden_fcs/dense_0/kernel", "linear"),
               Rule(f"{fcs}0.bias", "text_hidden_fcs/dense_0/bias"),
               Rule(f"{fcs}2.weight", "text_hidden_fcs/dense_2/kernel", "linear"),
               Rule(f"{fcs}2.bias", "text_hidden_fcs/dense_2/bias")])


def check_layout(keys, folder: str) -> str:
    """'m2sa' or 'lisa'; otherwise an error naming what is missing."""
    keys = list(keys)
    missing = [f"{p}* ({what})" for p, what in REQUIRED_PREFIXES.items()
               if not any(k.startswith(p) for k in keys)]
    if missing:
        raise ConversionError(
            f"{folder}: not a LISA/M²SA checkpoint folder; no weights for:\n  "
            + "\n  ".join(missing)
            + "\nA LLaVA/LLaMA folder converts with `python -m checkpoints_convert llava`, a SAM "
              "checkpoint with `python -m checkpoints_convert sam`.")
    fused = any(k.startswith(f"{SAM_PREFIX}mask_decoder.compress_vit.") for k in keys)
    return "m2sa" if fused else "lisa"


def is_folder(path: str) -> bool:
    """A Hugging Face folder with a config and weights (not necessarily LISA/M²SA)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(os.path.isfile(os.path.join(path, f))
               for f in torch_io.INDEX_FILES + torch_io.SINGLE_FILES)


@dataclasses.dataclass(frozen=True)
class FolderInfo:
    """What a LISA/M²SA folder holds, read without loading its tensors."""

    folder: str
    config: M2SAConfig
    hf_config: dict
    tower: clip_tower.TowerSource | None     # None: the tower is in the folder's weights

    def tensors(self):
        """All tensors to convert: the folder's, then the tower's (renamed)."""
        own = torch_io.iter_checkpoint(self.folder)
        if self.tower is None:
            return own
        own = (kv for kv in own if not kv[0].startswith("model.vision_tower."))
        return itertools.chain(own, self.tower.iter_tensors(TOWER_PREFIX))

    def tower_meta(self, with_sha256: bool = True) -> dict:
        if self.tower is None:
            return {"origin": "checkpoint", "path": os.path.abspath(self.folder)}
        return self.tower.describe(with_sha256)


def read_folder(folder: str, *, vision_tower: str | None = None) -> FolderInfo:
    """Config, tokenizer check and CLIP tower of a LISA/M²SA folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{folder}: config.json is missing (the LLaMA/LLaVA "
                                f"architecture); copy it from the release next to the weights")
    with open(p) as f:
        hf = json.load(f)
    keys = torch_io.checkpoint_keys(folder)
    variant = check_layout(keys, folder)
    shapes = torch_io.checkpoint_shapes(folder, (SAM_PREFIX, "model.mm_projector.",
                                                 "model.vision_tower."))
    sam_config = infer_config(torch_io.shape_stand_ins(
        {k: s for k, s in shapes.items() if k.startswith(SAM_PREFIX)}), prefix=SAM_PREFIX)
    proj = shapes.get("model.mm_projector.weight", shapes.get("model.mm_projector.0.weight"))
    tower = clip_tower.find_tower(folder, hf, keys, vision_tower=vision_tower,
                                  projector_in=proj[1] if proj else None)
    if tower is not None:
        vision = tower.config
    elif "vision_config" in hf:
        vision = None                                   # llava_config_from_hf reads it
    else:
        vision = _vision_of_included_tower(folder, hf, shapes)
    tok_file = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"{folder}: tokenizer.model is missing; LISA/M²SA folders ship "
                                f"the SentencePiece model with the added [SEG] token")
    tokenizer = LegacyLlamaTokenizer.from_pretrained(folder, add_model_tokens=False)
    if "[SEG]" not in tokenizer.added_vocab:
        raise ConversionError(f"{folder}: the tokenizer has no added [SEG] token "
                              f"(added_tokens.json / tokenizer_config.json); this is not a "
                              f"LISA/M²SA tokenizer")
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    config = M2SAConfig(llava=llava.llava_config_from_hf(hf, vision=vision), sam=sam_config,
                        seg_token_id=int(seg), variant=variant)
    return FolderInfo(folder=folder, config=config, hf_config=hf, tower=tower)


def _vision_of_included_tower(folder, hf, shapes):
    """A folder saved with its tower but without a description of it: the named tower's own
    config.json when it is at hand, else the sizes read from the tensors."""
    named = hf.get("mm_vision_tower") or hf.get("vision_tower")
    if named:
        try:
            path, _ = clip_tower.resolve_folder(str(named), relative_to=folder)
            return clip_tower.read_tower(path, origin="config.json mm_vision_tower",
                                         spec=str(named)).config
        except (FileNotFoundError, ConversionError):
            pass
    return clip_tower.infer_vision_config(shapes, TOWER_PREFIX)


def with_scan(config: M2SAConfig, scan: bool) -> M2SAConfig:
    text = dataclasses.replace(config.llava.text, scan_layers=scan)
    return dataclasses.replace(config, llava=dataclasses.replace(config.llava, text=text))


def convert_folder(src: str, *, scan: bool = False, dtype=None, vision_tower: str | None = None,
                   place=None):
    """(params, FolderInfo) of a folder; ``place`` as in :func:`table.convert`."""
    info = read_folder(src, vision_tower=vision_tower)
    info = dataclasses.replace(info, config=with_scan(info.config, scan))
    params = convert(info.tensors(), m2sa_rules(info.config, scan),
                     abstract_params(info.config), dtype=dtype, name=src, place=place)
    return params, info


def converted_meta(info: FolderInfo, dtype_name: str | None, *, with_sha256: bool = True) -> dict:
    """``m2sa_meta.json`` of a converted folder: architecture, dtype, provenance."""
    return dict(info.config.to_meta(), dtype=dtype_name or "as stored",
                source_config=info.hf_config, source=os.path.abspath(info.folder),
                vision_tower=info.tower_meta(with_sha256))


def copy_tokenizer(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, name))


def convert_to_directory(src: str, dst: str, *, scan: bool = False, dtype: str | None = None,
                         vision_tower: str | None = None, overwrite: bool = False,
                         quantize: str | None = None, quantize_vision: bool = False) -> str:
    """Converts ``src`` into the directory ``dst`` (written atomically); with ``quantize``, the
    LLM's linear layers (and with ``quantize_vision`` the ViTs') are stored quantized."""
    spec = quantization.as_spec(quantize, vision=quantize_vision)
    params, info = convert_folder(src, scan=scan, dtype=dtypes.storage_dtype(dtype),
                                  vision_tower=vision_tower)
    with converted.atomic_directory(dst, overwrite=overwrite) as tmp:
        copy_tokenizer(src, tmp)
        if spec is None:
            converted.save_params(tmp, params, converted_meta(info, dtype))
        else:
            scales = dtypes.compute_dtype(dtype) if dtype else None
            quantized.save(tmp, quantization.quantize_params(params, spec, scale_dtype=scales),
                           converted_meta(info, dtype))
    return dst


def export_folder(src: str, dst: str, *, dtype: str | None = None,
                  max_shard_bytes: int = 5 * 2**30) -> str:
    """Converted directory → a Hugging Face folder in the LISA/M²SA layout (safetensors shards
    with an index, config.json, tokenizer files). The CLIP tower is written too, under
    ``model.vision_tower.vision_tower.vision_model.*``, so the folder is self-contained."""
    from safetensors.numpy import save_file

    meta = converted.load_meta(src)
    if meta.get("model") != "m2sa":
        raise ValueError(f"{src}: holds a {meta.get('model')!r} model, not LISA/M²SA")
    config = M2SAConfig.from_meta(meta)
    params = converted.load_params(src)
    os.makedirs(dst, exist_ok=True)
    shards, current, size = [], {}, 0
    for key, arr in export(params, m2sa_rules(config, meta["scan_layers"]),
                           dtype=dtypes.storage_dtype(dtype)):
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = arr
        size += arr.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(dst, name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.nbytes
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(dst, "config.json"), "w") as f:     # the tower is described too
        json.dump(dict(meta["source_config"], vision_config=meta["vision_config"]), f, indent=2)
    copy_tokenizer(src, dst)
    return dst

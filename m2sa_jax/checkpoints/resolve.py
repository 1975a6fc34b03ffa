"""One resolver for every entry point that takes a model: any source → config, parameters,
tokenizer.

A source is any of (tried in this order):

* a **converted directory** (``python -m checkpoints_convert m2sa``: ``m2sa_meta.json`` +
  ``params/``);
* a **training workdir** (``train.py``'s ``checkpoints/`` + ``model.json``): its latest finished
  step, or ``WORKDIR@STEP``; LoRA merged; the run's own tokenizer;
* a **LISA / M²SA PyTorch folder** (config.json, tokenizer, ``.bin``/``.safetensors`` weights),
  converted in memory tensor by tensor, with the CLIP tower from the folder, ``vision_tower``, or
  config.json's ``mm_vision_tower`` (:mod:`m2sa_jax.checkpoints.clip_tower`);
* a **Hugging Face id** present in the local cache (``org/name``): its snapshot folder, as a
  PyTorch folder. Nothing is ever downloaded.

dtypes at load: ``dtype`` is the language side's (LLaMA, CLIP, projector, [SEG] projector:
parameters and compute), ``sam_dtype`` SAM's (float32 unless asked). Source weights in float16 or
bfloat16 are accepted. Leaves are cast and placed on the device one at a time, so peak host
memory stays near the loaded tree's size.

``quantize`` (``"int8"`` / ``"int4"``, :mod:`m2sa_jax.quantization`): weight-only quantization of
the LLM's linear layers (and CLIP's / SAM's ViT with ``quantize_vision``), applied leaf by leaf
as the weights are read; a directory stored quantized (``checkpoints_convert m2sa --quantize``)
is read as stored, without float weights ever being materialised.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax import dtypes as dtype_table
from m2sa_jax import quantization
from m2sa_jax.checkpoints import clip_tower, converted, quantized, runs
from m2sa_jax.checkpoints import m2sa as m2sa_ckpt
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.models.m2sa import M2SAConfig, abstract_params
from m2sa_jax.tree import flatten, unflatten

KINDS = ("converted", "workdir", "pytorch", "hf_cache")
_STEP = re.compile(r"^(?P<path>.+)@(?P<step>\d+)$")


class ModelNotFoundError(FileNotFoundError):
    """A source that is none of the kinds the resolver takes; says why for each."""


@dataclasses.dataclass
class LoadedModel:
    config: M2SAConfig
    params: dict                 # device arrays (or host arrays with device=False)
    tokenizer: LegacyLlamaTokenizer
    tokenizer_folder: str
    kind: str                    # one of KINDS
    description: str             # e.g. "training workdir outputs/synthetic step 3300"
    meta: dict                   # provenance: source, step, tower, dtypes
    quantization: quantization.QuantSpec | None = None    # how ``params`` are quantized


def with_dtypes(config: M2SAConfig, dtype, sam_dtype) -> M2SAConfig:
    """The config computing the language side in ``dtype`` and SAM in ``sam_dtype``."""
    lv = config.llava
    text = dataclasses.replace(lv.text, dtype=dtype, param_dtype=dtype)
    vision = dataclasses.replace(lv.vision, dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(config, llava=dataclasses.replace(lv, text=text, vision=vision),
                               dtype=sam_dtype)


def leaf_dtype(path: str, dtype, sam_dtype):
    """Storage dtype of a parameter: SAM's leaves in ``sam_dtype``, the rest in ``dtype``."""
    return sam_dtype if path.startswith("sam/") else dtype


def _placer(dtype, sam_dtype, device: bool, spec=None):
    def place(path, arr):
        want = np.dtype(leaf_dtype(path, dtype, sam_dtype))
        if quantization.is_quantized_leaf(arr):          # stored quantized: scales only
            return arr.replace(array=arr.array.replace(scale=jnp.asarray(arr.array.scale, want)))
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
            arr = arr.astype(want, copy=False)
        if spec is not None:
            q = quantization.quantize_leaf(path, arr, spec, scale_dtype=want)
            if q is not arr:
                return q
        return jnp.asarray(arr) if device else np.ascontiguousarray(arr)
    return place


def _place_tree(tree: dict, place) -> dict:
    """Places leaf by leaf, dropping each host array as soon as it is placed."""
    flat = flatten(tree)
    del tree
    out = {}
    for path in list(flat):
        out[path] = place(path, flat.pop(path))
    return unflatten(out)


def split_step(source: str) -> tuple[str, int | None]:
    m = _STEP.match(source)
    if m and os.path.isdir(m["path"]) and not os.path.exists(source):
        return m["path"], int(m["step"])
    return source, None


def resolve(source: str, *, vision_tower: str | None = None, dtype: str = "float32",
            sam_dtype: str = "float32", save_converted: str | None = None,
            overwrite: bool = False, device: bool = True, quantize: str | None = None,
            quantize_vision: bool = False) -> LoadedModel:
    """The model at ``source`` (see the module doc). ``save_converted``: also write the
    converted directory there (PyTorch folders and Hugging Face ids; needs an empty or new
    folder unless ``overwrite``)."""
    source = os.fspath(source)
    dt, sdt = dtype_table.compute_dtype(dtype), dtype_table.compute_dtype(sam_dtype)
    spec = quantization.as_spec(quantize, vision=quantize_vision)
    place = _placer(dt, sdt, device, spec)
    path, step = split_step(source)
    reasons = {}
    if step is None:
        if converted.is_converted(path):
            return _from_converted(path, dt, sdt, device, spec, dtype, sam_dtype)
        reasons["converted"] = f"no {converted.META_FILE} with {converted.PARAMS_DIR}/"
    if runs.is_workdir(path):
        return _quantized(_from_workdir(path, step, dt, sdt, place, dtype, sam_dtype), spec)
    reasons["workdir"] = (f"no {runs.CHECKPOINTS_DIR}/ or {runs.MODEL_FILE}"
                          + ("" if step is None else f" (for @{step})"))
    if step is None:
        if m2sa_ckpt.is_folder(path):
            return _quantized(_from_folder(path, "pytorch", vision_tower, dt, sdt, place, dtype,
                                           sam_dtype, save_converted, overwrite), spec)
        reasons["pytorch"] = "no config.json with model weights (*.safetensors / *.bin)"
        if not os.path.exists(path) and clip_tower._HF_ID.match(path):
            try:
                folder = clip_tower._hf_cache_folder(path)
            except clip_tower.TowerNotFoundError as e:
                reasons["hf_cache"] = str(e)
            else:
                return _quantized(_from_folder(folder, "hf_cache", vision_tower, dt, sdt, place,
                                               dtype, sam_dtype, save_converted, overwrite,
                                               name=path), spec)
        else:
            reasons["hf_cache"] = ("a local path, not an org/name id" if os.path.exists(path)
                                   else "not of the form org/name")
    what = "does not exist" if not os.path.exists(path) else "is not a model this tool loads"
    raise ModelNotFoundError(
        f"{source}: {what}. Tried:\n" + "\n".join(f"  {k}: {v}" for k, v in reasons.items())
        + "\nGive a converted directory (python -m checkpoints_convert m2sa --src FOLDER --dst "
          "DIR), a LISA/M²SA Hugging Face folder, a training workdir (python train.py ... "
          "--workdir DIR; DIR@STEP for a given step), or a Hugging Face id in the local cache.")


def _quantized(model: LoadedModel, spec) -> LoadedModel:
    if spec is not None:
        model.quantization = spec
        model.meta["quantization"] = spec.to_meta()
        model.description += f", weights {spec.describe()}"
    return model


def _loaded(config, params, tokenizer, tok_folder, kind, description, meta, dt, sdt,
            dtype, sam_dtype):
    return LoadedModel(config=with_dtypes(config, dt, sdt), params=params, tokenizer=tokenizer,
                       tokenizer_folder=tok_folder, kind=kind, description=description,
                       meta=dict(meta, dtype=dtype, sam_dtype=sam_dtype))


def _from_converted(path, dt, sdt, device, spec, dtype, sam_dtype):
    meta = converted.load_meta(path)
    if meta.get("model") != "m2sa":
        raise ValueError(
            f"{path}: a converted {meta.get('model')!r} model, not LISA/M²SA. A LLaVA and a SAM "
            f"become an M²SA by training (configs/m2sa_7b.py: model.llava_checkpoint and "
            f"model.sam_checkpoint); a released LISA/M²SA folder converts with `python -m "
            f"checkpoints_convert m2sa`.")
    config = M2SAConfig.from_meta(meta)
    held = quantized.stored_spec(meta)
    spec = quantized.check_request(path, meta, spec) if held or spec else None
    if held is not None:         # read as stored: integer values and scales, no float copy
        params = quantized.from_stored(converted.load_params(path), held, source=path)
        params = _place_tree(params, _placer(dt, sdt, device))
    else:
        params = converted.load_params(path, abstract_params(config),
                                       dtypes=lambda p: leaf_dtype(p, dt, sdt))
        params = _place_tree(params, _placer(dt, sdt, device, spec))
    tokenizer = LegacyLlamaTokenizer.from_pretrained(path, add_model_tokens=False)
    return _quantized(_loaded(config, params, tokenizer, path, "converted", f"converted {path}",
                              {"source": os.path.abspath(path),
                               "vision_tower": meta.get("vision_tower"),
                               "source_config": meta.get("source_config") or {}},
                              dt, sdt, dtype, sam_dtype), spec)


def _from_workdir(path, step, dt, sdt, place, dtype, sam_dtype):
    config, params, tokenizer, step = runs.restore_model(path, step)
    params = _place_tree(params, place)
    tok_folder = os.path.join(path, runs.TOKENIZER_DIR)
    source_config = runs.read_description(path).get("source_config") or {}
    return _loaded(config, params, tokenizer, tok_folder, "workdir",
                   f"training workdir {path} step {step}",
                   {"source": os.path.abspath(path), "step": step, "source_config": source_config},
                   dt, sdt, dtype, sam_dtype)


def _from_folder(folder, kind, vision_tower, dt, sdt, place, dtype, sam_dtype, save_converted,
                 overwrite, name=None):
    name = name or folder
    if save_converted:   # fail before the long part, not after it
        with converted.atomic_directory(save_converted, overwrite=overwrite,
                                        flag="--overwrite (overwrite=True)"):
            pass
    params, info = m2sa_ckpt.convert_folder(folder, vision_tower=vision_tower, place=place)
    tokenizer = LegacyLlamaTokenizer.from_pretrained(folder, add_model_tokens=False)
    meta = {"source": name, "vision_tower": info.tower_meta(with_sha256=False),
            "source_config": info.hf_config}
    if save_converted:
        meta = m2sa_ckpt.converted_meta(info, dtype if dtype == sam_dtype
                                        else f"{dtype} (SAM {sam_dtype})")
        with converted.atomic_directory(save_converted, overwrite=overwrite) as tmp:
            m2sa_ckpt.copy_tokenizer(folder, tmp)
            if quantization.spec_of(params) is not None:
                quantized.save(tmp, jax.device_get(params), meta)
            else:
                converted.save_params(tmp, jax.device_get(params), meta)
    what = "Hugging Face cache" if kind == "hf_cache" else "PyTorch folder"
    return _loaded(info.config, params, tokenizer, folder, kind, f"{what} {name}", meta,
                   dt, sdt, dtype, sam_dtype)


def describe_kinds() -> str:
    return ("a converted directory, a LISA/M²SA PyTorch folder, a training workdir "
            "(DIR or DIR@STEP) or a Hugging Face id in the local cache")


"""LLaMA / Vicuna and LLaVA checkpoints (Hugging Face folders) → m2sa-jax parameters, and back.

Layouts are recognised from the keys present (:func:`detect_layout`):

* ``llama``: ``LlamaForCausalLM`` (``model.layers.N.*``, ``model.norm``, ``lm_head``);
* ``llava_v1``: LLaVA v1 / LISA, the LLaMA keys plus ``model.vision_tower.vision_tower.vision_model.*``
  (a CLIPVisionModel) and ``model.mm_projector.*``;
* ``llava_hf``: ``LlavaForConditionalGeneration`` in its in-memory names
  (``model.language_model.*``, ``model.vision_tower[.vision_model].*``,
  ``model.multi_modal_projector.linear_{1,2}``, ``lm_head``);
* ``llava_hf_old``: the names llava-hf checkpoints are stored under (and transformers 5 still
  saves): ``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower[.vision_model].*``, ``multi_modal_projector.*``.

The rule builders (:func:`llama_rules`, :func:`clip_rules`, :func:`projector_rules`) are reused by
the M²SA converter. Tensors stream shard by shard; the output leaves live in memory-mapped files
under ``DST/.convert_tmp`` while they are filled, so resident memory stays near one shard even
when the converted tree is larger than RAM (13B in bfloat16 is 26 GB).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from checkpoints_convert import io as ckpt_io
from checkpoints_convert.table import ConversionError, Rule, convert, export, skip

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
        return self.vision is not None


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
            + clip_rules(layout.vision)
            + projector_rules(layout.projector, config.projector_type))


def checkpoint_keys(folder: str) -> list[str]:
    """Tensor names of a folder without loading tensors (index, safetensors header, or mmap)."""
    for index in ckpt_io.INDEX_FILES:
        p = os.path.join(folder, index)
        if os.path.isfile(p):
            with open(p) as f:
                return list(json.load(f)["weight_map"])
    (path,) = ckpt_io.checkpoint_files(folder)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(ckpt_io._load_pickle(path).keys())


def read_config(folder: str):
    """(layout, model config) of a Hugging Face folder."""
    from m2sa_jax.models import llama, llava

    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{folder}: no config.json (the model architecture); copy it "
                                f"from the checkpoint's release next to the weights")
    with open(p) as f:
        cfg = json.load(f)
    keys = checkpoint_keys(folder)
    layout = detect_layout(keys, folder)
    if not layout.is_llava:
        return layout, llama.LlamaConfig.from_hf(cfg)
    config = llava.llava_config_from_hf(cfg)
    if layout.name == "llava_v1" and config.projector_type == "linear":
        if any(k.startswith("model.mm_projector.2.") for k in keys):
            raise ConversionError(f"{p}: mm_projector_type is 'linear' but the weights hold a "
                                  f"two-layer projector; set \"mm_projector_type\": \"mlp2x_gelu\"")
    return layout, config


def target_shapes(layout: Layout, config, scan: bool):
    from m2sa_jax.models import llama, llava

    if not layout.is_llava:
        return llama.param_shapes(dataclasses.replace(config, scan_layers=scan))
    text = dataclasses.replace(config.text, scan_layers=scan)
    return llava.param_shapes(dataclasses.replace(config, text=text))


class _MemmapAllocator:
    """Output leaves as memory-mapped files, so the converted tree need not fit in RAM."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def __call__(self, path: str, shape, dtype):
        # raw files (no .npy header): the .npy format cannot describe bfloat16
        fname = os.path.join(self.folder, path.replace("/", "__") + ".raw")
        return np.memmap(fname, mode="w+", dtype=dtype, shape=tuple(shape))


def convert_folder(src: str, *, scan: bool = False, dtype=None, workdir: str | None = None):
    """Converts a folder. Returns (params, layout, config). With ``workdir``, leaves are
    memory-mapped ``.npy`` files there (call :func:`release` when done)."""
    layout, config = read_config(src)
    shapes = target_shapes(layout, config, scan)
    rules = layout_rules(layout, config, scan)
    allocate = _MemmapAllocator(workdir) if workdir else None
    params = convert(ckpt_io.iter_checkpoint(src), rules, shapes, dtype=dtype, name=src,
                     allocate=allocate)
    return params, layout, config


def _config_meta(layout: Layout, config, scan, dtype) -> dict:
    if not layout.is_llava:
        return dict(model="llama", layout=layout.name, scan_layers=scan, dtype=dtype or "as stored",
                    text_config=config.to_hf())
    return dict(model="llava", layout=layout.name, scan_layers=scan, dtype=dtype or "as stored",
                text_config=config.text.to_hf(), vision_config=config.vision.to_hf(),
                projector_type=config.projector_type, image_token_index=config.image_token_index,
                vision_feature_layer=config.vision_feature_layer)


def run(src: str, dst: str, *, scan: bool = False, dtype: str | None = None) -> str:
    """Converts ``src`` into ``dst`` (orbax params + m2sa_meta.json + tokenizer files)."""
    import ml_dtypes

    np_dtype = {None: None, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                "float16": np.float16}[dtype]
    os.makedirs(dst, exist_ok=True)
    work = os.path.join(dst, ".convert_tmp")
    try:
        params, layout, config = convert_folder(src, scan=scan, dtype=np_dtype, workdir=work)
        for leaf in _leaves(params):
            if isinstance(leaf, np.memmap):
                leaf.flush()
        params = _reopen_readonly(params)
        save_streaming(dst, params, _config_meta(layout, config, scan, dtype))
        del params
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, name))
    return dst


def save_streaming(dst: str, params, meta) -> None:
    """Writes the same orbax checkpoint as ``params_io.save_params``, one array at a time.

    orbax's default numpy handler deep-copies every host array and writes them all
    concurrently, so saving needs about twice the tree in anonymous memory (52 GB for 13B in
    bfloat16). Here the arrays (memory-mapped files) are neither copied nor written
    concurrently: resident memory stays near one array.
    """
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    from m2sa_jax.params_io import META_FILE, PARAMS_DIR

    class _SequentialNumpyHandler(th.NumpyHandler):
        async def _background_serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            for value, info, arg in zip(values, infos, args):
                await super()._background_serialize([value], [info], [arg])

    registry = th.create_type_handler_registry(
        (np.ndarray, _SequentialNumpyHandler(deepcopy_host_arrays=False)),
        (np.number, th.ScalarHandler()), (int, th.ScalarHandler()),
        (float, th.ScalarHandler()), (jax.Array, th.ArrayHandler()))
    dst = os.path.abspath(dst)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    checkpointer.save(os.path.join(dst, PARAMS_DIR), params, force=True)
    with open(os.path.join(dst, META_FILE), "w") as f:
        json.dump(dict(meta), f, indent=2, sort_keys=True)


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def _reopen_readonly(tree):
    """Drops the writable mappings (their pages leave the process) and maps the files again
    read-only; pages are then only resident while orbax streams them out."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _reopen_readonly(v)
        elif isinstance(v, np.memmap) and v.filename:
            fname, dtype, shape = v.filename, v.dtype, v.shape
            del v
            out[k] = np.memmap(fname, mode="r", dtype=dtype, shape=shape)
        else:
            out[k] = v
    return out


def export_params(params, layout: Layout, config, scan: bool, dtype=None):
    """Our tree → ``(hf_key, array)`` pairs in the given layout's names."""
    return export(params, layout_rules(layout, config, scan), dtype=dtype)


def _main(args) -> int:
    dst = run(args.src, args.dst, scan=args.scan, dtype=args.dtype)
    print(f"converted {args.src} → {dst}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "llava", help="LLaMA/Vicuna or LLaVA (v1/LISA or llava-hf) Hugging Face folder",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="Hugging Face folder (config.json + weights)")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast floating-point weights (default: keep the checkpoint's dtype)")
    p.add_argument("--scan", action="store_true",
                   help="stack decoder layers for nn.scan (LlamaConfig.scan_layers=True)")
    p.set_defaults(func=_main)

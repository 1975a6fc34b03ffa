"""Weight-only int8 / int4 quantization of M²SA's linear layers, run through qwix.

Schemes (weights only; activations, the KV cache and every sum stay in the compute dtype):

* ``"int8"``: one scale per output channel (per column of a Dense kernel ``[in, out]``).
* ``"int4"``: one scale per group of ``group_size`` (default 128) input rows of each output
  channel — sub-channel scales, as GPTQ/AWQ-style int4 checkpoints use, because one scale over a
  whole 4096-row column is too coarse at 4 bits.

Which layers (``parts``): ``"llm"`` — the LLaMA decoder's q/k/v/o and gate/up/down projections
and ``lm_head`` — always; ``"clip"`` and ``"sam_vit"`` — the CLIP tower's and SAM image
encoder's attention and MLP projections — with ``vision=True``. Embeddings, norms, biases,
``mm_projector``, ``text_hidden_fcs``, SAM's convolutions, prompt encoder and mask decoder (with
``compress_vit``) stay float: they are small, or (the mask decoder) they decide mask edges.

How it runs. ``qwix.quantize_model(module, qwix.PtqProvider(rules))`` intercepts the
``dot_general`` of every Dense whose module path matches the rules (:func:`quantize_model`);
the parameter tree then holds qwix's PTQ leaf, ``WithAux(QArray(qvalue, scale))``, at those
kernels and plain float arrays everywhere else. Inside a matched Dense, qwix dequantizes the
kernel (``qvalue * scale``, in the scale's dtype) and runs the float matmul, which XLA fuses on
accelerators; the module is otherwise unchanged, so jit, static shapes and the KV-cache decoding
loop work as for float weights. The rules are regular expressions on module paths that match
whether the root is ``LlamaForCausalLM``, ``Llava`` or ``M2SA`` (``layers_3/mlp/up_proj``,
``llava/language_model/layers_3/mlp/up_proj`` …), unrolled or scanned (``layers/layer/…``).

Quantizing a tree (:func:`quantize_params`) uses ``qwix.quantize`` on each matched kernel.
(qwix's own ``quantize_params`` is not used: on ``nn.scan``-stacked kernels ``[L, in, out]`` it
applies the per-layer axes to the stacked array and yields scales ``[1, in, 1]`` instead of
``[L, 1, out]``, and the scanned forward then fails with "scan got `length` argument of L which
disagrees with leading axis sizes [..., 1, ...]". Here stacked axes are channelwise.)

Stored form (:mod:`m2sa_jax.checkpoints.quantized`: ``save`` / ``restore``): a converted directory (``params/`` orbax tree +
``m2sa_meta.json``) whose quantized kernels are ``{"qvalue": int8|int4, "scale": float}``
sub-trees and whose metadata has ``"quantization": {"scheme", "parts", "group_size"}``.
Restoring it reads the integer values and scales as stored: no float copy of those weights is
ever made.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
# The PTQ parameter leaf and its static "how" record (pinned qwix 0.1.8; not re-exported).
from qwix._src.core.qarray import HowToQuantize, QArray
from qwix._src.providers.ptq import WithAux

from m2sa_jax.tree import flatten, unflatten

META_KEY = "quantization"
FORMAT_VERSION = 1
DEFAULT_GROUP_SIZE = 128

SCHEMES = {
    "int8": dict(qtype="int8", grouped=False,
                 doc="int8, one scale per output channel"),
    "int4": dict(qtype="int4", grouped=True,
                 doc="int4, one scale per group of input rows per output channel"),
}

# Module paths (relative to a LlamaForCausalLM, Llava or M2SA root) of the quantized Dense layers.
_LLM_ROOT = r"(?:llava/)?(?:language_model/)?"
PART_PATTERNS = {
    "llm": (
        _LLM_ROOT + r"(?:layers_\d+|layers/layer)/"
                    r"(?:self_attn/[qkvo]_proj|mlp/(?:gate|up|down)_proj)",
        _LLM_ROOT + r"lm_head",
    ),
    "clip": (r"(?:llava/)?vision_tower/layers_\d+/(?:self_attn/(?:[qkv]|out)_proj|fc[12])",),
    "sam_vit": (r"(?:sam/)?image_encoder/blocks_\d+/(?:attn/(?:qkv|proj)|lin[12])",),
}
VISION_PARTS = ("clip", "sam_vit")


def _scheme_error(scheme) -> ValueError:
    known = ", ".join(f"{k!r} ({v['doc']})" for k, v in SCHEMES.items())
    return ValueError(f"quantize={scheme!r} is not a quantization scheme; use one of {known}")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What a quantized tree holds: the scheme, the parts, and (int4) the group size."""

    scheme: str
    parts: tuple[str, ...] = ("llm",)
    group_size: int | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise _scheme_error(self.scheme)
        parts = tuple(p for p in PART_PATTERNS if p in self.parts)  # canonical order
        unknown = sorted(set(self.parts) - set(PART_PATTERNS))
        if unknown or "llm" not in parts:
            raise ValueError(f"quantization parts {list(self.parts)}: expected 'llm' plus "
                             f"optionally {list(VISION_PARTS)}")
        object.__setattr__(self, "parts", parts)
        if SCHEMES[self.scheme]["grouped"]:
            g = DEFAULT_GROUP_SIZE if self.group_size is None else int(self.group_size)
            if g < 1:
                raise ValueError(f"int4 group_size {g}: must be a positive number of input rows")
            object.__setattr__(self, "group_size", g)
        elif self.group_size is not None:
            raise ValueError(f"{self.scheme} has one scale per output channel; group_size "
                             f"{self.group_size} applies to int4 only")

    @property
    def qtype(self) -> str:
        return SCHEMES[self.scheme]["qtype"]

    @property
    def pattern(self) -> str:
        """One regular expression (``re.fullmatch``) for the module paths to quantize."""
        return "|".join(f"(?:{p})" for part in self.parts for p in PART_PATTERNS[part])

    def describe(self) -> str:
        group = f", groups of {self.group_size} input rows" if self.group_size else ""
        return f"{self.scheme} ({'+'.join(self.parts)}{group})"

    def rules(self) -> list[qwix.QuantizationRule]:
        """The qwix rules: weight-only, this scheme, on the matched module paths."""
        return [qwix.QuantizationRule(module_path=self.pattern, weight_qtype=self.qtype,
                                      tile_size=self.group_size)]

    def to_meta(self) -> dict:
        return dict(scheme=self.scheme, parts=list(self.parts), group_size=self.group_size,
                    format_version=FORMAT_VERSION)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "QuantSpec":
        version = meta.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"quantization format version {version} (this code reads "
                             f"{FORMAT_VERSION}); re-quantize from the float checkpoint")
        return cls(meta["scheme"], tuple(meta["parts"]), meta.get("group_size"))


def as_spec(quantize, *, vision: bool = False, group_size: int | None = None
            ) -> QuantSpec | None:
    """``None`` | ``"int8"`` | ``"int4"`` | a :class:`QuantSpec` → a QuantSpec (or None).
    ``vision``: also CLIP's and SAM's ViT linear layers."""
    if quantize is None or isinstance(quantize, QuantSpec):
        return quantize
    if not isinstance(quantize, str) or quantize not in SCHEMES:
        raise _scheme_error(quantize)
    parts = ("llm",) + (VISION_PARTS if vision else ())
    return QuantSpec(quantize, parts, group_size)


# --- trees --------------------------------------------------------------------------------

def is_quantized_leaf(x) -> bool:
    return isinstance(x, WithAux)


def _module_path(param_path: str) -> str:
    return param_path.rsplit("/", 1)[0] if "/" in param_path else ""


def target_paths(flat: Mapping[str, Any], spec: QuantSpec) -> list[str]:
    rx = re.compile(spec.pattern)
    return [p for p in flat if p.endswith("/kernel") and rx.fullmatch(_module_path(p))]


def _part_of(module_path: str) -> str | None:
    for part, patterns in PART_PATTERNS.items():
        if any(re.fullmatch(p, module_path) for p in patterns):
            return part
    return None


def group_size_for(spec: QuantSpec, in_features: int, path: str) -> int | None:
    if spec.group_size is None:
        return None
    if in_features % spec.group_size:
        raise ValueError(
            f"{path}: {in_features} input rows are not a multiple of the int4 group size "
            f"{spec.group_size}; pass a group_size that divides every quantized layer's input "
            f"width (e.g. {np.gcd(in_features, spec.group_size)})")
    return spec.group_size


def how_to_quantize(spec: QuantSpec, group: int | None) -> HowToQuantize:
    """What qwix's PTQ init records for a Dense kernel ``[in, out]``: contracting axis 0,
    channelwise axis 1, axis 0 tiled into groups for int4."""
    return HowToQuantize(qtype=spec.qtype, channelwise_axes=[1],
                         tiled_axes={0: group} if group else {}, calibration_method="absmax")


@functools.partial(jax.jit, static_argnames=("qtype", "group", "scale_dtype"))
def _quantize_kernel(kernel, *, qtype: str, group: int | None, scale_dtype) -> QArray:
    """Kernel ``[*stacked, in, out]`` → QArray; stacked (``nn.scan``) axes are channelwise."""
    lead = kernel.ndim - 2
    return qwix.quantize(kernel, qtype, channelwise_axes=tuple(range(lead)) + (lead + 1,),
                         tiled_axes={lead: group} if group else None,
                         calibration_method="absmax", scale_dtype=scale_dtype)


def spec_of(params) -> QuantSpec | None:
    """The :class:`QuantSpec` a tree holds, or None for a float tree."""
    flat = flatten(params)
    quantized = {p: v for p, v in flat.items() if is_quantized_leaf(v)}
    if not quantized:
        return None
    qtypes = {str(np.dtype(v.array.qtype)) for v in quantized.values()}
    groups = {v.how.tiled_axes.get(0) for v in quantized.values()}
    parts = {_part_of(_module_path(p)) for p in quantized}
    if len(qtypes) > 1 or len(groups) > 1 or None in parts:
        raise ValueError(f"the parameter tree mixes quantization schemes (value types "
                         f"{sorted(qtypes)}, groups {sorted(map(str, groups))}) or quantizes "
                         f"layers outside {list(PART_PATTERNS)}; it was not written by "
                         f"m2sa_jax.quantization")
    scheme = {v["qtype"]: k for k, v in SCHEMES.items()}[qtypes.pop()]
    return QuantSpec(scheme, tuple(parts), groups.pop())


def quantize_params(params, quantize, *, vision: bool = False, group_size: int | None = None,
                    scale_dtype=None):
    """A float parameter tree → the same tree with the spec's Dense kernels quantized.

    Works on an M²SA, LLaVA or LLaMA tree (or their ``jax.ShapeDtypeStruct`` trees: the
    result is then abstract too). ``scale_dtype``: dtype of the scales and so of the
    dequantized weights (default: each kernel's own dtype; give the compute dtype when the
    kernels are float32 but the model computes in bfloat16).

    A tree already quantized the same way is returned unchanged (with a warning saying so); one
    quantized another way is refused — quantizing dequantized weights again would compound the
    rounding, so quantize the float weights instead.
    """
    spec = as_spec(quantize, vision=vision, group_size=group_size)
    if spec is None:
        return params
    held = spec_of(params)
    if held is not None:
        if held == spec:
            warnings.warn(f"the parameters are already quantized as {held.describe()}; "
                          f"nothing to do", stacklevel=2)
            return params
        raise ValueError(
            f"the parameters are already quantized as {held.describe()}; cannot quantize them "
            f"as {spec.describe()} (re-quantizing rounded weights compounds the error). Start "
            f"from the float checkpoint instead, or use the tree as it is.")
    flat = flatten(params)
    targets = target_paths(flat, spec)
    missing = [p for p in spec.parts
               if not any(_part_of(_module_path(t)) == p for t in targets)]
    if missing:
        examples = {p: PART_PATTERNS[p][0] for p in missing}
        raise ValueError(f"no linear layers of {missing} in this parameter tree (module paths "
                         f"matching {examples}); quantize an M²SA, LLaVA or LLaMA tree")
    out = dict(flat)
    for path in targets:
        kernel = flat[path]
        group = group_size_for(spec, kernel.shape[-2], path)
        sd = jnp.dtype(scale_dtype or kernel.dtype)
        if isinstance(kernel, jax.ShapeDtypeStruct):
            q = jax.eval_shape(functools.partial(_quantize_kernel, qtype=spec.qtype,
                                                 group=group, scale_dtype=sd), kernel)
        else:
            q = _quantize_kernel(jnp.asarray(kernel), qtype=spec.qtype, group=group,
                                 scale_dtype=sd)
        out[path] = WithAux(q, how_to_quantize(spec, group))
    return unflatten(out)


def abstract_quantized(abstract_params, quantize, **kwargs):
    """The quantized tree's shapes and dtypes from the float tree's (nothing allocated)."""
    return quantize_params(abstract_params, quantize, **kwargs)


def cast_floats(params, dtype):
    """Float leaves and the quantized leaves' scales cast to ``dtype`` (the compute dtype: the
    scales' dtype is the dequantized weights' dtype); integer values untouched."""
    def cast(x):
        if is_quantized_leaf(x):
            return x.replace(array=x.array.replace(scale=jnp.asarray(x.array.scale, dtype)))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jnp.asarray(x, dtype)

    return jax.tree.map(cast, params, is_leaf=is_quantized_leaf)


def dequantize_params(params):
    """Float tree back from a quantized one (the weights the quantized model computes with)."""
    return jax.tree.map(lambda x: qwix.dequantize(x.array) if is_quantized_leaf(x) else x,
                        params, is_leaf=is_quantized_leaf)


def weight_bytes(params) -> dict:
    """Bytes of a (possibly abstract) tree: quantized values (int4 counted at ½ byte), their
    scales, and float leaves."""
    out = dict(quantized=0, scales=0, float=0)

    def nbytes(x):
        bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else \
            jnp.finfo(x.dtype).bits
        return int(np.prod(x.shape, dtype=np.int64)) * bits // 8

    for leaf in jax.tree.leaves(params, is_leaf=is_quantized_leaf):
        if is_quantized_leaf(leaf):
            out["quantized"] += nbytes(leaf.array.qvalue)
            out["scales"] += nbytes(leaf.array.scale)
        else:
            out["float"] += nbytes(leaf)
    out["total"] = out["quantized"] + out["scales"] + out["float"]
    return out


# --- models -------------------------------------------------------------------------------

def _public_methods(cls) -> list[str]:
    names = {"__call__"}
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        names |= {n for n, v in vars(klass).items()
                  if callable(v) and not n.startswith("_") and n != "setup"}
    return sorted(names)


def quantize_model(model: nn.Module, quantize, *, vision: bool = False) -> nn.Module:
    """The module with qwix's PTQ interception on its public methods (``__call__``,
    ``encode_images``, ``masks_from_hidden`` …): run it with the tree from
    :func:`quantize_params`. ``quantize=None`` returns the module unchanged."""
    spec = as_spec(quantize, vision=vision)
    if spec is None:
        return model
    return qwix.quantize_model(model, qwix.PtqProvider(spec.rules()),
                               methods=_public_methods(type(model)))

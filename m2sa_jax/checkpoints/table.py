"""Checkpoint conversion as a table of key mappings, usable in both directions.

A :class:`Rule` pairs a source-key template (PyTorch state-dict name) with a target-path
template (our parameter tree, ``/``-joined) and a named transform. Templates use ``{name}``
placeholders that stand for integers (layer indexes). A rule may *stack* one placeholder:
the target then has a leading axis indexed by it (``nn.scan`` layer layouts).

:func:`convert` streams ``(key, array)`` pairs into a parameter tree whose shapes are given
up front (from ``jax.eval_shape``). Every source key must be consumed by a rule or
explicitly skipped, every target leaf must be filled exactly once, and every shape is
asserted; otherwise a :class:`ConversionError` lists what is wrong.

:func:`export` runs the same table backwards (our tree → PyTorch names and layouts).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from m2sa_jax.tree import flatten, unflatten


class ConversionError(ValueError):
    """A checkpoint does not match the mapping table."""


# --- layout transforms: (forward: torch → ours, inverse: ours → torch) --------------------

def _linear(w):  # torch Linear [out, in] → flax Dense kernel [in, out]
    return np.transpose(w)


def _conv2d(w):  # torch Conv2d [O, I, kh, kw] → flax Conv kernel [kh, kw, I, O]
    return np.transpose(w, (2, 3, 1, 0))


def _conv2d_inv(w):
    return np.transpose(w, (3, 2, 0, 1))


def _conv_transpose2d(w):
    # torch ConvTranspose2d weight [I, O, kh, kw]. flax ConvTranspose (transpose_kernel=False)
    # computes a fractionally strided *correlation*, torch a true transposed convolution,
    # so the spatial axes are flipped: kernel [kh, kw, I, O] = w[:, :, ::-1, ::-1]. SAM's
    # upscaling (models.sam.Upscale2x, an einsum) keeps this flax layout, so converted
    # checkpoints written before it still load.
    return np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1))[::-1, ::-1])


def _conv_transpose2d_inv(w):
    return np.ascontiguousarray(np.transpose(w[::-1, ::-1], (2, 3, 0, 1)))


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda x: x, lambda x: x),
    "linear": (_linear, _linear),
    "conv2d": (_conv2d, _conv2d_inv),
    "conv_transpose2d": (_conv_transpose2d, _conv_transpose2d_inv),
}


def _is_float(arr) -> bool:
    return np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _template_regex(template: str, sep: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


@dataclasses.dataclass(frozen=True)
class Rule:
    """``source`` → ``target`` with a named transform.

    ``target=None`` marks source keys that are deliberately not converted (e.g. buffers
    that are recomputed). ``stack`` names a placeholder of ``source`` that becomes the
    leading axis of the target instead of part of its path.
    """

    source: str
    target: str | None
    transform: str = "identity"
    stack: str | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")
        object.__setattr__(self, "_src_re", _template_regex(self.source, "."))
        if self.target is not None:
            object.__setattr__(self, "_tgt_re", _template_regex(self.target, "/"))

    def match_source(self, key: str):
        m = self._src_re.fullmatch(key)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}

    def match_target(self, path: str):
        if self.target is None:
            return None
        m = self._tgt_re.fullmatch(path)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}


def skip(source: str) -> Rule:
    return Rule(source, None)


def _fmt(n: int, items: Iterable[str]) -> str:
    items = sorted(items)
    shown = "\n  ".join(items[:n])
    more = f"\n  ... and {len(items) - n} more" if len(items) > n else ""
    return f"\n  {shown}{more}"


def convert(
    source: Iterable[tuple[str, np.ndarray]],
    rules: Iterable[Rule],
    target_shapes: Mapping,
    *,
    dtype=None,
    name: str = "checkpoint",
    allocate: Callable[[str, tuple, np.dtype], np.ndarray] | None = None,
    place: Callable[[str, np.ndarray], object] | None = None,
) -> dict:
    """Converts a stream of source tensors into a nested parameter dict.

    Args:
      source: ``(key, array)`` pairs, e.g. streamed shard by shard.
      rules: the mapping table; the first rule whose source template matches wins.
      target_shapes: nested dict whose leaves have ``.shape`` (``jax.eval_shape`` output).
      dtype: optional output dtype for floating-point leaves (e.g. ``ml_dtypes.bfloat16``).
      name: what to call the source in error messages (a file or folder path).
      allocate: optional ``(path, shape, dtype) → array`` that provides each output buffer
        (e.g. a memory-mapped file, for trees larger than RAM); default: in-memory arrays.
      place: optional ``(path, array) → leaf`` called once per target as soon as it is complete
        (stacked targets: when their last slice arrives); what it returns is kept instead of
        the host array, e.g. a device array, so the host copy can be freed right away.
    """
    rules = list(rules)
    shapes = {p: tuple(s.shape) for p, s in flatten(target_shapes).items()}
    out: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {}  # stacked target → indexes filled
    unmatched, skipped, errors = [], [], []

    for key, value in source:
        for rule in rules:
            groups = rule.match_source(key)
            if groups is not None:
                break
        else:
            unmatched.append(key)
            continue
        if rule.target is None:
            skipped.append(key)
            continue
        index = groups.pop(rule.stack) if rule.stack else None
        path = rule.target.format(**groups)
        if path not in shapes:
            errors.append(f"{key} → {path}: no such target parameter")
            continue
        arr = TRANSFORMS[rule.transform][0](np.asarray(value))
        if dtype is not None and _is_float(arr):
            arr = arr.astype(dtype)
        want = shapes[path]
        if rule.stack:
            if tuple(arr.shape) != want[1:] or not 0 <= index < want[0]:
                errors.append(
                    f"{key} → {path}[{index}]: shape {tuple(arr.shape)}, expected {want[1:]} "
                    f"(stack of {want[0]})")
                continue
            if path not in out:
                out[path] = (np.empty(want, dtype=arr.dtype) if allocate is None
                             else allocate(path, want, arr.dtype))
                filled[path] = set()
            if index in filled[path]:
                errors.append(f"{key} → {path}[{index}]: filled twice")
            out[path][index] = arr
            filled[path].add(index)
            if place is not None and len(filled[path]) == want[0]:
                out[path] = place(path, out[path])
        else:
            if tuple(arr.shape) != want:
                errors.append(f"{key} → {path}: shape {tuple(arr.shape)}, expected {want}")
                continue
            if path in out:
                errors.append(f"{key} → {path}: filled twice")
            if allocate is None:
                out[path] = np.ascontiguousarray(arr)
            else:
                out[path] = allocate(path, want, arr.dtype)
                out[path][...] = arr
            if place is not None:
                out[path] = place(path, out[path])
            del arr

    missing = [p for p in shapes if p not in out]
    missing += [f"{p}[{i}]" for p, idx in filled.items()
                for i in range(shapes[p][0]) if i not in idx]
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} source keys match no rule:{_fmt(20, unmatched)}")
    if errors:
        problems.append(f"{len(errors)} keys do not fit:{_fmt(20, errors)}")
    if missing:
        problems.append(f"{len(missing)} target parameters were not filled:{_fmt(20, missing)}")
    if problems:
        raise ConversionError(f"{name}: " + "\n".join(problems))
    return unflatten(out)


def export(params: Mapping, rules: Iterable[Rule], *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """The table backwards: yields ``(torch_key, array)`` for every leaf of ``params``.

    Every leaf must be claimed by exactly one rule; stacked leaves are split along axis 0.
    """
    rules = [r for r in rules if r.target is not None]
    unclaimed = []
    for path, value in flatten(params).items():
        for rule in rules:
            groups = rule.match_target(path)
            if groups is not None:
                break
        else:
            unclaimed.append(path)
            continue
        arr = np.asarray(value)
        inv = TRANSFORMS[rule.transform][1]
        pieces = enumerate(arr) if rule.stack else [(None, arr)]
        for index, piece in pieces:
            g = dict(groups)
            if rule.stack:
                g[rule.stack] = index
            out = np.ascontiguousarray(inv(piece))
            if dtype is not None and _is_float(out):
                out = out.astype(dtype)
            yield rule.source.format(**g), out
    if unclaimed:
        raise ConversionError(f"{len(unclaimed)} parameters have no rule to export them:"
                              f"{_fmt(20, unclaimed)}")

"""Where a LLaVA / LISA / M²SA folder's CLIP vision tower comes from.

Released LISA and M²SA folders carry no CLIP weights: the public merge script saves
``{k: v for k, v in state_dict.items() if "vision_tower" not in k}`` and the public code builds
the tower at run time with ``CLIPVisionModel.from_pretrained(config.mm_vision_tower)``. LLaVA v1
folders are saved the same way. :func:`find_tower` looks, in this order, at

1. the checkpoint itself (tower keys present: nothing to find);
2. an explicit ``vision_tower`` (a folder, or a Hugging Face id), e.g. ``--vision-tower``;
3. ``config.json``'s ``mm_vision_tower`` (or ``vision_tower``): a local folder, absolute or
   relative to the checkpoint folder, or a Hugging Face id found **offline** in the local
   Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME`` / the default cache folder).

A tower folder holds a ``CLIPVisionModel`` or a whole ``CLIPModel`` (``config.json`` plus
``model.safetensors`` / ``pytorch_model.bin``, sharded or not); its keys may or may not start
with ``vision_model.``. Its architecture comes from its own ``config.json`` (read by
transformers' ``CLIPVisionConfig``), never from a table of names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Iterator

import numpy as np

from m2sa_jax.checkpoints import torch_io
from m2sa_jax.checkpoints.table import ConversionError
from m2sa_jax.models.clip import CLIPVisionConfig

# Where a LLaVA v1 / LISA / M²SA checkpoint keeps the tower in memory (and a folder saved with
# the tower does on disk): the converters' tables read tower keys under this prefix.
LISA_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
# Keys of a whole CLIPModel that are not the vision tower (openai/clip-vit-large-patch14 holds
# both towers; CLIPVisionModel.from_pretrained takes the vision half).
_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class TowerNotFoundError(FileNotFoundError):
    """No CLIP vision tower where a checkpoint folder needs one."""


@dataclasses.dataclass(frozen=True)
class TowerSource:
    """A CLIP vision tower found outside the checkpoint folder."""

    origin: str            # "argument" or "config.json mm_vision_tower"
    spec: str              # what was given: a path or a Hugging Face id
    path: str              # the resolved folder
    files: tuple           # its weight files
    prefix: str            # "vision_model." or "" (the key prefix of the tower's tensors)
    config: CLIPVisionConfig

    def iter_tensors(self, target_prefix: str = LISA_TOWER_PREFIX) -> Iterator[tuple[str, np.ndarray]]:
        """The tower's tensors renamed under ``target_prefix``; a CLIPModel's text half is
        passed over."""
        for f in self.files:
            for key, value in torch_io.iter_file(f):
                if key.startswith(_NOT_VISION):
                    continue
                if not key.startswith(self.prefix):
                    raise ConversionError(f"{f}: key {key!r} is neither a CLIP vision tower key "
                                          f"(under {self.prefix!r}) nor a CLIPModel text key")
                yield target_prefix + key[len(self.prefix):], value

    def describe(self, with_sha256: bool = True) -> dict:
        """What a converted directory records about its tower."""
        files = []
        for f in self.files:
            entry = {"file": os.path.abspath(f), "bytes": os.path.getsize(f)}
            if with_sha256:
                entry["sha256"] = sha256(f)
            files.append(entry)
        return {"origin": self.origin, "spec": self.spec, "path": os.path.abspath(self.path),
                "files": files}


def sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tower_prefix_in(keys) -> str | None:
    """The prefix under which ``keys`` hold a CLIP tower (…embeddings.patch_embedding.weight)."""
    for k in keys:
        if k.endswith("embeddings.patch_embedding.weight") and "vision" in k:
            return k[: -len("embeddings.patch_embedding.weight")]
    return None


def _hf_cache_folder(repo_id: str) -> str:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache, without network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:   # LocalEntryNotFoundError, or a malformed id (HFValidationError)
        raise TowerNotFoundError(
            f"the Hugging Face id {repo_id!r} is not in the local Hugging Face cache "
            f"({HF_HUB_CACHE}); this tool works offline and never downloads. Fix: on a machine "
            f"with network access run `hf download {repo_id}` (older huggingface_hub: "
            f"`huggingface-cli download {repo_id}`) and copy the cache folder "
            f"models--{repo_id.replace('/', '--')} into {HF_HUB_CACHE} (or set HF_HUB_CACHE / "
            f"HF_HOME to where it is), or download the tower to a folder and pass its path. "
            f"({type(e).__name__})") from None


def resolve_folder(spec: str, *, relative_to: str | None = None) -> tuple[str, str]:
    """(folder, how it was found) for a path or Hugging Face id."""
    candidates = [spec] if os.path.isabs(spec) else \
        [os.path.join(relative_to, spec)] * bool(relative_to) + [spec]
    for c in candidates:
        if os.path.isdir(c):
            return os.path.abspath(c), "folder"
    if os.path.isabs(spec) or spec.startswith((".", "~")) or not _HF_ID.match(spec):
        raise TowerNotFoundError(
            f"{spec!r} is not a folder (looked at {', '.join(map(os.path.abspath, candidates))}) "
            f"and not a Hugging Face id of the form org/name")
    return _hf_cache_folder(spec), "Hugging Face cache"


def read_tower(folder: str, *, origin: str, spec: str) -> TowerSource:
    """The tower in ``folder``: its config (from its own config.json) and weight files."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise TowerNotFoundError(f"{folder} (the CLIP vision tower, from {origin} {spec!r}): no "
                                 f"config.json describing the tower")
    import transformers

    try:
        hf = transformers.CLIPVisionConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as e:
        raise ConversionError(f"{cfg_path}: not a CLIP config ({e})") from None
    config = CLIPVisionConfig.from_hf(hf.to_dict())
    try:
        files = torch_io.checkpoint_files(folder)
    except FileNotFoundError as e:
        raise TowerNotFoundError(f"{folder} (the CLIP vision tower, from {origin} {spec!r}): "
                                 f"{e}") from None
    keys = []
    for f in files:
        keys += list(torch_io.safetensors_keys_and_shapes(f)) if f.endswith(".safetensors") \
            else list(torch_io.load_pickle(f))
    prefix = tower_prefix_in(keys) if "vision_model.embeddings.patch_embedding.weight" in keys \
        else ("" if "embeddings.patch_embedding.weight" in keys else None)
    if prefix is None:
        raise ConversionError(f"{folder}: no CLIP vision tower weights (no "
                              f"[vision_model.]embeddings.patch_embedding.weight in {files})")
    return TowerSource(origin=origin, spec=spec, path=folder, files=tuple(files), prefix=prefix,
                       config=config)


def find_tower(folder: str, hf_config: dict, keys, *, vision_tower: str | None = None,
               projector_in: int | None = None) -> TowerSource | None:
    """None when ``keys`` hold the tower; otherwise the tower found as the module doc says.

    ``projector_in``: the mm_projector's input width, when the caller knows it; the tower's
    width must equal it and config.json's ``mm_hidden_size``.
    """
    if tower_prefix_in(keys) is not None:
        return None
    named = hf_config.get("mm_vision_tower") or hf_config.get("vision_tower")
    if vision_tower:
        spec, origin, rel = vision_tower, "argument", None
    elif named:
        spec, origin, rel = str(named), "config.json mm_vision_tower", folder
    else:
        raise TowerNotFoundError(
            f"{folder}: the checkpoint holds no CLIP vision tower weights (the public merge script "
            f"drops keys containing 'vision_tower') and config.json names none. Provide it in one "
            f"of three ways: (1) a folder whose weights include the tower; (2) --vision-tower "
            f"PATH_OR_ID (Python: vision_tower=...), e.g. a folder saved by "
            f"CLIPVisionModel.save_pretrained or openai/clip-vit-large-patch14 in the local Hugging "
            f"Face cache; (3) \"mm_vision_tower\" in {os.path.join(folder, 'config.json')}.")
    try:
        path, _ = resolve_folder(spec, relative_to=rel)
        tower = read_tower(path, origin=origin, spec=spec)
    except TowerNotFoundError as e:
        raise TowerNotFoundError(
            f"{folder}: the checkpoint holds no CLIP vision tower weights, and the tower named by "
            f"{origin} could not be found: {e}. Other ways to provide it: --vision-tower "
            f"PATH_OR_ID (Python: vision_tower=...), or \"mm_vision_tower\" in config.json naming "
            f"a folder (absolute or relative to the checkpoint folder).") from None
    widths = {"config.json mm_hidden_size": hf_config.get("mm_hidden_size"),
              "the mm_projector's input": projector_in}
    for what, want in widths.items():
        if want is not None and int(want) != tower.config.hidden_size:
            raise ConversionError(
                f"{tower.path}: the CLIP tower (from {origin} {spec!r}) is {tower.config.hidden_size} "
                f"wide but {what} is {want}: it is not the tower this model was trained with. Fix: "
                f"point --vision-tower / mm_vision_tower at the right CLIP (LLaVA v1, LISA and M²SA "
                f"use openai/clip-vit-large-patch14, 1024 wide).")
    return tower


def infer_vision_config(shapes: dict, prefix: str) -> CLIPVisionConfig:
    """A CLIP tower's config from its tensor shapes, for a folder that holds tower weights but
    no description of them (and whose named tower is not at hand). Every size is read from the
    shapes except the number of heads, which is the width / 64 of every OpenAI CLIP ViT."""
    hidden, channels, patch, _ = shapes[f"{prefix}embeddings.patch_embedding.weight"]
    positions = shapes[f"{prefix}embeddings.position_embedding.weight"][0]
    grid = int(round((positions - 1) ** 0.5))
    layers = 1 + max(int(k[len(prefix) + len("encoder.layers."):].split(".")[0])
                     for k in shapes if k.startswith(f"{prefix}encoder.layers."))
    inter = shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0]
    return CLIPVisionConfig(hidden_size=int(hidden), intermediate_size=int(inter),
                            num_hidden_layers=layers, num_attention_heads=int(hidden) // 64,
                            num_channels=int(channels), image_size=grid * int(patch),
                            patch_size=int(patch))

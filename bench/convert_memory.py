"""Peak memory of converting (``python -m checkpoints_convert llava``) and of loading a model
folder directly (``m2sa_jax.load``), on synthetic multi-GB checkpoints.

    python -m bench.convert_memory [--hidden 2048] [--layers 10] [--format bin|safetensors]
                                   [--dtype bfloat16] [--workdir /tmp]
    python -m bench.convert_memory --load [--load-size 7b|tiny] [--workdir /tmp]

``--load`` writes a LISA/M²SA folder of the 7B shape as the public code releases it (bf16
safetensors shards, no CLIP weights, config.json naming a CLIP ViT-L/14 tower saved on its own),
then loads it in a child process exactly as ``m2sa_jax.load(folder, dtype="bfloat16")`` does
(the resolver: streaming conversion in memory, the language side in bf16, SAM kept float32), and
reports the child's peak anonymous memory against the folder's bf16 weight bytes.

Writes a random LLaMA (float32) as a sharded Hugging Face folder with an index, converts it in
a child process and reports, for that child: peak RSS (``ru_maxrss``, what ``/usr/bin/time -v``
prints as "Maximum resident set size") and the peaks of its anonymous and file-backed resident
memory sampled from ``/proc/PID/status`` every 20 ms. File-backed pages (the mmapped source
shards and output buffers) are clean page cache the kernel reclaims under pressure; anonymous
memory is what must fit in RAM. Ends with the projection for 7B and 13B: anonymous memory holds one tensor at a time,
so it does not grow with the number of layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time


def write_checkpoint(folder: str, hidden: int, layers: int, fmt: str, shard_gb: float) -> int:
    """Random float32 LLaMA weights, sharded like save_pretrained; returns bytes written."""
    import torch
    from safetensors.torch import save_file

    inter, vocab = int(hidden * 8 / 3 / 64 + 1) * 64, 32000
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
               hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
               rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        current[key] = torch.randn(shape, generator=gen) * 0.02
        size += current[key].numel() * 4
        if size >= shard_gb * 1e9:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    n = len(shards)
    ext, index = ((".bin", "pytorch_model.bin.index.json") if fmt == "bin"
                  else (".safetensors", "model.safetensors.index.json"))
    stem = "pytorch_model" if fmt == "bin" else "model"
    weight_map, total = {}, 0
    for s, shard in enumerate(shards):
        name = f"{stem}-{s + 1:05d}-of-{n:05d}{ext}"
        path = os.path.join(folder, name)
        if fmt == "bin":
            torch.save(shard, path)
        else:
            save_file(shard, path, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 4 for t in shard.values())
        del shard
    shards.clear()
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _status_kb(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "VmRSS:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0])
    except FileNotFoundError:
        pass
    return out


def measure(cmd: list[str], stdout=None) -> dict:
    proc = subprocess.Popen(cmd, stdout=stdout)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}

    def poll():
        while proc.poll() is None:
            for k, v in _status_kb(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t0 = time.perf_counter()
    t.start()
    rc = proc.wait()
    t.join()
    if rc:
        raise SystemExit(f"conversion failed with exit code {rc}")
    return dict(seconds=time.perf_counter() - t0,
                maxrss_gb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6,
                anon_gb=peaks["RssAnon"] / 1e6, file_gb=peaks["RssFile"] / 1e6)


LOAD_SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32003, sam="vit_h",
               clip=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, image_size=224, patch_size=14)),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=32003, sam="vit_b",
                 clip=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=224, patch_size=14)),
}


def _export_stand_in(abstract, rules):
    """(source key, bf16 torch tensor of zeros) for every leaf of an abstract tree, one at a
    time: the table run backwards on zero-memory stand-ins."""
    import ml_dtypes
    import numpy as np
    import torch

    from m2sa_jax.checkpoints.table import export
    from m2sa_jax.tree import flatten, unflatten

    stand_ins = unflatten({p: np.lib.stride_tricks.as_strided(np.zeros(1, ml_dtypes.bfloat16),
                                                              a.shape, (0,) * len(a.shape))
                           for p, a in flatten(abstract).items()})
    for key, arr in export(stand_ins, rules):
        yield key, torch.zeros(arr.shape, dtype=torch.bfloat16)


def _write_shards(tensors, folder: str, stem: str, shard_bytes: float) -> int:
    from safetensors.torch import save_file

    shards, current, size, total = [], {}, 0, 0
    weight_map = {}

    def flush():
        name = f"{stem}-{len(shards) + 1:05d}.safetensors"
        save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in current})
        shards.append(name)

    for key, t in tensors:
        current[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
            current, size = {}, 0
    if current:
        flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def write_released_folder(root: str, size: str) -> tuple[str, int]:
    """A LISA/M²SA folder of the given shape in bf16 (no tower) + the tower folder beside it.
    Returns (folder, weight bytes of folder and tower)."""
    from m2sa_jax.checkpoints.llava import clip_rules
    from m2sa_jax.checkpoints.m2sa import m2sa_rules
    from tests.support import llama_vocab
    from m2sa_jax.models import clip, llama, llava
    from m2sa_jax.models.m2sa import M2SAConfig, abstract_params
    from m2sa_jax.models.sam import sam_config

    s = dict(LOAD_SIZES[size])
    sam_type, clip_sizes = s.pop("sam"), s.pop("clip")
    folder, tower = os.path.join(root, "M2SA"), os.path.join(root, "clip-vit")
    os.makedirs(folder)
    os.makedirs(tower)
    text = llama.LlamaConfig(max_position_embeddings=2048, **s)
    vision = clip.CLIPVisionConfig(**clip_sizes)
    config = M2SAConfig(llava=llava.LlavaConfig(text=text, vision=vision),
                        sam=sam_config(sam_type, use_compress_vit=True), seg_token_id=32000)
    abstract = abstract_params(config)
    tower_abstract = abstract["llava"].pop("vision_tower")
    total = _write_shards((kv for kv in _export_stand_in(abstract, m2sa_rules(config))
                           if "vision_tower" not in kv[0]), folder, "model", 2e9)
    total += _write_shards(_export_stand_in(tower_abstract, clip_rules("vision_model.", "")),
                           tower, "model", 2e9)
    with open(os.path.join(tower, "config.json"), "w") as f:
        json.dump(dict(vision.to_hf(), model_type="clip_vision_model",
                       architectures=["CLIPVisionModel"]), f)
    hf = dict(text.to_hf(), architectures=["LISAForCausalLM"], mm_vision_tower="../clip-vit",
              mm_hidden_size=vision.hidden_size, mm_vision_select_layer=-2,
              mm_use_im_start_end=True, out_dim=256, torch_dtype="bfloat16")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    # the real LLaMA SentencePiece vocabulary (32,000 pieces) with LISA's added tokens
    llama_vocab.write_checkpoint_tokenizer(
        folder, added_tokens={"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002})
    return folder, total


_LOAD_CHILD = """
import sys, jax
from m2sa_jax.checkpoints.resolve import resolve
from m2sa_jax.tree import flatten
m = resolve(sys.argv[1], dtype="bfloat16")
print(sum(x.nbytes for x in flatten(m.params).values()))
"""


def bench_load(args) -> None:
    root = tempfile.mkdtemp(prefix="load_memory_", dir=args.workdir)
    try:
        t0 = time.perf_counter()
        folder, stored = write_released_folder(root, args.load_size)
        print(f"{args.load_size} LISA/M²SA folder as released (bf16, tower beside it): "
              f"{stored / 1e9:.2f} GB of weights (written in {time.perf_counter() - t0:.0f}s)")
        out = os.path.join(root, "loaded_bytes")
        with open(out, "w") as f:
            r = measure([sys.executable, "-c", _LOAD_CHILD, folder], stdout=f)
        loaded = int(open(out).read().split()[-1])
        print(f"m2sa_jax.load(folder, dtype='bfloat16') in {r['seconds']:.0f}s: loaded tree "
              f"{loaded / 1e9:.2f} GB (language side bf16, SAM float32); peak anonymous "
              f"{r['anon_gb']:.2f} GB = {r['anon_gb'] * 1e9 / stored:.2f}× the bf16 weight bytes "
              f"({r['anon_gb'] * 1e9 / loaded:.2f}× the loaded tree); peak RSS "
              f"{r['maxrss_gb']:.2f} GB (file-backed {r['file_gb']:.2f} GB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--load", action="store_true",
                    help="measure direct loading of a released-layout M²SA folder instead")
    ap.add_argument("--load-size", choices=sorted(LOAD_SIZES), default="7b")
    args = ap.parse_args()
    if args.load:
        bench_load(args)
        return

    root = tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir)
    try:
        src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
        t0 = time.perf_counter()
        size = write_checkpoint(src, args.hidden, args.layers, args.format, args.shard_gb)
        print(f"synthetic LLaMA hidden {args.hidden}, {args.layers} layers: {size / 1e9:.2f} GB "
              f"float32 in {args.shard_gb} GB {args.format} shards "
              f"(written in {time.perf_counter() - t0:.0f}s)")
        out_gb = size / 1e9 * (0.5 if args.dtype == "bfloat16" else 1.0)
        r = measure([sys.executable, "-m", "checkpoints_convert", "llava", "--src", src,
                     "--dst", dst, "--dtype", args.dtype])
        print(f"convert → {args.dtype} ({out_gb:.2f} GB output) in {r['seconds']:.0f}s: "
              f"peak RSS {r['maxrss_gb']:.2f} GB (anonymous {r['anon_gb']:.2f} GB, "
              f"file-backed {r['file_gb']:.2f} GB)")
        # one tensor is in flight at a time: the float32 source (anonymous for safetensors,
        # mapped for .bin) and its transposed/cast copy; the biggest here is the embedding
        largest = 32000 * args.hidden * (4 + (2 if args.dtype == "bfloat16" else 4)) / 1e9
        fixed = r["anon_gb"] - largest
        for name, d in (("7B", 4096), ("13B", 5120)):
            proj = fixed + 32003 * d * 6 / 1e9
            print(f"projection {name} → bfloat16: anonymous ≈ {fixed:.2f} GB fixed + "
                  f"{32003 * d * 6 / 1e9:.2f} GB largest tensor in flight ≈ {proj:.1f} GB; the "
                  f"output tree lives in memory-mapped files (reclaimable page cache)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

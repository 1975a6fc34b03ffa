"""Fixture writers for LISA/M²SA checkpoint folders in the released on-disk format."""

from __future__ import annotations

import json
import os

from m2sa_jax.data.tokenizer_build import build_tokenizer_folder


_CORPUS = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: Which parts would you hold to carry both cups? ASSISTANT: the handle of each cup.
Please output segmentation mask. Sure, it is the left person and the right dog.
Segment the wheels of the car, the back of the chair and the shade of the lamp."""


def make_tokenizer_files(folder: str, vocab_size: int) -> int:
    """A small LLaMA-style tokenizer with LISA's added tokens. Returns the [SEG] id."""

    seg = build_tokenizer_folder(folder, _CORPUS.splitlines() * 20, vocab_size)
    if seg != vocab_size:
        raise AssertionError(f"SentencePiece made {seg} pieces, expected {vocab_size}")
    return seg


def write_sharded_safetensors(state: dict, folder: str, num_shards: int) -> None:
    """``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` (HF's layout)."""
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_sharded_bin(state: dict, folder: str, num_shards: int) -> None:
    """``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``."""
    import torch

    keys = list(state)
    per = -(-len(keys) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def randomize(module, seed: int, std: float = 0.05) -> None:
    """Normal init everywhere (upstream zero-inits pos_embed / rel_pos; we want them live);
    norm weights near 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and ("norm" in name.lower() or name.endswith("ln.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def write_tiny_m2sa_folder(folder: str, variant: str = "m2sa", *, sam_depth: int = 32,
                           global_attn=(7, 15, 23, 31), sam_width: int = 32, img_size: int = 1024,
                           sp_vocab: int = 400, seed: int = 0, max_positions: int = 1024):
    """A LISA/M²SA folder in the released layout (sharded safetensors + index, config.json,
    tokenizer) from a random PyTorch reference model. Returns (reference model, [SEG] id, state)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from tests.support.torch_m2sa_reference import TorchM2SA, build_sam

    os.makedirs(folder, exist_ok=True)
    seg_id = make_tokenizer_files(folder, sp_vocab)
    llama_cfg = LlamaConfig(vocab_size=sp_vocab + 3, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            rms_norm_eps=1e-6, max_position_embeddings=max_positions,
                            attn_implementation="eager")
    clip_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=2, image_size=224, patch_size=14,
                                hidden_act="quick_gelu", attn_implementation="eager")
    sam = build_sam(embed_dim=sam_width, depth=sam_depth, num_heads=2,
                    global_attn_indexes=tuple(global_attn), img_size=img_size,
                    use_compress_vit=variant == "m2sa")
    ref = TorchM2SA(llama_cfg, clip_cfg, sam, seg_token_id=seg_id, num_image_rows=256)
    randomize(ref, seed)
    ref.eval()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    write_sharded_safetensors(state, folder, num_shards=3)
    hf_config = dict(llama_cfg.to_dict(), architectures=["LISAForCausalLM"],
                     mm_vision_tower="tiny-clip", vision_config=clip_cfg.to_dict(),
                     mm_use_im_start_end=True, mm_vision_select_layer=-2, out_dim=256)
    hf_config.pop("attn_implementation", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, default=str)
    return ref, seg_id, state


def released_state(ref) -> dict:
    """The state dict as the public merge script saves it: keys containing 'vision_tower'
    dropped (``{k: v for k, v in state_dict.items() if "vision_tower" not in k}``)."""
    return {k: v.contiguous() for k, v in ref.state_dict().items() if "vision_tower" not in k}


def lisa_config_json(ref, seg_id: int, mm_vision_tower: str) -> dict:
    """config.json as a released LISA/M²SA folder has it: the LLaMA fields and the LISA/LLaVA
    ``mm_*`` fields; the CLIP tower is only named, not described."""
    llama_cfg = ref.llm.config
    tower_cfg = ref.llm.model.vision_tower.vision_tower.config
    cfg = {k: v for k, v in llama_cfg.to_dict().items()
           if k not in ("attn_implementation", "vision_tower")}
    cfg.update(architectures=["LISAForCausalLM"], model_type="llava",
               mm_vision_tower=mm_vision_tower, vision_tower=mm_vision_tower,
               mm_hidden_size=tower_cfg.hidden_size, mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", mm_use_im_start_end=True,
               mm_use_im_patch_token=False, use_mm_proj=True, out_dim=256,
               train_mask_decoder=True, seg_token_idx=seg_id, torch_dtype="float32")
    return cfg


def write_released_m2sa_folder(folder: str, mm_vision_tower: str, *, variant: str = "m2sa",
                               fmt: str = "bin", seed: int = 0, **sizes):
    """A LISA/M²SA folder exactly as the public code releases it (no CLIP weights, sharded
    ``pytorch_model-*.bin`` with an index, or safetensors, config.json naming the tower,
    tokenizer with [SEG] / <im_start> / <im_end>). Returns (reference model, [SEG] id)."""
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp()
    try:
        ref, seg_id, _ = write_tiny_m2sa_folder(scratch, variant, seed=seed, **sizes)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(scratch):
            if name.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
                shutil.copy2(os.path.join(scratch, name), folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    state = released_state(ref)
    (write_sharded_bin if fmt == "bin" else write_sharded_safetensors)(state, folder, 2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(lisa_config_json(ref, seg_id, mm_vision_tower), f, indent=2, default=str)
    return ref, seg_id


def save_clip_tower(ref, folder: str) -> None:
    """The reference model's CLIP tower saved on its own (CLIPVisionModel.save_pretrained)."""
    ref.llm.model.vision_tower.vision_tower.save_pretrained(folder)


def write_hf_cache_repo(cache: str, repo_id: str, files_from: str,
                        revision: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """A Hugging Face hub cache entry (``models--org--name/{refs/main, snapshots/<rev>/}``)
    holding copies of the files of ``files_from``. Returns the snapshot folder."""
    import shutil

    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    for name in os.listdir(files_from):
        shutil.copy2(os.path.join(files_from, name), snapshot)
    return snapshot


def save_clip_model_with_tower(ref, folder: str) -> None:
    """A whole CLIPModel (text and vision halves, like openai/clip-vit-large-patch14 on the hub)
    whose vision half is the reference model's tower."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tower = ref.llm.model.vision_tower.vision_tower
    cfg = CLIPConfig(vision_config=tower.config.to_dict(),
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=1000,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1),
                     projection_dim=16)
    full = CLIPModel(cfg).eval()
    with torch.no_grad():
        full.vision_model.load_state_dict(tower.state_dict(), strict=True)
    full.save_pretrained(folder)


def teacher_forced_case(ref, seg_id: int, sp_vocab: int, *, seed: int = 1):
    """One real photograph (not square) and two questions carrying 2 and 3 [SEG]s, collated
    for our forward, and the PyTorch reference's mask logits of those 5 targets [5, h, w]."""
    import numpy as np
    import torch
    from skimage import data

    from m2sa_jax.data.preprocess import clip_preprocess, sam_preprocess
    from tests.support.torch_m2sa_reference import IMAGE_TOKEN_INDEX

    rng = np.random.default_rng(seed)
    image = data.astronaut()[::2, ::3]                                   # 256×171
    body = lambda n: list(rng.integers(3, sp_vocab, n))                 # noqa: E731
    q0 = [1] + body(4) + [IMAGE_TOKEN_INDEX] + body(8) + [seg_id] + body(3) + [seg_id] + [2]
    q1 = [1] + body(4) + [IMAGE_TOKEN_INDEX] + body(3) + [seg_id] + body(2) + [seg_id] + \
        body(2) + [seg_id] + [2]
    t = max(len(q0), len(q1))
    ids = np.zeros((2, t), np.int64)
    am = np.zeros((2, t), np.int64)
    for i, q in enumerate((q0, q1)):
        ids[i, :len(q)] = q
        am[i, :len(q)] = 1
    size = ref.sam.image_encoder.img_size
    sam_in, resized, original = sam_preprocess(image, size)
    clip_in = clip_preprocess(image)
    with torch.no_grad():
        r = ref(torch.from_numpy(sam_in).permute(2, 0, 1)[None],
                torch.from_numpy(clip_in).permute(2, 0, 1)[None],
                torch.from_numpy(ids), torch.from_numpy(am), torch.tensor([0, 0]),
                [resized], [original])
    h, w = original
    batch = dict(sam_images=sam_in[None], clip_images=clip_in[None],
                 input_ids=ids.astype(np.int32), attention_mask=am.astype(bool),
                 conv_image_index=np.array([0, 0], np.int32),
                 resized_hw=np.array([resized], np.int32),
                 original_hw=np.array([original], np.int32),
                 gt_masks=np.zeros((2, 3, h, w), bool))
    valid = np.array([1, 1, 0, 1, 1, 1], bool)        # slots q·3 + k holding a [SEG]
    return batch, valid, r["mask_logits"][0].numpy(), image

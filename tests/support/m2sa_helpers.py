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

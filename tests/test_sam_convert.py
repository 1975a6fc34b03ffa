"""SAM checkpoint conversion: CLI round trip, formats, strict errors, unsafe pickles, sizes."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

from checkpoints_convert.__main__ import main as cli
from m2sa_jax.checkpoints.torch_io import UnsafeCheckpointError
from m2sa_jax.checkpoints.sam import convert_file, convert_sam, infer_config
from m2sa_jax.checkpoints.table import ConversionError
from m2sa_jax.models.sam import abstract_params, narrow_config, sam_config
from m2sa_jax.tree import count_params
from m2sa_jax.checkpoints.converted import load_meta, load_params
from tests.support.sam_reference import torch_sam

pytestmark = pytest.mark.torch

# Narrow ViT-B wiring at 256 px with M²SA's compress_vit: small and quick, every key kind.
TINY = narrow_config("vit_b", 32, 2, img_size=256, use_compress_vit=True)


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    sam = torch_sam(TINY, seed=3)
    path = tmp_path_factory.mktemp("sam_ckpt") / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path, {k: v.clone() for k, v in sam.state_dict().items()}


def test_cli_round_trip_pth_and_safetensors(tiny_pth, tmp_path):
    src, state = tiny_pth
    dst = tmp_path / "jax"
    assert cli(["sam", "--src", str(src), "--dst", str(dst)]) == 0
    meta = load_meta(str(dst))
    assert meta["model"] == "sam" and meta["use_compress_vit"] is True
    assert meta["config"]["encoder_embed_dim"] == 32 and meta["config"]["img_size"] == 256
    assert tuple(meta["config"]["global_attn_indexes"]) == TINY.global_attn_indexes
    params = load_params(str(dst), expected=abstract_params(TINY))
    # a layout-changing leaf really changed layout
    np.testing.assert_array_equal(
        params["mask_decoder"]["upscale_conv0"]["kernel"],
        state["mask_decoder.output_upscaling.0.weight"].numpy().transpose(2, 3, 0, 1)[::-1, ::-1])

    for suffix in (".pth", ".safetensors"):
        back = tmp_path / f"back{suffix}"
        assert cli(["sam", "--export", "--src", str(dst), "--dst", str(back)]) == 0
        if suffix == ".pth":
            got = torch.load(back, weights_only=True)
        else:
            from safetensors.torch import load_file
            got = load_file(str(back))
        assert set(got) == set(state)
        for k, v in state.items():
            assert torch.equal(got[k], v), k

    # a .safetensors source converts to the very same parameters
    dst2 = tmp_path / "jax_from_safetensors"
    assert cli(["sam", "--src", str(tmp_path / "back.safetensors"), "--dst", str(dst2)]) == 0
    p2 = load_params(str(dst2))
    jax.tree.map(np.testing.assert_array_equal, params, p2)


def test_prefix_and_foreign_keys(tiny_pth):
    _, state = tiny_pth
    items = [(f"model.visual_model.{k}", v.numpy()) for k, v in state.items()]
    items.append(("model.layers.0.self_attn.q_proj.weight", np.zeros((4, 4), np.float32)))
    params = convert_sam(items, TINY, prefix="model.visual_model.")
    assert count_params(params) == count_params(abstract_params(TINY))


def test_bad_state_dict_lists_keys(tiny_pth):
    _, state = tiny_pth
    items = dict(state_items_from(state))
    items["image_encoder.blocks.0.attn.qkv.weightt"] = items.pop("image_encoder.blocks.0.attn.qkv.weight")
    del items["mask_decoder.iou_token.weight"]
    items["mask_decoder.mask_tokens.weight"] = np.zeros((3, 256), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_sam(items.items(), TINY, name="bad.pth")
    msg = str(e.value)
    assert msg.startswith("bad.pth")
    assert "image_encoder.blocks.0.attn.qkv.weightt" in msg  # unmatched source key
    assert "image_encoder/blocks_0/attn/qkv/kernel" in msg  # unfilled target
    assert "mask_decoder/iou_token" in msg
    assert "mask_decoder.mask_tokens.weight" in msg and "(3, 256)" in msg  # wrong shape


def state_items_from(state):
    return [(k, v.numpy()) for k, v in state.items()]


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as e:
        convert_file(str(path))
    assert not marker.exists()
    assert "refused" in str(e.value) and str(path) in str(e.value)
    assert cli(["sam", "--src", str(path), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and "refused" in err and str(path) in err
    assert not (tmp_path / "out").exists()
    assert not os.path.exists(tmp_path / "out")
    # control: the payload is live, full unpickling would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_parameter_counts_match_pytorch(model_type):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ref = sam_model_registry[model_type]()
    ref_counts = {name: sum(p.numel() for p in getattr(ref, name).parameters())
                  for name in ("image_encoder", "prompt_encoder", "mask_decoder")}
    shapes = abstract_params(sam_config(model_type))
    ours = {k: count_params(v) for k, v in shapes.items()}
    # The PE gaussian matrix is a buffer in PyTorch and a (frozen) parameter here.
    gaussian = int(np.prod(
        shapes["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"].shape))
    assert gaussian == 256
    assert ours["prompt_encoder"] - gaussian == ref_counts["prompt_encoder"]
    assert ours["image_encoder"] == ref_counts["image_encoder"]
    assert ours["mask_decoder"] == ref_counts["mask_decoder"]
    if model_type == "vit_h":
        assert (ref_counts["image_encoder"], ref_counts["prompt_encoder"],
                ref_counts["mask_decoder"]) == (637_026_048, 6_220, 4_058_340)
        assert sum(ours.values()) - gaussian == 641_090_608
        fused = abstract_params(sam_config("vit_h", use_compress_vit=True))
        assert count_params(fused) - sum(ours.values()) == 3_539_968
    # "auto" recognises the named model from shapes alone
    state = {k: np.empty(v.shape) for k, v in ref.state_dict().items()}
    assert infer_config(state) == sam_config(model_type)


def test_cli_hf_folder_with_prefix(tiny_pth, tmp_path):
    """A LISA / M²SA-style folder: SAM under model.visual_model., other models' keys beside it."""
    from safetensors.torch import save_file

    _, state = tiny_pth
    folder = tmp_path / "m2sa_hf"
    folder.mkdir()
    tensors = {f"model.visual_model.{k}": v.contiguous() for k, v in state.items()}
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 8)
    save_file(tensors, str(folder / "model.safetensors"))
    dst = tmp_path / "sam_from_folder"
    assert cli(["sam", "--src", str(folder), "--dst", str(dst), "--prefix", "model.visual_model."]) == 0
    got = load_params(str(dst), expected=abstract_params(TINY))
    want = convert_sam(state_items_from(state), TINY)
    jax.tree.map(np.testing.assert_array_equal, got, want)

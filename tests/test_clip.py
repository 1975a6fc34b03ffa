"""CLIP vision tower parity against transformers' CLIPVisionModel, and CLIP preprocessing
against transformers' PIL image processor on a real photograph."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import CLIPVisionModel as HFCLIPVisionModel

from m2sa_jax.checkpoints.table import convert
from m2sa_jax.checkpoints.llava import clip_rules
from m2sa_jax.data.preprocess import clip_preprocess
from m2sa_jax.models import clip
from m2sa_jax.tree import count_params

pytestmark = pytest.mark.torch


def _tiny():
    torch.manual_seed(0)
    hf_config = HFCLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, image_size=56, patch_size=14,
                                   hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return hf_config, HFCLIPVisionModel(hf_config).eval()


def test_hidden_states_match_transformers():
    hf_config, hf = _tiny()
    config = clip.CLIPVisionConfig.from_hf(hf_config.to_dict())
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    # transformers 5 names the tower's tensors without the old "vision_model." prefix
    params = convert(state.items(), clip_rules("", target=""),
                     clip.param_shapes(config), name="tiny CLIPVisionModel")
    px = np.random.RandomState(0).randn(2, 3, 56, 56).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(px), output_hidden_states=True)
    model = clip.CLIPVisionModel(config)
    nhwc = jnp.asarray(px.transpose(0, 2, 3, 1))
    out = jax.jit(model.apply)({"params": params}, nhwc)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    err = np.abs(np.asarray(out["hidden_states"][-2]) - ref.hidden_states[-2].numpy()).max()
    print(f"CLIP hidden_states[-2] max abs error {err:.2e}")
    assert err <= 1e-4
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        assert np.abs(np.asarray(ours) - theirs.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(out["pooler_output"]) - ref.pooler_output.numpy()).max() <= 1e-4
    # LLaVA's early exit at layer -2 gives the same tensor without running the last layer
    feats = jax.jit(lambda p, x: model.apply(p, x, feature_layer=-2))({"params": params}, nhwc)
    np.testing.assert_allclose(np.asarray(feats["features"]),
                               np.asarray(out["hidden_states"][-2]), atol=1e-6)
    assert len(feats["hidden_states"]) == 3


def test_vit_l14_parameter_count():
    """ViT-L/14 at 224, post_layernorm included (it is in every checkpoint, as in
    transformers' CLIPVisionModel)."""
    hf_count = 303_179_776
    assert count_params(clip.param_shapes(clip.CLIPVisionConfig())) == hf_count
    with torch.device("meta"):
        ref = HFCLIPVisionModel(HFCLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=224, patch_size=14))
    assert sum(p.numel() for p in ref.parameters()) == hf_count


def test_clip_preprocess_matches_transformers_pil_processor():
    from skimage import data
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 224},
                                      crop_size={"height": 224, "width": 224})
    for image in (data.astronaut(), data.chelsea(), data.coffee()):  # square, landscape
        ref = processor(images=image, return_tensors="np")["pixel_values"][0]  # [3, 224, 224]
        ours = clip_preprocess(image)  # [224, 224, 3]
        np.testing.assert_array_equal(ours.transpose(2, 0, 1), ref)
        tall = np.ascontiguousarray(image.transpose(1, 0, 2))  # portrait orientation
        ref = processor(images=tall, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(clip_preprocess(tall).transpose(2, 0, 1), ref)

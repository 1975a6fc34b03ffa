"""Multimodal forward (CLIP rows spliced at <image>) against PyTorch references.

* LLaVA v1 / LISA layout: a folder written like the released checkpoints (sharded .bin with an
  index, ``model.vision_tower.vision_tower.vision_model.*``, ``model.mm_projector.*``) and a
  PyTorch composition written here: CLIPVisionModel → hidden_states[-2][:, 1:] → nn.Linear →
  splice into LlamaForCausalLM's inputs_embeds.
* llava-hf: ``LlavaForConditionalGeneration.save_pretrained``, compared with its own forward.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import CLIPVisionModel as HFCLIPVisionModel
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlama
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaForConditionalGeneration

from m2sa_jax.checkpoints import llava as convert_llava
from m2sa_jax.checkpoints.torch_io import iter_checkpoint
from m2sa_jax.checkpoints.table import ConversionError, convert
from m2sa_jax.inference.decode import Generator
from m2sa_jax.models import clip, llama, llava
from tests.support.m2sa_helpers import write_sharded_bin

pytestmark = pytest.mark.torch

VOCAB = 120
IMAGE = 56  # 4×4 patches of 14 → 16 image rows
ROWS = (IMAGE // 14) ** 2

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=256)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def v1_folder(tmp_path_factory):
    """A LISA-style LLaVA v1 folder and the PyTorch parts it was made from."""
    folder = str(tmp_path_factory.mktemp("llava_v1"))
    torch.manual_seed(0)
    lm = HFLlama(HFLlamaConfig(**TEXT)).eval()
    tower = HFCLIPVisionModel(HFCLIPVisionConfig(**VISION)).eval()
    projector = torch.nn.Linear(VISION["hidden_size"], TEXT["hidden_size"])
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    prefix = "model.vision_tower.vision_tower.vision_model."
    state.update({prefix + k: v.clone() for k, v in tower.state_dict().items()})
    state[prefix + "embeddings.position_ids"] = torch.arange(ROWS + 1)[None]  # old buffer
    state["model.mm_projector.weight"] = projector.weight.detach().clone()
    state["model.mm_projector.bias"] = projector.bias.detach().clone()
    write_sharded_bin(state, folder, 2)
    config = dict(HFLlamaConfig(**TEXT).to_dict(), architectures=["LISAForCausalLM"],
                  model_type="llava", mm_vision_tower="openai/clip-vit-large-patch14",
                  mm_hidden_size=VISION["hidden_size"], mm_vision_select_layer=-2,
                  mm_use_im_start_end=True, vision_config=VISION)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder, lm, tower, projector


def _batch(image_token, seed=0):
    """Two right-padded rows with the image token at different places."""
    rs = np.random.RandomState(seed)
    ids = np.zeros((2, 12), np.int64)
    mask = np.zeros((2, 12), bool)
    ids[0] = rs.randint(3, VOCAB - 1, 12)
    ids[0, 3] = image_token
    mask[0] = True
    ids[1, :7] = rs.randint(3, VOCAB - 1, 7)
    ids[1, 1] = image_token
    mask[1, :7] = True
    px = rs.randn(2, 3, IMAGE, IMAGE).astype(np.float32)
    return ids, mask, px


def _reference_v1(lm, tower, projector, ids, mask, px):
    """The LLaVA v1 multimodal forward in PyTorch, one row at a time (no padding involved)."""
    rows = []
    with torch.no_grad():
        feats = tower(torch.tensor(px), output_hidden_states=True).hidden_states[-2][:, 1:]
        image_rows = projector(feats)  # [B, N, d]
        for b in range(ids.shape[0]):
            row = ids[b, mask[b]]
            p = int(np.nonzero(row == llava.IMAGE_TOKEN_INDEX)[0][0])
            emb = lm.model.embed_tokens(torch.tensor(np.where(row < 0, 0, row)))
            spliced = torch.cat([emb[:p], image_rows[b], emb[p + 1:]])[None]
            rows.append(lm(inputs_embeds=spliced).logits[0].numpy())
    return rows


def test_llava_v1_forward_matches_pytorch_composition(v1_folder):
    folder, lm, tower, projector = v1_folder
    params, layout, config, _ = convert_llava.convert_folder(folder)
    assert layout.name == "llava_v1" and config.projector_type == "linear"
    assert config.image_token_index == llava.IMAGE_TOKEN_INDEX == -200
    ids, mask, px = _batch(llava.IMAGE_TOKEN_INDEX)
    refs = _reference_v1(lm, tower, projector, ids, mask, px)
    model = llava.Llava(config)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                               jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    logits = np.asarray(out["logits"])
    assert logits.shape == (2, 12 - 1 + ROWS, VOCAB)
    exp_mask = np.asarray(out["attention_mask"])
    for b, ref in enumerate(refs):
        assert exp_mask[b].sum() == len(ref) and exp_mask[b, :len(ref)].all()
        err = np.abs(logits[b, :len(ref)] - ref).max()
        print(f"LLaVA v1 row {b}: logits max abs error {err:.2e}")
        assert err <= 1e-4
    # text position t sits at text_to_expanded[t]; its embedding is the token's own
    t2e = np.asarray(out["text_to_expanded"])
    np.testing.assert_array_equal(t2e[0], [0, 1, 2, 3] + list(range(3 + ROWS, 11 + ROWS)))
    emb = np.asarray(out["inputs_embeds"])
    table = params["language_model"]["embed_tokens"]["embedding"]
    for t in (0, 5, 11):
        np.testing.assert_array_equal(emb[0, t2e[0, t]], table[ids[0, t]])
    np.testing.assert_array_equal(np.asarray(out["image_start"]), [3, 1])


def test_llava_hf_forward_matches_its_own(tmp_path):
    torch.manual_seed(1)
    image_token = VOCAB - 1
    hf = LlavaForConditionalGeneration(HFLlavaConfig(
        vision_config=VISION, text_config=TEXT, image_token_index=image_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")).eval()
    hf.save_pretrained(tmp_path)
    params, layout, config, _ = convert_llava.convert_folder(str(tmp_path))
    assert layout.is_llava and config.projector_type == "mlp2x_gelu"
    ids, mask, px = _batch(image_token, seed=2)
    out = jax.jit(llava.Llava(config).apply)({"params": params}, jnp.asarray(ids),
                                             jnp.asarray(px.transpose(0, 2, 3, 1)),
                                             jnp.asarray(mask))
    logits = np.asarray(out["logits"])
    for b in range(2):
        row = ids[b, mask[b]]
        p = int(np.nonzero(row == image_token)[0][0])
        expanded = np.concatenate([row[:p], np.full(ROWS, image_token), row[p + 1:]])
        with torch.no_grad():  # llava-hf wants one placeholder per image row
            ref = hf(input_ids=torch.tensor(expanded[None]),
                     pixel_values=torch.tensor(px[b:b + 1])).logits[0].numpy()
        err = np.abs(logits[b, :len(expanded)] - ref).max()
        print(f"llava-hf row {b}: logits max abs error {err:.2e}")
        assert err <= 1e-4


def test_v1_export_gives_back_the_checkpoint(v1_folder):
    folder = v1_folder[0]
    params, layout, config, _ = convert_llava.convert_folder(folder)
    exported = dict(convert_llava.export_params(params, layout, config, scan=False))
    source = dict(iter_checkpoint(folder))
    skipped = {k for k in source if k.endswith("position_ids")}
    assert set(exported) == set(source) - skipped
    for k, v in exported.items():
        np.testing.assert_array_equal(v, source[k])


def test_unknown_layout_names_what_is_missing():
    keys = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    # LLaVA v1 / LISA as released: no tower keys; the tower is named by config.json
    layout = convert_llava.detect_layout(keys + ["model.mm_projector.weight"], "ckpt")
    assert layout.name == "llava_v1" and layout.vision is None and layout.is_llava
    # llava-hf checkpoints always carry their tower: one without it is incomplete
    with pytest.raises(ConversionError, match="missing the CLIP tower"):
        convert_llava.detect_layout(keys + ["model.multi_modal_projector.linear_1.weight"], "ckpt")
    with pytest.raises(ConversionError, match="missing the LLaMA token embedding"):
        convert_llava.detect_layout(["encoder.weight"], "ckpt")


def test_rows_without_exactly_one_image_token_are_refused(v1_folder):
    ids = np.array([[5, 6, 7], [5, -200, -200]])
    with pytest.raises(ValueError, match=r"rows \[0, 1\] hold \[0, 2\] image tokens"):
        llava.check_image_tokens(ids, -200)


def test_mlp2x_gelu_projector_matches_pytorch():
    """LLaVA-1.5's projector as LLaVA's own checkpoints name it (mm_projector.0 / .2)."""

    torch.manual_seed(3)
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    state = {f"model.mm_projector.{k}": v.detach().numpy() for k, v in ref.state_dict().items()}
    config = llava.LlavaConfig(text=llama.LlamaConfig(hidden_size=64),
                               vision=clip.CLIPVisionConfig(hidden_size=32),
                               projector_type="mlp2x_gelu")
    projector = llava.Projector(config)
    x = np.random.RandomState(0).randn(2, 5, 32).astype(np.float32)
    shapes = jax.eval_shape(lambda: projector.init(jax.random.key(0), x))["params"]
    params = convert(state.items(), convert_llava.projector_rules("model.mm_projector.",
                                                                  "mlp2x_gelu", target=""),
                     shapes, name="projector")
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    got = np.asarray(projector.apply({"params": params}, jnp.asarray(x)))
    assert np.abs(got - want).max() <= 1e-5


def test_multimodal_prompt_generation(v1_folder):
    """Right-padded multimodal prefill (spliced embeddings) decodes each row as if alone, and
    the first token is the PyTorch composition's argmax after the prompt."""

    folder, lm, tower, projector = v1_folder
    params, _, config, _ = convert_llava.convert_folder(folder)
    ids, mask, px = _batch(llava.IMAGE_TOKEN_INDEX, seed=4)
    refs = _reference_v1(lm, tower, projector, ids, mask, px)
    model = llava.Llava(config)

    def embed(p, ids, px, mask):
        rows = model.apply(p, px, method=model.encode_images)["image_rows"]
        return model.apply(p, ids, mask, rows, method=model.embed_multimodal)

    mm = jax.jit(embed)({"params": params}, jnp.asarray(ids),
                        jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    gen = Generator(config.text, max_new_tokens=6, eos_id=None, bucket=32)
    lm_params = params["language_model"]
    batch = gen(lm_params, inputs_embeds=mm["inputs_embeds"], attention_mask=mm["attention_mask"])
    for b, ref in enumerate(refs):
        n = len(ref)
        alone = gen(lm_params, inputs_embeds=mm["inputs_embeds"][b:b + 1, :n])
        np.testing.assert_array_equal(batch["tokens"][b], alone["tokens"][0])
        assert batch["tokens"][b, 0] == ref[-1].argmax()

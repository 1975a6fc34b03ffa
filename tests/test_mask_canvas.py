"""Images larger than the mask canvas train on a reduced grid (data/pipeline.py, module doc):
the grid's size and the ground truth's area coverage, and, on a real-size Mapillary Vistas
fixture (a 3000 × 4000 v2.0 label PNG and its photo, read by the Mapillary source), the loss
the training batch gives against the loss at the original size, which the public code takes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from bench import mask_loss_grid
from m2sa_jax.data import pipeline, preprocess
from m2sa_jax.data.sources.sem_seg import mapillary
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.data.types import IGNORE_INDEX
from m2sa_jax.models.sam.postprocess import postprocess_masks_padded
from m2sa_jax.training.losses import compute_losses
from tests.support import llama_vocab

CANVAS = (1024, 1024)                   # the paper configs' data.mask_hw, = SAM's input size
REAL_HW = (3000, 4000)                  # a Mapillary photo's size
# label 0 (everything else) and four drawn classes: large regions, thin and very thin, mid-size
CLASSES = ("sky", "road", "pole", "cable", "car")


def test_grid_is_the_original_or_sams_resized_size():
    assert pipeline.grid_hw((480, 640), CANVAS) == (480, 640)              # fits: unchanged
    assert pipeline.grid_hw((1024, 1024), CANVAS) == (1024, 1024)
    for hw in ((3000, 4000), (1080, 1920), (4000, 3000), (1025, 300), (5312, 2988)):
        assert pipeline.grid_hw(hw, CANVAS) == preprocess.resize_longest_side_shape(*hw, 1024)
    assert pipeline.grid_hw((3000, 4000), (16, 16)) == (12, 16)
    assert pipeline.grid_hw((300, 200), (100, 200)) == (100, 67)           # a non-square canvas


def test_grid_masks_hold_area_coverage():
    m = np.zeros((2, 8, 12), bool)
    m[0, :4, :3] = True                              # exactly one 4 × 3 cell of a 2 × 4 grid
    m[1, :, :6] = True
    m[1, 0, 6] = True                                # 1 pixel of 12 in cell (0, 2)
    g = pipeline.grid_masks(m, (2, 4))
    assert g.dtype == np.uint8 and g.shape == (2, 2, 4)
    np.testing.assert_array_equal(g[0], [[255, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(g[1], [[255, 255, 21, 0], [255, 255, 0, 0]])   # 255/12 → 21


@pytest.fixture(scope="module")
def real_size_mapillary(tmp_path_factory):
    """root/mapillary with one 3000 × 4000 photo and its v2.0 label PNG (palette indices)."""
    root = tmp_path_factory.mktemp("mapillary_root")
    base = root / "mapillary"
    os.makedirs(base / "training" / "images")
    os.makedirs(base / "training" / "v2.0" / "labels")
    scene = mask_loss_grid.street_scene(*REAL_HW)
    names = CLASSES
    label = np.zeros(REAL_HW, np.uint8)
    for value, name in enumerate(names[1:], start=1):
        label[scene[name]] = value
    with open(base / "config_v2.0.json", "w") as f:
        json.dump({"labels": [{"name": f"object--{n}", "readable": n.capitalize(),
                               "color": [i, i, i], "instances": False, "evaluate": True}
                              for i, n in enumerate(names)]}, f)
    png = Image.frombytes("P", REAL_HW[::-1], label.tobytes())
    png.putpalette([c for i in range(len(names)) for c in (40 * i, 40 * i, 40 * i)])
    png.save(base / "training" / "v2.0" / "labels" / "street.png")
    photo = np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)
    Image.fromarray(photo).resize(REAL_HW[::-1]).save(base / "training" / "images" / "street.jpg",
                                                      quality=85)
    source = mapillary(str(root), max_questions=1, max_per_question=len(CLASSES))
    return source, {name: label == value for value, name in enumerate(names)}


def _teacher_outputs(batch, mask_logits):
    """What the model returns, for a batch whose text is unsupervised: only the mask terms of
    compute_losses are under test here."""
    q, t = batch["input_ids"].shape
    m = batch["target_valid"].size
    return dict(logits=np.zeros((q, t, 4), np.float32),
                text_to_expanded=np.broadcast_to(np.arange(t, dtype=np.int32), (q, t)),
                seg_valid=batch["target_valid"].reshape(-1),
                seg_image=np.zeros((m,), np.int32), mask_logits=mask_logits)


def test_real_size_mapillary_trains_on_sams_grid_within_the_measured_deviation(real_size_mapillary):
    source, full_masks = real_size_mapillary
    sample = source.sample(0, np.random.default_rng(0))
    names = [m.label for m in sample.masks[0]]
    assert sorted(names) == sorted(CLASSES)
    tok = LegacyLlamaTokenizer.from_pretrained(llama_vocab.shared_tokenizer_folder(),
                                               model_max_length=512)
    ex = pipeline.prepare_example(sample, tok, canvas_hw=CANVAS)
    assert ex.original_hw == REAL_HW and ex.resized_hw == (768, 1024) == ex.target_hw
    shapes = pipeline.BatchShapes(images=1, conversations=1, token_buckets=(256,),
                                  max_targets=len(CLASSES), mask_hw=CANVAS)
    assert shapes.fits(ex) is None
    batch = pipeline.collate([ex], shapes, tok.pad_token_id, coverage=True)
    batch["labels"][:] = IGNORE_INDEX
    np.testing.assert_array_equal(batch["original_hw"], [[768, 1024]])
    grid = [pipeline.grid_masks(full_masks[n][None], (768, 1024))[0] for n in names]
    np.testing.assert_array_equal(batch["gt_masks"][0, :, :768, :1024], grid)

    rng = np.random.default_rng(1)
    report = []
    for quality in ("trained",):              # the bench shows the others move less
        low = np.stack([mask_loss_grid.low_res_logits(full_masks[n], quality, rng) for n in names])
        # the model's postprocessing, as M2SA.segment runs it on this batch
        logits = np.stack([np.asarray(postprocess_masks_padded(
            m, batch["resized_hw"][0], batch["original_hw"][0], CANVAS)) for m in low])
        _, terms = compute_losses(_teacher_outputs(batch, logits), batch, ce_weight=1.0,
                                  bce_weight=mask_loss_grid.BCE_WEIGHT,
                                  dice_weight=mask_loss_grid.DICE_WEIGHT)
        rows = []
        for name, m in zip(names, low):
            full, crop = mask_loss_grid.logits_both_ways(m, REAL_HW)
            np.testing.assert_allclose(logits[len(rows), :768, :1024], crop, atol=1e-5)
            rows.append(mask_loss_grid.Row(REAL_HW, name, quality,
                                           *mask_loss_grid.terms(full, full_masks[name]),
                                           *mask_loss_grid.terms(crop, grid[len(rows)])))
        # the batch's mask loss is the mean of the grid terms ...
        grid_loss = float(np.mean([r.loss(True) for r in rows]))
        np.testing.assert_allclose(float(terms["mask"]), grid_loss, rtol=1e-5)
        # ... within the documented deviation of the loss at the original size
        original = float(np.mean([r.loss(False) for r in rows]))
        per_mask = [abs(mask_loss_grid.relative(r.loss(False), r.loss(True))) for r in rows]
        report.append((quality, original, grid_loss, max(per_mask)))
        assert abs(grid_loss - original) <= 0.005 * original, (quality, original, grid_loss)
        assert max(per_mask) <= 0.03, (quality, rows)
    print("\n" + "\n".join(f"{q}: original {o:.5f} grid {g:.5f} ({(g - o) / o:+.3%}), worst "
                           f"mask {w:.2%}" for q, o, g, w in report))

"""The learning demo, shortened (configs/synthetic.py:ci): the whole system — synthetic MMR data,
tokenizer, M²SA from scratch, train step, checkpoints, teacher-forced evaluation — must learn:
the loss falls and validation gIoU rises well above the untrained model's."""

import json
import os
import statistics

import pytest

from m2sa_jax import config_file
from m2sa_jax.training.loop import train

pytestmark = pytest.mark.slow

_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic.py")


def test_synthetic_run_learns(tmp_path):
    cfg = config_file.load(_CONFIG + ":ci")
    cfg.data.root = str(tmp_path / "data")
    summary = train(cfg, str(tmp_path / "run"), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert len(rows) == cfg.train.steps and all(r["finite"] for r in rows)
    mean = lambda key, part: statistics.mean(r[key] for r in part)  # noqa: E731
    head, tail = rows[:20], rows[-20:]
    mask_first = mean("bce", head) + mean("dice", head)
    mask_last = mean("bce", tail) + mean("dice", tail)
    before = summary["untrained"]["metrics"]["all"]["giou"]
    after = summary["trained"]["metrics"]["all"]["giou"]
    print(f"\nloss {mean('loss', head):.3f} -> {mean('loss', tail):.3f} (text {mean('ce', head):.4f}"
          f" -> {mean('ce', tail):.4f}, masks {mask_first:.3f} -> {mask_last:.3f}); "
          f"val gIoU {before:.3f} -> {after:.3f}")
    assert mean("loss", tail) < 0.9 * mean("loss", head)
    assert mean("ce", tail) < 0.5 * mean("ce", head)       # the answers are learned
    assert mask_last < 0.9 * mask_first                   # and the masks
    assert after > 2 * before and after > before + 0.04
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert any((tmp_path / "run" / "overlays").iterdir())

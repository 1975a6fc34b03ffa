"""A training workdir written before the layout changed still resumes with today's code.

tests/fixtures/workdir_before_layout holds a 3-step run of a shrunken ``configs/synthetic.py:ci``
written by the code of commit 39a8ec1 (no ``model.json``, the old module layout). Today's
``train.py`` with the same config resumes it at step 3, trains step 4 from the restored state
and data stream, and then writes the model description, after which the resolver loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from m2sa_jax.checkpoints.resolve import resolve
from tests.support import REPO

FIXTURE = os.path.join(REPO, "tests", "fixtures", "workdir_before_layout")
OVERRIDES = [
    "--config.data.train_images=24", "--config.data.val_images=4", "--config.data.vocab_size=600",
    "--config.model.llm.hidden_size=32", "--config.model.llm.intermediate_size=64",
    "--config.model.llm.num_hidden_layers=1", "--config.model.llm.num_attention_heads=2",
    "--config.model.llm.num_key_value_heads=2", "--config.model.clip.hidden_size=32",
    "--config.model.clip.intermediate_size=64", "--config.model.clip.num_hidden_layers=1",
    "--config.model.clip.patch_size=16", "--config.train.ce_weight=0.005",   # the run's values
    "--config.model.sam.encoder_embed_dim=32", "--config.model.sam.encoder_depth=2",
    "--config.model.sam.encoder_num_heads=2", "--config.model.sam.global_attn_indexes=(1,)",
    "--config.model.sam.prompt_embed_dim=32", "--config.model.sam.decoder_mlp_dim=64",
    "--config.model.sam.decoder_num_heads=2", "--config.model.sam.iou_head_hidden_dim=32",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=3",
    "--config.train.keep_checkpoints=1", "--config.eval.before_training=False",
    "--config.eval.overlays=0",
]


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_workdir_from_before_the_layout_change_resumes(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURE, workdir, ignore=shutil.ignore_patterns("README.md"))
    with pytest.raises(FileNotFoundError, match="without model.json.*run the same train.py"):
        resolve(str(workdir))                      # an old run says how to describe itself
    # the data stream's state names its source as the run gave it ("data/MMR_train.json"),
    # so the run is resumed from a folder where the same relative data root exists
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
           os.path.join(REPO, "configs", "synthetic.py") + ":ci", "--workdir", str(workdir),
           "--config.data.root=data", *OVERRIDES, "--config.train.steps=4"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step 3" in done.stdout
    old, new = _rows(os.path.join(FIXTURE, "train_log.jsonl")), _rows(workdir / "train_log.jsonl")
    assert [r["step"] for r in new] == [1, 2, 3, 4]
    assert new[:3] == old                           # the old log is kept as written
    assert new[3]["finite"] and np.isfinite(new[3]["loss"])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    model = resolve(str(workdir))                   # now described: a model like any other
    assert "step 4" in model.description

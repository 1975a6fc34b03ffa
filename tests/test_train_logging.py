"""Training logs and the non-finite guard (issue 6 item 5), on the tiny synthetic run.

One in-process run with an absurd learning rate: its first update (Adam moves every weight by
about lr = 1e38) is finite, then every forward overflows. The run must log that first step to
TensorBoard and the progress bar (loss terms, lr, samples/s) and ``train_log.jsonl``, skip each
non-finite update (the checkpoints after the skipped steps hold the very same parameters and
optimizer state as the one before them) and stop after ``max_nonfinite`` in a row with a
message that says what happened and what to do.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto.event_pb2 import Event

from m2sa_jax.tree import flatten
from m2sa_jax.training import hooks, loop
from tests.support import train_tiny

K = 3


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files (TFRecord framing: length, crc, event, crc)."""

    out: dict[str, list] = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _restore(directory, step):
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return state["state"]


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    cfg = train_tiny.config(str(tmp / "data"), train__lr=1e38, train__warmup_steps=0,
                            train__checkpoint_every=1, train__max_nonfinite=K)
    workdir = str(tmp / "run")
    return cfg, workdir


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_and_the_run_stops(nan_run, capsys):
    cfg, workdir = nan_run
    with pytest.raises(hooks.NonFiniteLoss) as info:
        loop.train(cfg, workdir, progress=True)
    message = str(info.value)
    captured = capsys.readouterr()
    print(f"\nmessage: {message}")
    assert f"not finite for {K} steps in a row" in message
    assert "updates were skipped" in message and "Lower train.lr" in message
    assert f"step {K + 1}:" in message

    log = [json.loads(line) for line in open(os.path.join(workdir, hooks.TRAIN_LOG))]
    assert [r["step"] for r in log] == list(range(1, K + 2))
    assert log[0]["finite"] and np.isfinite(log[0]["loss"])
    assert all(not r["finite"] for r in log[1:])

    # progress bar: loss terms, lr and samples/s of the logged step
    for key in ("loss=", "ce=", "bce=", "dice=", "lr=1.00e+38", "sps="):
        assert key in captured.err, key
    # TensorBoard: the same scalars
    tb = _scalars(os.path.join(workdir, "tensorboard"))
    for tag in ("train/loss", "train/ce", "train/bce", "train/dice", "train/grad_norm",
                "train/lr", "train/samples_per_s"):
        assert tag in tb and tb[tag][0][0] == 1, tag
    assert abs(tb["train/loss"][0][1] - log[0]["loss"]) <= 1e-6 * abs(log[0]["loss"])
    assert tb["train/samples_per_s"][0][1] > 0

    # checkpoints 1..K: step 1 updated; steps 2..K were skipped, so the state is unchanged
    directory = os.path.join(workdir, "checkpoints")
    deadline = time.monotonic() + 60
    while not all(os.path.isdir(os.path.join(directory, str(s))) for s in range(1, K + 1)):
        assert time.monotonic() < deadline, os.listdir(directory)
        time.sleep(0.1)
    time.sleep(0.5)
    first = _restore(directory, 1)
    for s in range(2, K + 1):
        later = _restore(directory, s)
        assert int(later["step"]) == s and int(later["nonfinite"]) == s - 1
        a, b = flatten(first["variables"]), flatten(later["variables"])
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), (s, k)
        oa, ob = jax.tree.leaves(first["opt_state"]), jax.tree.leaves(later["opt_state"])
        assert jax.tree.structure(first["opt_state"]) == jax.tree.structure(later["opt_state"])
        assert len(oa) > 2
        for x, y in zip(oa, ob):
            assert np.array_equal(np.asarray(x), np.asarray(y)), s


@pytest.mark.slow
def test_max_minutes_is_a_guard_that_fails_loudly_never_a_shorter_run(tmp_path):
    """Past train.max_minutes the run saves its state and raises, evaluating nothing; running
    again (without the guard) continues from the saved step and trains every configured step."""
    data = str(tmp_path / "data")
    workdir = str(tmp_path / "run")
    steps = 3
    cfg = train_tiny.config(data, train__steps=steps, train__max_minutes=1e-6)
    with pytest.raises(hooks.TimeLimitExceeded) as info:
        loop.train(cfg, workdir, progress=False)
    message = str(info.value)
    print(f"\nmessage: {message}")
    assert f"step 1 of {steps}:" in message and "train.max_minutes=1e-06" in message
    assert "run the same command again to continue" in message
    assert "--config.train.max_minutes=0" in message
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))     # nothing evaluated
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))

    summary = loop.train(train_tiny.config(data, train__steps=steps), workdir, progress=False)
    assert summary["start_step"] == 1 and summary["steps"] == steps
    assert summary["stopped"] is None
    log = [json.loads(line)["step"] for line in open(os.path.join(workdir, hooks.TRAIN_LOG))]
    assert log == list(range(1, steps + 1))

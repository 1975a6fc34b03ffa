"""Sharding: one train step is the same computation on every mesh and across processes.

A tiny random M²SA (tests/support/sharding_worker.py: scanned + rematerialised LLM with LoRA and
dropout, the paper's trainable set, compress_vit fusion) takes one AdamW step on a fixed batch
of 8 images on a 1-device mesh, a 2×4 (data × fsdp) and an 8×1 (data) mesh of fake CPU
devices, and in a two-process jax.distributed run on localhost (2 devices each, fsdp × tensor).
The loss and every updated parameter, LoRA factor and Adam moment must agree with the
1-device step to 1e-5. The compiled 2×4 step's memory analysis checks the memory plan's
bookkeeping: its arguments are exactly the rule-sharded state plus the batch shards, and the
donated state is aliased to the output.

Fake devices are fixed when jax is imported, so every run is a fresh subprocess (started
together in one module fixture: one compile each).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.support import REPO
from tests.support.sharding_worker import initial_value

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = [sys.executable, "-m", "tests.support.sharding_worker"]     # run from the repository root
TOL = 1e-5
REFERENCE, FSDP, DATA, TWO_PROCESS = "1,1,1", "2,4,1", "8,1,1", "1,2,2"
TIMEOUT = 1500


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"meshes": the 8-device runs' arrays, "processes": the two-process run's}: one process
    per mesh, all started together (each is one compile; 2 cores overlap them)."""
    out = tmp_path_factory.mktemp("sharding")
    procs, files = [], []
    for spec in (REFERENCE, FSDP, DATA):
        files.append(str(out / f"mesh_{spec.replace(',', 'x')}.npz"))
        procs.append(subprocess.Popen(
            [*WORKER, "meshes", files[-1], spec, "--memory", FSDP],
            env=_env(8), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    two = str(out / "two_process.npz")
    port = _free_port()
    for pid in range(2):
        procs.append(subprocess.Popen(
            [*WORKER, "process", two, "--process_id", str(pid),
             "--num_processes", "2", "--port", str(port), "--mesh", TWO_PROCESS],
            env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{' '.join(p.args[2:])} failed:\n{log[-6000:]}"
    meshes = {}
    for f in files:
        meshes.update(np.load(f))
    return {"meshes": meshes, "processes": dict(np.load(two))}


def _state(npz: dict, mesh: str) -> dict:
    prefix = mesh + "/"
    return {k[len(prefix):]: v for k, v in npz.items()
            if k.startswith(prefix) and not k.startswith(prefix + "memory/")}


def _max_errors(got: dict, want: dict) -> dict:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    return {k: float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) if want[k].size else 0.0
            for k in want}


def _check(got: dict, want: dict, label: str):
    errors = _max_errors(got, want)
    worst = max(errors, key=errors.get)
    print(f"{label}: loss {float(got['loss']):.7f} vs {float(want['loss']):.7f}; max abs error "
          f"{errors[worst]:.2e} at {worst} over {len(errors)} arrays")
    assert errors[worst] <= TOL, f"{label}: {worst} differs by {errors[worst]:.3e}"


def test_step_equal_on_data_fsdp_mesh(runs):
    m = runs["meshes"]
    _check(_state(m, FSDP), _state(m, REFERENCE), f"mesh {FSDP} (data×fsdp×tensor)")


def test_step_equal_on_data_mesh(runs):
    m = runs["meshes"]
    _check(_state(m, DATA), _state(m, REFERENCE), f"mesh {DATA}")


def test_two_process_step_equals_one_process(runs):
    got = _state(runs["processes"], TWO_PROCESS)
    _check(got, _state(runs["meshes"], REFERENCE), f"2 processes × 2 devices, mesh {TWO_PROCESS}")


def test_step_changes_trainable_and_keeps_frozen(runs):
    """The reference step itself moved the trainable leaves and left frozen ones bit-identical
    (compared with their starting values, redrawn here)."""
    ref = _state(runs["meshes"], REFERENCE)

    def before(key):
        path = "/".join(re.findall(r"\['([^']*)'\]", key)[1:])      # drop ['variables']
        return initial_value(path, ref[key].shape)

    frozen = ["['variables']['params']['sam']['image_encoder']['blocks_0']['attn']['qkv']['kernel']",
              "['variables']['params']['llava']['language_model']['layers']['layer']['self_attn']"
              "['q_proj']['kernel']"]
    trained = ["['variables']['params']['sam']['mask_decoder']['output_hypernetworks_mlps_0']"
               "['layers_0']['kernel']",
               "['variables']['params']['sam']['mask_decoder']['compress_vit_conv0']['kernel']",
               "['variables']['params']['text_hidden_fcs']['dense_0']['kernel']",
               "['variables']['params']['llava']['language_model']['embed_tokens']['embedding']",
               # v_proj: at this init the attention is near-uniform, so q_proj's gradient is ~1e-10
               "['variables']['lora']['llava']['language_model']['layers']['layer']['self_attn']"
               "['v_proj']['lora_a']"]
    for k in frozen:
        np.testing.assert_array_equal(ref[k], before(k), err_msg=k)
    for k in trained:
        assert np.abs(ref[k] - before(k)).max() > 1e-4, f"{k} did not train"


def test_memory_analysis_matches_the_sharded_state(runs):
    m = {k.split("memory/")[1]: int(v) for k, v in runs["meshes"].items()
         if k.startswith(FSDP + "/memory/")}
    print(f"mesh {FSDP}: per-device argument {m['argument']:,} B = state {m['state_shard_bytes']:,}"
          f" + batch {m['batch_shard_bytes']:,}; alias {m['alias']:,}; temp {m['temp']:,}")
    # jit drops arguments the step never reads: image_valid and conv_valid, 1 byte a device
    assert m["state_shard_bytes"] + m["batch_shard_bytes"] - m["argument"] == 2
    # the donated state comes back in place: every state byte is aliased by the output
    assert m["alias"] == m["state_shard_bytes"]

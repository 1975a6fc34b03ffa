"""Exact resume of a real training process (issue 6 item 4).

``train.py`` runs as a subprocess on a tiny synthetic config (LoRA on, so dropout draws from
the run's RNG too). One run goes uninterrupted. Another is SIGKILLed as soon as its first
checkpoint is complete, resumed, stopped with SIGTERM (it must save and exit cleanly), and
resumed again to the end. Every step's losses, as logged to ``workdir/train_log.jsonl``, must
match the uninterrupted run's to 1e-6: parameters, optimizer state, step, RNG and the data
iterator's position all came back. A persistent compilation cache shared by the runs keeps
the later runs from compiling the step again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import train_tiny

STEPS = 8
EXTRA = dict(train__lora__rank=4, train__lora__dropout=0.1, eval__overlays=0,
             eval__images_per_batch=2)


def _log(workdir) -> dict[int, dict]:
    """Last record per step (a killed run's steps are logged again after resuming)."""
    out = {}
    path = os.path.join(workdir, "train_log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    rec = json.loads(line)
                    out[rec["step"]] = rec
    return out


def _lines(workdir) -> int:
    path = os.path.join(workdir, "train_log.jsonl")
    return sum(1 for _ in open(path)) if os.path.isfile(path) else 0


def _start(workdir, data_root, cache, out_name):
    out = open(os.path.join(os.path.dirname(workdir), out_name), "w")
    proc = subprocess.Popen(train_tiny.train_command(workdir, data_root, **EXTRA),
                            env=train_tiny.env(cache), stdout=out, stderr=subprocess.STDOUT,
                            text=True)
    return proc, out


def _wait_for(predicate, proc, what, timeout=240):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (rc {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _steps_saved(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _finish(proc, out, timeout=300) -> str:
    proc.wait(timeout=timeout)
    out.close()
    return open(out.name).read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data, cache = str(tmp / "data"), str(tmp / "jax_cache")
    timings = {}

    t = time.monotonic()
    full = str(tmp / "full")
    proc, out = _start(full, data, cache, "full.out")
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-3000:]
    timings["uninterrupted"] = time.monotonic() - t

    t = time.monotonic()
    cut = str(tmp / "cut")
    proc, out = _start(cut, data, cache, "kill.out")
    _wait_for(lambda: _steps_saved(cut), proc, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    killed_text = _finish(proc, out)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _steps_saved(cut)[-1]
    killed_logged = max(_log(cut))
    timings["killed"] = time.monotonic() - t

    t = time.monotonic()
    before = _lines(cut)
    proc, out = _start(cut, data, cache, "term.out")
    _wait_for(lambda: _lines(cut) > before, proc, "a step after resuming")
    proc.send_signal(signal.SIGTERM)
    term_text = _finish(proc, out)
    timings["terminated"] = time.monotonic() - t
    term_rc, term_saved = proc.returncode, _steps_saved(cut)
    term_logged = [json.loads(l)["step"] for l in open(os.path.join(cut, "train_log.jsonl"))][before:]

    t = time.monotonic()
    proc, out = _start(cut, data, cache, "resume.out")
    resume_text = _finish(proc, out)
    assert proc.returncode == 0, resume_text[-3000:]
    timings["resumed"] = time.monotonic() - t
    print("\nrun wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return dict(full=_log(full), cut=_log(cut), killed_at=killed_at,
                killed_logged=killed_logged, term_rc=term_rc, term_saved=term_saved,
                term_logged=term_logged, term_text=term_text, resume_text=resume_text,
                killed_text=killed_text)


def test_sigkill_then_resume_reproduces_the_losses(runs):
    full, cut = runs["full"], runs["cut"]
    assert sorted(full) == list(range(1, STEPS + 1))
    assert sorted(cut) == list(range(1, STEPS + 1))
    assert f"resumed from" in runs["resume_text"]
    worst = 0.0
    for step in range(1, STEPS + 1):
        for key in ("loss", "ce", "bce", "dice", "grad_norm", "lr"):
            err = abs(full[step][key] - cut[step][key])
            worst = max(worst, err)
            assert err <= 1e-6, (step, key, full[step][key], cut[step][key])
    print(f"killed after checkpoint {runs['killed_at']} (step {runs['killed_logged']} logged); "
          f"max abs loss difference vs uninterrupted over {STEPS} steps: {worst:.1e}")
    # the losses moved: equality is not that of a run that does not train
    assert full[STEPS]["loss"] != full[1]["loss"]


def test_sigterm_saves_and_exits_cleanly(runs):
    assert runs["term_rc"] == 0, runs["term_text"][-3000:]
    assert runs["term_logged"], "the SIGTERMed run logged no step"
    last = runs["term_logged"][-1]
    assert last < STEPS
    # it saved the step it stopped at (not only the periodic ones)
    assert last in runs["term_saved"], (last, runs["term_saved"])
    assert f"at step {last}" in runs["resume_text"]

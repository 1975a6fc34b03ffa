"""The learning demo, shortened (configs/synthetic.py:ci): the whole system — synthetic MMR data,
tokenizer, M²SA from scratch, train step, checkpoints, teacher-forced evaluation — must learn:
the loss falls and validation gIoU rises well above the untrained model's. The run is the
session's shared ``trained_ci_run`` (tests/conftest.py), so other tests can use the model."""

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_synthetic_run_learns(trained_ci_run):
    cfg, summary, run = trained_ci_run["cfg"], trained_ci_run["summary"], trained_ci_run["workdir"]
    rows = [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]
    assert len(rows) == cfg.train.steps and all(r["finite"] for r in rows)
    mean = lambda key, part: statistics.mean(r[key] for r in part)  # noqa: E731
    head, tail = rows[:20], rows[-20:]
    mask_first = mean("bce", head) + mean("dice", head)
    mask_last = mean("bce", tail) + mean("dice", tail)
    before = summary["untrained"]["metrics"]["all"]["giou"]
    after = summary["trained"]["metrics"]["all"]["giou"]
    print(f"\nloss {mean('loss', head):.3f} -> {mean('loss', tail):.3f} (text {mean('ce', head):.4f}"
          f" -> {mean('ce', tail):.4f}, masks {mask_first:.3f} -> {mask_last:.3f}); "
          f"val gIoU {before:.3f} -> {after:.3f}, instance separation "
          f"{summary['trained']['instance_separation']['all']['rate']:.3f}")
    assert mean("loss", tail) < 0.9 * mean("loss", head)
    assert mean("ce", tail) < 0.5 * mean("ce", head)       # the answers are learned
    assert mask_last < 0.9 * mask_first                   # and the masks
    assert after > 2 * before and after > before + 0.04
    with open(os.path.join(run, "metrics.json")) as f:
        written = json.load(f)
    separation = written["trained"]["instance_separation"]["all"]   # the val split names pairs
    assert separation == summary["trained"]["instance_separation"]["all"]
    assert separation["questions"] > 0 and separation["masks"] >= 2 * separation["questions"]
    assert os.listdir(os.path.join(run, "overlays"))


@pytest.mark.slow
def test_the_trained_workdir_answers_from_the_command_line(trained_ci_run, tmp_path):
    """The demo's workdir is a model: the segment command takes it as it is (latest step,
    the run's tokenizer), and a chosen step with WORKDIR@STEP."""
    run = trained_ci_run["workdir"]
    val = json.load(open(os.path.join(trained_ci_run["data_root"], "MMR_val.json")))
    record = next(r for r in val if r["questions"])
    image = os.path.join(trained_ci_run["data_root"], "images", record["file_name"])
    for checkpoint, out in ((run, tmp_path / "latest"), (f"{run}@60", tmp_path / "step60")):
        done = subprocess.run(
            [sys.executable, "-m", "m2sa_jax.segment", "--checkpoint", checkpoint, "--image",
             image, "--question", record["questions"][0], "--out", str(out)],
            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((out / "result.json").read_text())
        print(f"\n{checkpoint}: Q: {record['questions'][0]}\nA: {result['answer']}")
        assert result["checkpoint"].endswith(f"step {120 if out.name == 'latest' else 60}")
        assert (out / "overlay.png").is_file()
        if out.name == "latest":
            assert len(result["masks"]) >= 1 and all(m["area"] > 0 for m in result["masks"])

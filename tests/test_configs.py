"""The experiment configs derive from configs/base.py: each has exactly its keys and sets every
value it leaves open; a key the base lacks is refused, in a config file and on the command
line, with the keys that do exist."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from m2sa_jax import config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
EXPERIMENTS = ("synthetic.py", "synthetic.py:ci", "m2sa_7b.py", "m2sa_7b.py:public",
               "m2sa_llama2_13b.py", "lisa_7b.py")
FREE_FORM = ("model.llm", "model.clip", "model.sam", "data.ratios")   # dicts of sizes / ratios


def _keys(c, prefix=""):
    out = set()
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict) and prefix + k not in FREE_FORM:
            out |= _keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


@pytest.mark.parametrize("spec", EXPERIMENTS)
def test_every_experiment_has_the_base_keys_and_sets_them(spec):
    base = config_file.load_module(os.path.join(CONFIGS, "base.py")).get_config()
    c = config_file.load(os.path.join(CONFIGS, spec))
    assert _keys(c) == _keys(base)
    assert config_file.unset_keys(c) == []
    assert c.is_locked


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "experiment.py"
    path.write_text(f"from m2sa_jax.config_file import load_module\n"
                    f"synthetic = load_module({os.path.join(CONFIGS, 'synthetic.py')!r})\n\n"
                    f"def get_config(arg=None):\n    c = synthetic.get_config()\n"
                    f"    if arg == 'v':\n        {body}\n    return c\n")
    return str(path)


def test_a_variant_setting_a_key_the_base_lacks_is_refused(tmp_path):
    path = _write(tmp_path, "c.train.lrr = 1e-4")
    assert config_file.load(path).train.lr == 1e-3              # the variant is not taken
    with pytest.raises(config_file.ConfigError, match=r"'lrr' is not a key there; its keys: "
                       r"b1, b2, .*\blr\b.*warmup_steps.*\(did you mean 'lr'\?\)"):
        config_file.load(path + ":v")


def test_a_value_left_unset_is_named(tmp_path):
    path = _write(tmp_path, "c.train.lr = None")
    with pytest.raises(config_file.ConfigError, match=r"leaves train.lr unset"):
        config_file.load(path + ":v")


def test_overrides_of_unknown_keys_are_refused_with_the_known_ones():
    c = config_file.load(os.path.join(CONFIGS, "synthetic.py"))
    config_file.check_overrides(c, ["train.lr", "model.sam.img_size", "mesh.rules"])
    with pytest.raises(config_file.ConfigError, match=r"--config.train.lrr: train has no key "
                       r"'lrr'; its keys: b1, b2, .*\blr\b"):
        config_file.check_overrides(c, ["train.lr", "train.lrr"])
    assert config_file.command_line_overrides(
        ["--config", "x.py:ci", "--config.train.lr=1", "--noconfig.eval.before_training",
         "--config.data.root", "DIR", "--workdir=w"]) == \
        ("x.py:ci", ["train.lr", "eval.before_training", "data.root"])


@pytest.mark.parametrize("command", [["train.py"], ["eval.py"]])
@pytest.mark.multiprocess
def test_command_lines_refuse_a_misspelt_override(command):
    proc = subprocess.run([sys.executable, *command, "--config.train.lrr=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config.train.lrr: train has no key 'lrr'; its keys: b1, b2" in proc.stderr
    assert "Traceback" not in proc.stderr

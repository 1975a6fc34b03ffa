"""Every command-line program is installed as a console script (setup.cfg) that starts from
any directory and describes itself: ``--help`` of each, run from the venv's bin/."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys

import pytest

from tests.support import REPO

# script → (a flag or word its --help must show, whether it is an absl program)
SCRIPTS = {
    "m2sa-train": ("--multihost", True),
    "m2sa-eval": ("--config", True),
    "m2sa-export": ("--dst", False),
    "m2sa-segment": ("--question", False),
    "m2sa-convert": ("{sam,llava,m2sa}", False),
    "m2sa-demo-sam": ("--checkpoint", False),
    "m2sa-serve": ("--api-key", False),
}


def test_setup_cfg_installs_these_scripts():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    assert {line.split("=")[0].strip() for line in lines} == set(SCRIPTS)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help(name, tmp_path):
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.access(path, os.X_OK), f"{path} is not installed: run bash scripts/setup.sh"
    proc = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    shows, absl = SCRIPTS[name]
    assert proc.returncode == (1 if absl else 0), proc.stderr[-2000:]   # absl's --help exits 1
    assert shows in proc.stdout and "Traceback" not in proc.stderr

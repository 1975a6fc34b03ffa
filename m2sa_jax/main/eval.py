"""Evaluation: ``m2sa-eval``, ``python eval.py`` or ``python -m m2sa_jax.main.eval``. gIoU /
cIoU of a model on MMR or a referring benchmark.

    m2sa-eval --config configs/synthetic.py --config.eval.checkpoint=DIR \\
        --config.eval.dataset=mmr --config.eval.split=val|test_mixed|test_obj_only|test_part_only \\
        [--config.eval.protocol=teacher_forced|generate] [--workdir OUT]

``eval.checkpoint`` is a converted LISA/M²SA directory or a training workdir (its latest step);
with the synthetic config and no checkpoint, the config's own training workdir is evaluated.
Prints a table and writes ``OUT/metrics_<dataset>_<split>_<protocol>.json``; a killed run
resumes from ``OUT/results_*.json``. Multi-host: --multihost (jax.distributed.initialize).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from m2sa_jax.config_file import flags_parser
from m2sa_jax.hugepages import reexec_with_hugepage_malloc
from m2sa_jax.main import DEFAULT_CONFIG, quiet_libraries


def main(argv: list[str] | None = None) -> int:
    if argv is None:          # a command line (console script, python -m): huge-page malloc
        reexec_with_hugepage_malloc()
    config = config_flags.DEFINE_config_file(
        "config", None, "experiment config file (default: configs/synthetic.py)")
    workdir = flags.DEFINE_string("workdir", None,
                                  "output directory (default: <config.workdir>/eval)")
    multihost = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")

    def run(argv):
        del argv
        quiet_libraries()
        if multihost.value:
            jax.distributed.initialize()
        # Imported once the cluster is up: jax.distributed.initialize must come before
        # anything touches a device.
        from m2sa_jax.evaluation.run import run as evaluate

        cfg = config.value
        try:
            evaluate(cfg, workdir.value or os.path.join(cfg.workdir, "eval"))
        except (ValueError, FileNotFoundError) as e:
            print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
            return 2
        return 0

    if DEFAULT_CONFIG is None:
        flags.mark_flag_as_required("config")
    app.run(run, argv=argv, flags_parser=flags_parser(DEFAULT_CONFIG, program=__name__))
    return 0


if __name__ == "__main__":
    sys.exit(main())

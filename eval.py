"""Evaluation entry point: gIoU / cIoU of a model on MMR or a referring benchmark.

    python eval.py --config configs/synthetic.py --config.eval.checkpoint=DIR \\
        --config.eval.dataset=mmr --config.eval.split=val|test_mixed|test_obj_only|test_part_only \\
        [--config.eval.protocol=teacher_forced|generate] [--workdir OUT]

``eval.checkpoint`` is a converted LISA/M²SA directory or a training workdir (its latest step);
with the synthetic config and no checkpoint, the config's own training workdir is evaluated.
Prints a table and writes ``OUT/metrics_<dataset>_<split>_<protocol>.json``; a killed run
resumes from ``OUT/results_*.json``. Multi-host: --multihost (jax.distributed.initialize).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from m2sa_jax.config_file import flags_parser

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file "
                                           "(default: configs/synthetic.py)")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "output directory (default: <config.workdir>/eval)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")


def main(argv):
    del argv
    import jax

    if _MULTIHOST.value:
        jax.distributed.initialize()
    from m2sa_jax.evaluation.runner import run

    cfg = _CONFIG.value
    try:
        run(cfg, _WORKDIR.value or os.path.join(cfg.workdir, "eval"))
    except (ValueError, FileNotFoundError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=flags_parser(_DEFAULT)))

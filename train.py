"""Training entry point.

    python train.py --config configs/synthetic.py [--config.train.steps=300 ...] [--workdir DIR]
    python train.py --config configs/m2sa_7b.py --config.model.llava_checkpoint=DIR \\
        --config.model.sam_checkpoint=DIR --config.data.mmr_root=... --workdir DIR

With no --config, trains the synthetic demo (configs/synthetic.py). A run resumes from
``workdir/checkpoints`` when it holds a step. Multi-host: set --multihost (calls
jax.distributed.initialize, which reads the cluster from the environment).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: config.workdir)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")


def main(argv):
    del argv
    import jax

    if _MULTIHOST.value:
        jax.distributed.initialize()
    from m2sa_jax.training.loop import train

    cfg = _CONFIG.value
    workdir = _WORKDIR.value or cfg.workdir
    summary = train(cfg, workdir)
    trained = summary.get("trained", {}).get("metrics", {}).get("all")
    if trained:
        print(f"done: {summary['steps']} steps; val gIoU {trained['giou']:.3f} cIoU "
              f"{trained['ciou']:.3f}; metrics in {os.path.join(os.path.abspath(workdir), 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))

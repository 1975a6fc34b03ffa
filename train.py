"""Training entry point.

    python train.py --config configs/synthetic.py [--config.train.steps=300 ...] [--workdir DIR]
    python train.py --config configs/m2sa_7b.py --config.model.llava_checkpoint=DIR \\
        --config.model.sam_checkpoint=DIR --config.data.mmr_root=... --workdir DIR

With no --config, trains the synthetic demo (configs/synthetic.py). A run resumes from
``workdir/checkpoints`` when it holds a step. Multi-host: run the same command on every host
with --multihost (jax.distributed.initialize: the cluster is detected under SLURM / Open MPI,
or give --coordinator=host0:1234 --num_processes=N --process_id=i); see docs/training.md.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from m2sa_jax.config_file import flags_parser

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file "
                                           "(default: configs/synthetic.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: config.workdir)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "multihost: host:port of process 0 "
                                   "(default: detected from SLURM / Open MPI / the environment)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multihost: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multihost: this process's index")


def main(argv):
    del argv
    import jax
    from absl import logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # checkpoint libraries log every save at INFO

    if _MULTIHOST.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
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
    sys.exit(app.run(main, flags_parser=flags_parser(_DEFAULT)))

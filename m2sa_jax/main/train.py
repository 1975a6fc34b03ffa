"""Training: ``m2sa-train``, ``python train.py`` or ``python -m m2sa_jax.main.train``.

    m2sa-train --config configs/synthetic.py [--config.train.steps=300 ...] [--workdir DIR]
    m2sa-train --config configs/m2sa_7b.py --config.model.llava_checkpoint=DIR \\
        --config.model.sam_checkpoint=DIR --config.data.mmr_root=... --workdir DIR

With no --config, trains the synthetic demo (configs/synthetic.py). A run resumes from
``workdir/checkpoints`` when it holds a step. Multi-host: run the same command on every host
with --multihost (jax.distributed.initialize: the cluster is detected under SLURM / Open MPI,
or give --coordinator=host0:1234 --num_processes=N --process_id=i); see docs/training.md.
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
    workdir = flags.DEFINE_string("workdir", None, "run directory (default: config.workdir)")
    multihost = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
    coordinator = flags.DEFINE_string("coordinator", None, "multihost: host:port of process 0 "
                                      "(default: detected from SLURM / Open MPI / the "
                                      "environment)")
    num_processes = flags.DEFINE_integer("num_processes", None, "multihost: number of processes")
    process_id = flags.DEFINE_integer("process_id", None, "multihost: this process's index")

    def run(argv):
        del argv
        quiet_libraries()
        if multihost.value:
            jax.distributed.initialize(coordinator_address=coordinator.value,
                                       num_processes=num_processes.value,
                                       process_id=process_id.value)
        # Imported once the cluster is up: jax.distributed.initialize must come before
        # anything touches a device.
        from m2sa_jax.evaluation.teacher_forced import split_evaluator
        from m2sa_jax.training.loop import train

        cfg = config.value
        run_dir = workdir.value or cfg.workdir
        # the held-out evaluation before and after training is a hook of the loop
        summary = train(cfg, run_dir, evaluator=split_evaluator(cfg))
        trained = summary.get("trained", {}).get("metrics", {}).get("all")
        if trained:
            separation = summary["trained"].get("instance_separation", {}).get("all")
            print(f"done: {summary['steps']} steps in {summary['total_seconds'] / 60:.1f} min; "
                  f"val gIoU {trained['giou']:.3f} cIoU {trained['ciou']:.3f}"
                  + (f", instance separation {separation['rate']:.3f}" if separation else "")
                  + f"; metrics in {os.path.join(os.path.abspath(run_dir), 'metrics.json')}")
        return 0

    if DEFAULT_CONFIG is None:
        flags.mark_flag_as_required("config")
    app.run(run, argv=argv, flags_parser=flags_parser(DEFAULT_CONFIG, program=__name__))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation entry point (the installed ``m2sa-eval``; the program is m2sa_jax/main/eval.py):
gIoU / cIoU of a model on MMR or a referring benchmark.

    python eval.py --config configs/synthetic.py --config.eval.checkpoint=DIR \\
        --config.eval.dataset=mmr --config.eval.split=val|test_mixed|test_obj_only|test_part_only \\
        [--config.eval.protocol=teacher_forced|generate] [--workdir OUT]
"""

import sys

from m2sa_jax.hugepages import reexec_with_hugepage_malloc

if __name__ == "__main__":
    reexec_with_hugepage_malloc()   # before JAX loads: see m2sa_jax/hugepages.py

from m2sa_jax.main.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

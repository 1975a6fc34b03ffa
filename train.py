"""Training entry point (the installed ``m2sa-train``; the program is m2sa_jax/main/train.py).

    python train.py --config configs/synthetic.py [--config.train.steps=300 ...] [--workdir DIR]
    python train.py --config configs/m2sa_7b.py --config.model.llava_checkpoint=DIR \\
        --config.model.sam_checkpoint=DIR --config.data.mmr_root=... --workdir DIR

With no --config, trains the synthetic demo (configs/synthetic.py); --help lists the flags.
"""

import sys

from m2sa_jax.hugepages import reexec_with_hugepage_malloc

if __name__ == "__main__":
    reexec_with_hugepage_malloc()   # before JAX loads: see m2sa_jax/hugepages.py

from m2sa_jax.main.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

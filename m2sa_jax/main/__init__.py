"""The command-line programs, installed as console scripts (setup.cfg):

* ``m2sa-train`` — :mod:`m2sa_jax.main.train` (also ``python train.py``)
* ``m2sa-eval`` — :mod:`m2sa_jax.main.eval` (also ``python eval.py``)
* ``m2sa-segment`` — :mod:`m2sa_jax.segment`, ``m2sa-demo-sam`` — :mod:`m2sa_jax.demo_sam`,
  ``m2sa-export`` — :mod:`m2sa_jax.training.export`, ``m2sa-convert`` — ``checkpoints_convert``

Each also runs as ``python -m <module>``.
"""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The synthetic demo's config, when the package runs from a source checkout (configs/ is not
# installed with the package); None otherwise, and --config is then required.
DEFAULT_CONFIG = (os.path.join(_REPO, "configs", "synthetic.py")
                  if os.path.isfile(os.path.join(_REPO, "configs", "synthetic.py")) else None)



def quiet_libraries() -> None:
    """Warnings and errors only from absl logging (the checkpoint library logs every save and
    restore at INFO), unless the user passed --verbosity."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

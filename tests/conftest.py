"""Test-wide numerics: float32 parity tests run with exact (highest precision) matmuls.

Compiled programs are shared between tests (and the subprocesses they start) through JAX's
persistent compilation cache in a folder of this session: many tests train or evaluate the same
small models, and on 2 CPU cores XLA's compile of one train step takes 20–40 s. The folder is
new for every session and removed at its end, so no test ever sees another session's programs.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="m2sa-jax-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield


@pytest.fixture(scope="session")
def trained_ci_run(tmp_path_factory):
    """The learning demo's CI variant (configs/synthetic.py:ci, about 1.5 minutes on 2 idle
    cores) trained once per test session through the real loop; the tests that need a trained
    model share it. Returns the workdir, the data root, the config and the run's summary."""
    from m2sa_jax import config_file
    from m2sa_jax.evaluation.teacher_forced import split_evaluator
    from m2sa_jax.training.loop import train
    from tests.support import CONFIGS

    cfg = config_file.load(os.path.join(CONFIGS, "synthetic.py") + ":ci")
    tmp = tmp_path_factory.mktemp("ci_run")
    cfg.data.root = str(tmp / "data")
    cfg.workdir = str(tmp / "run")
    summary = train(cfg, cfg.workdir, evaluator=split_evaluator(cfg), progress=False)
    return dict(workdir=cfg.workdir, data_root=cfg.data.root, cfg=cfg, summary=summary)

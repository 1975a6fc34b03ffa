"""Test-wide numerics: float32 parity tests run with exact (highest precision) matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


_SYNTHETIC_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic.py")


def synthetic_config(arg=None):
    """``configs/synthetic.py`` (``arg`` picks the variant, e.g. ``"ci"``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthetic_config", _SYNTHETIC_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="session")
def trained_ci_run(tmp_path_factory):
    """The learning demo's CI run (``configs/synthetic.py:ci``, about 1.5 minutes on 2 idle
    cores), trained once per test session. Returns a namespace: ``workdir`` (train_log.jsonl,
    metrics.json, overlays/, checkpoints/), ``cfg`` (the config it was trained with, whose
    ``workdir`` and ``data.root`` point at this run) and ``summary`` (what ``train`` returned)."""
    import types

    from m2sa_jax.training.loop import train

    root = tmp_path_factory.mktemp("synthetic_ci")
    cfg = synthetic_config("ci")
    cfg.data.root = str(root / "data")
    cfg.workdir = str(root / "run")
    summary = train(cfg, cfg.workdir, progress=False)
    return types.SimpleNamespace(workdir=cfg.workdir, cfg=cfg, summary=summary)

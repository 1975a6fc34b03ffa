"""What the tests and the benchmarks share: PyTorch references and checkpoint writers, the real
LLaMA vocabulary, the tiny training run, the sharding worker, the dataset-root fixture.

Importable as ``tests.support`` from the repository root: pytest puts the root on ``sys.path``
(``pythonpath`` in pyproject.toml) and ``python -m bench.<script>`` run from the root does too.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")

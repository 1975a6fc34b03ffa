"""Where one jitted forward + gradients of the learning demo spends its time, per XLA operation
(JAX only), from a ``jax.profiler`` trace.

    python -m bench.op_profile [--config configs/synthetic.py] [--iters 3] [--depth 4] [--top 25]

XLA:CPU records one trace event per executed operation (a fusion, a dot, a copy). Each event
is mapped to its HLO instruction in the compiled module, whose ``op_name`` metadata says which
model module it came from and whether it belongs to the forward (``F``) or to the backward
(``B``: a ``transpose(...)`` in its name). The events are summed per module path, cut at
``--depth`` components below ``M2SA``, and per operation kind. Durations are CPU time summed
over the executor's threads (with 2 threads it can exceed the wall time), per iteration.
One batch of the config's training stream, everything trainable, as ``bench.grad_split``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from bench import common
from bench.train_step import REPO

_OP_NAME = re.compile(r"\n\s*%([\w.\-]+) = (\S+) [^\n]*?op_name=\"([^\"]*)\"")
_HOST_EVENTS = ("Thunk", "$", "Pjit", "Slinky", "Common", "Parse", "end:", "Alloc", "Handle")


def instruction_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name → (shape, op_name metadata) of a compiled module's text."""
    return {m.group(1): (m.group(2), m.group(3)) for m in _OP_NAME.finditer(hlo_text)}


def module_key(op_name: str, depth: int) -> str:
    """"F M2SA.segment/…/mask_decoder" from an op_name: forward or backward, then the module
    path without JAX's transformation wrappers, cut at ``depth`` components."""
    side = "B" if "transpose(" in op_name else "F"
    if "/M2SA/" in op_name:                        # below the model's top module
        op_name = op_name.split("/M2SA/", 1)[1]
    path = re.sub(r"transpose\(|jvp\(|vmap\(|jit\(|\)", "", op_name).split("/")
    path = [p for p in path if p and p != "<lambda>"]
    return f"{side} " + "/".join(path[:depth])


def summarise(events: list[dict], table: dict[str, tuple[str, str]], iters: int, depth: int):
    by_module, by_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(_HOST_EVENTS):
            continue
        name, dur_ms = e["name"], e.get("dur", 0) / 1000 / iters
        by_kind[re.sub(r"\.\d+$", "", name)] += dur_ms
        key = module_key(table[name][1], depth) if name in table else "(no metadata)"
        by_module[key] += dur_ms
        count[key] += 1 / iters
    return by_module, by_kind, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "synthetic.py"))
    parser.add_argument("--iters", type=int, default=3, help="traced calls after the warm-up")
    parser.add_argument("--depth", type=int, default=4, help="module path components kept")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import jax

    from bench.grad_split import demo_batch_and_loss

    jax.config.update("jax_default_matmul_precision", "highest")
    common.print_environment("per-operation profile of the demo's forward + gradients (JAX)",
                             workload=os.path.relpath(args.config, REPO))
    with tempfile.TemporaryDirectory() as tmp:
        flat, batch, loss_fn = demo_batch_and_loss(args.config)
        rng = jax.random.key(0)
        grad = jax.jit(jax.value_and_grad(lambda tr: loss_fn(tr, {}, batch, rng)[0]))
        compiled = grad.lower(flat).compile()
        table = instruction_table(compiled.as_text())
        jax.block_until_ready(compiled(flat))
        wall = []
        trace_dir = os.path.join(tmp, "trace")
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(flat))
            wall.append(time.perf_counter() - t0)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
        if not path:
            raise SystemExit(f"no perfetto trace written under {trace_dir}")
        with gzip.open(path[-1]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_module, by_kind, count = summarise(events, table, args.iters, args.depth)
    total = sum(by_module.values())
    print(f"\nforward + gradients: {sorted(wall)[len(wall) // 2] * 1000:.1f} ms wall per call "
          f"(traced); operations {sum(count.values()):.0f} per call, {total:.1f} ms of CPU time")
    print(f"\n{'CPU ms':>8} {'share':>6} {'ops':>5}  module (F forward, B backward)")
    for key, ms in by_module.most_common(args.top):
        print(f"{ms:8.2f} {ms / total:6.1%} {count[key]:5.0f}  {key}")
    print(f"\n{'CPU ms':>8} {'share':>6}  operation kind (ynn_fusion: dots and convolutions "
          "through YNNPACK)")
    for kind, ms in by_kind.most_common(12):
        print(f"{ms:8.2f} {ms / total:6.1%}  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the CPU benchmarks share: the environment they ran in, warm-up, repeats that alternate
between the sides being compared, and each side's median with its spread.

A figure is only worth quoting with the state of the machine it came from, so every benchmark
prints :func:`environment` first (library versions, thread settings, XLA flags, CPU count, load
average) and every timed side reports, besides its median and [min–max] over the repeats, the
process CPU time per wall second (user + system; system time far above a few percent means
threads are fighting over the cores) and the 1-minute load average over its repeats.

Sides are compared in one process, in rounds: each side is warmed up (JAX compiles) and then
timed once per round, in alternating order (A B, B A, A B, …), so a change of the machine's load
during the run falls on both. The speed ratio is quoted as the ratio of the medians and the
[min–max] of the per-round ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

# Environment variables that change how many threads a library starts or how they wait, and
# glibc's malloc settings (huge pages: m2sa_jax/hugepages.py).
THREAD_VARIABLES = ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                    "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                    "GLIBC_TUNABLES")


def add_arguments(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    """``--repeats``, ``--warmup`` and ``--threads`` (PyTorch's intra-op threads)."""
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed runs of each side, alternating (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs of each side first (JAX: includes the compile)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch intra-op threads (default: the CPU count)")


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def load_average() -> float:
    """The 1-minute load average (runnable processes, all users)."""
    return os.getloadavg()[0]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", "?")


def environment() -> dict[str, str]:
    """What a reader needs to judge a timing: versions, threads, flags, CPUs, load."""
    env: dict[str, str] = {}
    env["python"] = platform.python_version()
    env["cpu"] = f"{_cpu_model()}; os.cpu_count() {os.cpu_count()}"
    if hasattr(os, "sched_getaffinity"):
        env["cpu"] += f", usable by this process {len(os.sched_getaffinity(0))}"
    env["load average (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = {m: _version(m) for m in ("jax", "jaxlib", "flax", "numpy", "torch",
                                         "transformers")}
    env["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    if "jax" in sys.modules or versions["jax"]:
        import jax

        devices = jax.devices()
        env["jax"] = (f"{len(devices)} × {devices[0].platform} device(s); "
                      f"default_matmul_precision={jax.config.jax_default_matmul_precision}")
    if versions["torch"]:
        import torch

        info = torch.__config__.parallel_info().splitlines()
        backend = next((ln.split(":", 1)[1].strip() for ln in info
                        if ln.startswith("ATen parallel backend")), "?")
        env["torch"] = (f"intra-op threads {torch.get_num_threads()}, inter-op threads "
                        f"{torch.get_num_interop_threads()}, parallel backend {backend}")
    for var in THREAD_VARIABLES:
        env[var] = os.environ.get(var, "(unset)")
    return env


def print_environment(title: str, **extra: Any) -> None:
    print(title)
    for k, v in {**environment(), **{k.replace("_", " "): str(v) for k, v in extra.items()}}.items():
        print(f"  {k}: {v}")
    sys.stdout.flush()


@dataclasses.dataclass
class Series:
    """The timed repeats of one side: wall seconds, process CPU seconds (user, system) and the
    1-minute load average at the end of each repeat."""

    name: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    user: list[float] = dataclasses.field(default_factory=list)
    system: list[float] = dataclasses.field(default_factory=list)
    loads: list[float] = dataclasses.field(default_factory=list)
    result: Any = None                                  # what the last repeat returned

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def rate(self, units: float) -> tuple[float, float, float]:
        """units per second: (median, min, max) over the repeats."""
        rates = [units / s for s in self.seconds]
        return statistics.median(rates), min(rates), max(rates)

    def cpu_per_wall(self) -> tuple[float, float]:
        """(user + system) / wall and system / (user + system), summed over the repeats."""
        cpu = sum(self.user) + sum(self.system)
        return cpu / max(sum(self.seconds), 1e-9), sum(self.system) / max(cpu, 1e-9)


def timed(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    """(wall s, user CPU s, system CPU s, fn's result) of one call."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, out


def alternate(sides: Mapping[str, Callable[[], Any]], repeats: int = 3,
              warmup: int = 1, progress: bool = True) -> dict[str, Series]:
    """Warm every side up, then time ``repeats`` rounds with the order reversed every round.

    Each callable must finish its work before returning (block on JAX results)."""
    names = list(sides)
    out = {n: Series(n) for n in names}
    for n in names:
        for _ in range(warmup):
            sides[n]()
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            wall, user, system, result = timed(sides[n])
            s = out[n]
            s.seconds.append(wall)
            s.user.append(user)
            s.system.append(system)
            s.loads.append(load_average())
            s.result = result
            if progress:
                print(f"    round {r + 1}/{repeats} {n}: {wall:.3f} s (load {s.loads[-1]:.2f})",
                      file=sys.stderr, flush=True)
    return out


def speed_ratio(fast: Series, slow: Series) -> tuple[float, float, float]:
    """How many times faster ``fast`` is than ``slow``: ratio of the medians, and the min / max
    of the per-round ratios (round r of one side against round r of the other)."""
    rounds = [b / a for a, b in zip(fast.seconds, slow.seconds)]
    return slow.median / fast.median, min(rounds), max(rounds)


def fmt_range(median: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{median:.{digits}g} [{lo:.{digits}g}–{hi:.{digits}g}]"


def report(series: Sequence[Series], *, units: float, unit: str, label_width: int = 34) -> None:
    """One line per side: median rate [min–max], median seconds per repeat, CPU use, load."""
    for s in series:
        med, lo, hi = s.rate(units)
        cpu, sys_share = s.cpu_per_wall()
        print(f"  {s.name:<{label_width}s} {fmt_range(med, lo, hi)} {unit}   "
              f"{s.median:.3g} s/repeat   CPU {cpu:.2f}×wall (system {sys_share:.0%})   "
              f"load {min(s.loads):.2f}–{max(s.loads):.2f}")


def report_ratio(fast: Series, slow: Series, label: str) -> tuple[float, float, float]:
    r = speed_ratio(fast, slow)
    print(f"  {label}: {fmt_range(*r)}× (median of {len(fast.seconds)} repeats [per-round "
          f"min–max])")
    return r

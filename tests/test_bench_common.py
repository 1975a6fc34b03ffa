"""bench/common.py: the rounds it times, the medians and ratios it quotes, what it prints."""

import itertools

import pytest

from bench import common


def test_alternate_warms_up_then_alternates_the_order():
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "AB"}
    runs = common.alternate(sides, repeats=3, warmup=2, progress=False)
    assert calls == ["A", "A", "B", "B",          # warm-up, not timed
                     "A", "B", "B", "A", "A", "B"]
    assert [len(s.seconds) for s in runs.values()] == [3, 3]
    assert runs["A"].result == 9 and runs["B"].result == 10     # the last timed call's result
    assert all(len(s.loads) == 3 and len(s.user) == 3 for s in runs.values())


def _series(name, seconds):
    s = common.Series(name)
    s.seconds = list(seconds)
    s.user, s.system, s.loads = [0.5] * len(seconds), [0.1] * len(seconds), [1.0] * len(seconds)
    return s


def test_rates_and_ratio_are_medians_with_per_round_spread():
    fast, slow = _series("fast", [1.0, 2.0, 4.0]), _series("slow", [3.0, 3.0, 6.0])
    assert fast.rate(8) == (4.0, 2.0, 8.0)
    ratio, lo, hi = common.speed_ratio(fast, slow)
    assert ratio == pytest.approx(3.0 / 2.0)                    # median over median
    assert (lo, hi) == (pytest.approx(1.5), pytest.approx(3.0))  # rounds: 3, 1.5, 1.5
    cpu, system_share = fast.cpu_per_wall()
    assert cpu == pytest.approx(1.8 / 7.0) and system_share == pytest.approx(0.3 / 1.8)


def test_report_prints_median_spread_cpu_and_load(capsys):
    fast, slow = _series("JAX", [1.0, 2.0, 4.0]), _series("PyTorch", [3.0, 3.0, 6.0])
    common.report([fast, slow], units=2, unit="samples/s", label_width=8)
    common.report_ratio(fast, slow, "speed JAX / PyTorch")
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["JAX", "1", "[0.5–2]"]
    assert "system 17%" in out[0] and "load 1.00–1.00" in out[0]
    assert out[2].strip() == ("speed JAX / PyTorch: 1.5 [1.5–3]× (median of 3 repeats "
                              "[per-round min–max])")


def test_environment_names_versions_threads_and_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    env = common.environment()
    assert env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    assert "jax" in env["versions"] and "torch" in env["versions"]
    assert "intra-op threads" in env["torch"] and "cpu" in env["jax"]
    assert list(itertools.islice(env, 1)) == ["python"]

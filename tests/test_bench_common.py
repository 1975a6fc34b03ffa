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


def test_op_profile_maps_trace_events_to_modules_forward_and_backward():
    """bench.op_profile: each executed operation is found in the compiled module's text and
    summed under its model module, forward or backward, per iteration."""
    from bench import op_profile

    hlo = """
  %ynn_fusion.7 = f32[18,4096,16]{2,1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(<lambda>)/jvp(M2SA.forward_batch)/M2SA/M2SA.segment/sam.decode/mask_decoder/mul" stack_frame_id=1}
  %copy.3 = f32[6,143]{1,0} copy(%c), metadata={op_name="jit(<lambda>)/transpose(jvp(M2SA.forward_batch))/M2SA/M2SA.language/language_model/layers_0/mlp" stack_frame_id=2}
"""
    table = op_profile.instruction_table(hlo)
    assert table["ynn_fusion.7"][0] == "f32[18,4096,16]{2,1,0}"
    events = [{"ph": "X", "name": "ynn_fusion.7", "dur": 3000}, {"ph": "X", "name": "ynn_fusion.7", "dur": 1000},
              {"ph": "X", "name": "copy.3", "dur": 500}, {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e9},
              {"ph": "X", "name": "wrapped_broadcast.2", "dur": 200}, {"ph": "i", "name": "copy.3"}]
    by_module, by_kind, count = op_profile.summarise(events, table, iters=2, depth=2)
    assert by_module == {"F M2SA.segment/sam.decode": 2.0, "B M2SA.language/language_model": 0.25,
                         "(no metadata)": 0.1}
    assert by_kind == {"ynn_fusion": 2.0, "copy": 0.25, "wrapped_broadcast": 0.1}
    assert count["F M2SA.segment/sam.decode"] == 1

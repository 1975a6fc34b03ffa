"""The weighted mixture: ratios over many draws, determinism in (seed, draw), bad-record redraws."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from m2sa_jax.data.loader import Loader
from m2sa_jax.data.mixed import PAPER_RATIOS, MixedSource, training_mixture
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import BadRecord, Sample
from tests.support.dataset_root import DATASET_HW, DATASET_POLYGON, write_dataset_root


class CountingSource:
    """A tiny source: ``n`` images, sample = its name and index, bad where ``bad(index)``."""

    def __init__(self, name, n, bad=lambda i: False):
        self.name, self.n, self.bad = name, n, bad

    def __len__(self):
        return self.n

    def sample(self, index, rng):
        if self.bad(index):
            raise BadRecord("broken", f"{self.name} record {index}: broken on purpose")
        k = int(rng.integers(1, 4))
        return Sample(source=self.name, record_id=f"{self.name}:{index}", image_path=f"{index}.jpg",
                      questions=[f"q{j}" for j in range(k)], answers=["[SEG]."] * k, masks=[[] for _ in range(k)])


def _mixture(seed=0, **kw):
    groups = {"sem_seg": [CountingSource("ade20k", 5), CountingSource("cocostuff", 7)],
              "refer_seg": [CountingSource("refcoco", 11)],
              "vqa": [CountingSource("vqa", 3)],
              "mmr": [CountingSource("mmr", 13)]}
    return MixedSource(groups, PAPER_RATIOS, seed=seed, draws_per_epoch=10_000, **kw)


def test_paper_ratios_in_public_order():
    assert list(PAPER_RATIOS) == ["sem_seg", "refer_seg", "vqa", "mmr"]
    assert list(PAPER_RATIOS.values()) == [2.0, 9.0, 2.0, 6.0]


def test_ratios_over_many_draws():
    mix = _mixture(seed=3)
    n = len(mix)
    groups = [mix[i].extra["group"] for i in range(n)]
    counts = {g: groups.count(g) for g in PAPER_RATIOS}
    total = sum(PAPER_RATIOS.values())
    for g, r in PAPER_RATIOS.items():
        p = r / total
        sigma = np.sqrt(n * p * (1 - p))
        assert abs(counts[g] - n * p) < 4 * sigma, (g, counts[g], n * p)
    members = [mix[i].source for i in range(2000) if mix[i].extra["group"] == "sem_seg"]
    share = members.count("ade20k") / len(members)
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / len(members))  # members drawn uniformly
    assert max(len(mix[i].questions) for i in range(200)) == 3


def test_deterministic_in_seed_and_draw():
    a, b, c = _mixture(seed=5), _mixture(seed=5), _mixture(seed=6)
    order = [17, 3, 999, 3, 0]
    ra = [(a[i].record_id, a[i].questions) for i in order]
    assert ra == [(b[i].record_id, b[i].questions) for i in reversed(order)][::-1]
    assert ra[1] == ra[3]
    assert [a[i].record_id for i in range(50)] != [c[i].record_id for i in range(50)]


def test_bad_records_are_redrawn_and_counted():
    groups = {"a": [CountingSource("a", 10, bad=lambda i: i % 2 == 0)], "b": [CountingSource("b", 10)]}
    mix = MixedSource(groups, {"a": 1, "b": 1}, seed=0, draws_per_epoch=400)
    samples = [mix[i] for i in range(len(mix))]
    assert all(int(s.record_id.split(":")[1]) % 2 == 1 for s in samples if s.source == "a")
    # every record left out travels with the sample drawn instead: source, reason, record
    events = [e for s in samples for e in s.skip_events]
    assert len(events) > 50
    assert {(e.source, e.reason) for e in events} == {("a", "broken")}
    assert all(int(e.record.split()[-1]) % 2 == 0 for e in events)
    assert [mix[i].skip_events for i in range(20)] == [s.skip_events for s in samples[:20]]

    # counted once per sample the loader hands out, into the run's counter, by source
    skips = SkipCounter()
    used = list(Loader(mix, seed=1, shuffle=False, shard_index=0, shard_count=1, skips=skips))
    assert len(used) == len(mix)
    assert skips.per_source() == {"a": {"broken": len(events)}}
    assert "a: broken" in skips.summary()

    hopeless = MixedSource({"a": [CountingSource("a", 4, bad=lambda i: True)]}, {"a": 1}, seed=0,
                           draws_per_epoch=1, max_retries=3)
    with pytest.raises(BadRecord) as e:
        hopeless[0]
    assert e.value.reason == "retries_exhausted" and "draw 0" in str(e.value)
    assert len(e.value.skip_events) == 4
    skips = SkipCounter()
    assert list(Loader(hopeless, seed=0, shard_index=0, shard_count=1, skips=skips)) == []
    assert skips.per_source() == {"a": {"broken": 4}, "mixture": {"retries_exhausted": 1}}


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="differ"):
        MixedSource({"a": [CountingSource("a", 1)]}, {"b": 1}, seed=0, draws_per_epoch=1)
    with pytest.raises(ValueError, match="empty"):
        MixedSource({"a": [CountingSource("a", 0)]}, {"a": 1}, seed=0, draws_per_epoch=1)


def test_training_mixture_from_dataset_root(tmp_path):
    """All four groups opened from one root in the documented layout, drawn 2:9:2:6."""

    root = tmp_path
    h, w = DATASET_HW
    polygon = DATASET_POLYGON
    write_dataset_root(root)

    mix = training_mixture(str(root), seed=0, draws_per_epoch=600, sem_seg=("ade20k",), refer_seg=("refcoco",))
    samples = [mix[i] for i in range(len(mix))]
    by_group = {g: [s for s in samples if s.extra["group"] == g] for g in PAPER_RATIOS}
    assert {s.source for s in samples} == {"ade20k", "refcoco", "vqa", "mmr"}
    assert len(by_group["refer_seg"]) > len(by_group["mmr"]) > len(by_group["vqa"])
    ade, ref, vqa, mmr = (by_group[g][0] for g in ("sem_seg", "refer_seg", "vqa", "mmr"))
    assert [m.label for ms in ade.masks for m in ms] == ["sky"]  # stored 3 → class 2
    assert ref.masks[0][0].decode().sum() == mask_utils.area(mask_utils.frPyObjects(polygon, h, w))[0]
    assert vqa.answers == ["A test."] and vqa.masks == [[]]
    assert mmr.answers == ["The mug [SEG]."] and mmr.masks[0][0].decode().all()
    assert "What holds the coffee?" in mmr.questions[0]

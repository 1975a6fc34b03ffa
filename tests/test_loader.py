"""The grain-based loader: determinism, resume equality, per-host sharding, bad-record skips."""

import json

import pytest

from m2sa_jax.data.loader import Loader
from m2sa_jax.data.mixed import MixedSource
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.types import BadRecord, Sample

N = 50


class Records:
    """Random-access records 0..n-1; ``bad`` indices raise BadRecord."""

    def __init__(self, n=N, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise BadRecord("corrupt", f"records[{i}]: corrupt on purpose")
        return {"index": int(i)}


def decode(record):
    if record["index"] == 13:
        raise BadRecord("undecodable", "record 13: cannot be decoded")
    return record["index"] * 10


def _indices(it, k=None):
    return [x for _, x in zip(range(k), it)] if k is not None else list(it)


def test_deterministic_and_seed_dependent():
    a = _indices(iter(Loader(Records(), seed=1, transform=decode)))
    b = _indices(iter(Loader(Records(), seed=1, transform=decode)))
    c = _indices(iter(Loader(Records(), seed=2, transform=decode)))
    assert a == b and a != c
    assert sorted(a) == [i * 10 for i in range(N) if i != 13]
    assert a != sorted(a)  # shuffled


@pytest.mark.parametrize("k", [0, 7, 30])
def test_resume_equals_uninterrupted(k):
    make = lambda: Loader(Records(bad={3, 41}), seed=4, transform=decode, num_epochs=2)  # noqa: E731
    full = _indices(iter(make()))
    it = iter(make())
    head = _indices(it, k)
    state = it.get_state()
    assert len(state) < 2000 and json.loads(state)  # small, serialisable with the checkpoint
    fresh = iter(make())
    fresh.set_state(state)
    assert head + _indices(fresh) == full
    assert fresh.skipped == {"corrupt": 4, "undecodable": 2}


def test_resume_across_epochs_beyond_first():
    make = lambda: Loader(Records(n=9), seed=0, num_epochs=None)  # noqa: E731
    it = iter(make())
    first = _indices(it, 20)
    fresh = iter(make())
    fresh.set_state(it.get_state())
    cont = _indices(fresh, 10)
    ref = _indices(iter(make()), 30)
    assert first + cont == ref
    assert sorted(x["index"] for x in ref[:9]) == list(range(9))


def test_two_hosts_cover_every_record_once():
    hosts = [_indices(iter(Loader(Records(n=N + 3), seed=9, shard_index=h, shard_count=2))) for h in range(2)]
    seen = [x["index"] for h in hosts for x in h]
    assert sorted(seen) == list(range(N + 3))
    assert set(x["index"] for x in hosts[0]).isdisjoint(x["index"] for x in hosts[1])
    assert abs(len(hosts[0]) - len(hosts[1])) <= 1


def test_bad_records_skipped_and_counted():
    skips = SkipCounter()
    it = iter(Loader(Records(bad={0, 5}), seed=3, transform=decode, skips=skips))
    out = _indices(it)
    assert len(out) == N - 3
    assert it.skipped == {"corrupt": 2, "undecodable": 1}
    assert dict(skips.counts) == {"corrupt": 2, "undecodable": 1}
    assert sorted(rid for rid, _ in skips.examples["corrupt"]) == ["record 0", "record 5"]
    assert skips.examples["undecodable"] == [("record 13", "record 13: cannot be decoded")]
    host1 = SkipCounter()
    list(Loader(Records(bad={0, 5}), seed=3, shard_index=1, shard_count=2, skips=host1))
    assert host1.examples["corrupt"][0][0] == "record 5"  # named by its index in the whole source


@pytest.mark.multiprocess
def test_worker_processes_match_in_process_and_resume():
    make = lambda w: Loader(Records(bad={2}), seed=5, transform=decode, worker_count=w)  # noqa: E731
    ref = _indices(iter(make(0)))
    it = iter(make(1))
    head = _indices(it, 11)
    state = it.get_state()
    rest = _indices(it)
    assert head + rest == ref and it.skipped == {"corrupt": 1, "undecodable": 1}
    fresh = iter(make(1))  # grain's state records the worker count: resume with the same
    fresh.set_state(state)
    assert head + _indices(fresh) == ref


class TinySource:
    name = "tiny"

    def __len__(self):
        return 4

    def sample(self, index, rng):
        return Sample(source="tiny", record_id=f"tiny:{index}", image_path=f"{index}.jpg",
                      questions=[str(int(rng.integers(1000)))], answers=["[SEG]."], masks=[[]])


def test_mixture_through_loader_resumes():
    mix = MixedSource({"a": [TinySource()], "b": [TinySource()]}, {"a": 1, "b": 3}, seed=11, draws_per_epoch=40)
    key = lambda s: (s.extra["draw"], s.extra["group"], s.record_id, s.questions[0])  # noqa: E731
    full = [key(s) for s in Loader(mix, seed=0)]
    it = iter(Loader(mix, seed=0))
    head = [key(s) for s in _indices(it, 15)]
    fresh = iter(Loader(mix, seed=0))
    fresh.set_state(it.get_state())
    assert head + [key(s) for s in fresh] == full
    assert sorted(d for d, *_ in full) == list(range(40))

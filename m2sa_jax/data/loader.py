"""Deterministic, resumable, host-sharded loading on top of any random-access source.

Built on grain's ``DataLoader``: a seeded ``IndexSampler`` fixes the order of record
indices for every epoch, ``ShardOptions`` gives each host (``jax.process_index()`` of
``jax.process_count()`` by default) a disjoint slice of the indices, so every record is
seen on exactly one host per epoch, and decoding runs in ``worker_count`` worker processes
(0: in this process, with ``read_threads`` threads reading the source).

Resuming: ``iterator.get_state()`` is a small JSON byte string (grain's sampler position
plus the skip counts) to store next to the training checkpoint; a fresh loader built with
the same arguments and given that state with ``set_state`` continues exactly where the old
one stopped.

Bad records: a ``BadRecord`` raised by the source or the transform does not crash the
loader; the record is skipped and counted by reason (``iterator.skipped``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Protocol

import grain

from m2sa_jax.data.types import BadRecord


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a bad record on its way back from a worker."""

    reason: str
    message: str


class _Guarded(RandomAccessSource):
    """Source whose bad records come back as :class:`Skipped` instead of raising."""

    def __init__(self, source: RandomAccessSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.source[index]
        except BadRecord as e:
            return Skipped(e.reason, str(e))

    def __repr__(self) -> str:
        # grain checks this string when restoring a state: it must not contain an address.
        kind = type(self.source)
        own = kind.__repr__ is not object.__repr__
        return f"Guarded({self.source!r})" if own else f"Guarded({kind.__module__}.{kind.__qualname__}, n={len(self)})"


class _GuardedMap(grain.transforms.Map):
    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def map(self, element):
        if isinstance(element, Skipped):
            return element
        try:
            return self.fn(element)
        except BadRecord as e:
            return Skipped(e.reason, str(e))


def shard_options(shard_index: int | None = None, shard_count: int | None = None,
                  drop_remainder: bool = False) -> grain.sharding.ShardOptions:
    """This host's shard: explicit, or ``jax.process_index()`` / ``jax.process_count()``."""
    if shard_index is None and shard_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} / shard_count {shard_count}: give both, with 0 ≤ index < count")
    return grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=drop_remainder)


class Loader:
    """Iterable over ``transform(source[i])`` for a seeded, sharded order of indices ``i``."""

    def __init__(self, source: RandomAccessSource, *, seed: int, transform: Callable[[Any], Any] | None = None,
                 shuffle: bool = True, num_epochs: int | None = 1, shard_index: int | None = None,
                 shard_count: int | None = None, drop_remainder: bool = False, worker_count: int = 0,
                 worker_buffer_size: int = 2, read_threads: int = 4, prefetch: int = 16):
        self.source = source
        options = shard_options(shard_index, shard_count, drop_remainder)
        sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=options,
                                              shuffle=shuffle, num_epochs=num_epochs, seed=seed)
        operations = [_GuardedMap(transform)] if transform is not None else []
        self._loader = grain.DataLoader(
            data_source=_Guarded(source), sampler=sampler, operations=operations,
            worker_count=worker_count, worker_buffer_size=worker_buffer_size,
            read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))

    def __iter__(self) -> "LoaderIterator":
        return LoaderIterator(iter(self._loader))


class LoaderIterator(Iterator[Any]):
    def __init__(self, inner):
        self._inner = inner
        self.skipped: dict[str, int] = {}
        self.last_skip_message = ""

    def __next__(self):
        while True:
            element = next(self._inner)
            if isinstance(element, Skipped):
                self.skipped[element.reason] = self.skipped.get(element.reason, 0) + 1
                self.last_skip_message = element.message
                continue
            return element

    def get_state(self) -> bytes:
        """Position after the last element returned; small JSON, store it with the checkpoint."""
        return json.dumps({"grain": self._inner.get_state().decode("utf-8"),
                           "skipped": self.skipped}, sort_keys=True).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        try:
            payload = json.loads(state)
            inner = payload["grain"].encode("utf-8")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"loader state is not one written by LoaderIterator.get_state ({e}); "
                             "pass the bytes saved with the checkpoint unchanged") from e
        self._inner.set_state(inner)
        self.skipped = dict(payload.get("skipped", {}))

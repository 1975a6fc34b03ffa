"""Deterministic, resumable, host-sharded loading on top of any random-access source.

Built on grain's ``DataLoader``. Each host (``jax.process_index()`` of
``jax.process_count()`` by default) owns the records ``host, host + hosts, …`` (a
:class:`HostShard`), so every record is seen on exactly one host per epoch; a seeded
``IndexSampler`` shuffles the host's share anew each epoch; decoding runs in
``worker_count`` worker processes (0: in this process, with ``read_threads`` threads
reading the source).

Resuming: ``iterator.get_state()`` is a small JSON byte string (grain's sampler position
plus the skip counts) to store next to the training checkpoint; a fresh loader built with
the same arguments and given that state with ``set_state`` continues exactly where the old
one stopped. The state names the worker count, the sampler and the source, so restore
with the same ``worker_count``, seed, epochs, shard and source (grain refuses otherwise).

Bad records: a ``BadRecord`` raised by the source or the transform does not crash the
loader; the record is skipped and counted by reason (``iterator.skipped``, part of the state)
and reported, with its source, to the data package's :class:`~m2sa_jax.data.skips.SkipCounter`
when one is given. Records an element's source left out on the way to it (its
``skip_events``, e.g. the mixture's redraws; or those of a ``BadRecord`` that ends the draw)
are counted the same way when the element is consumed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Protocol

import grain
import jax
from absl import flags

from m2sa_jax.data.skips import SkipCounter, SkipEvent
from m2sa_jax.data.types import BadRecord


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a bad record on its way back from a reader thread or worker process:
    its own skip last, after those left out on the way to it."""

    events: tuple[SkipEvent, ...]

    @property
    def reason(self) -> str:
        return self.events[-1].reason


class _Guarded(RandomAccessSource):
    """``transform(source[i])``, with bad records returned as :class:`Skipped` instead of raised.

    Reading and transforming both happen here, so they run where grain reads records: in its
    read threads (``worker_count=0``) or in its worker processes.
    """

    def __init__(self, source: RandomAccessSource, transform: Callable[[Any], Any] | None):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            element = self.source[index]
            return self.transform(element) if self.transform is not None else element
        except BadRecord as e:
            where = self.source.global_index(index) if isinstance(self.source, HostShard) else index
            return Skipped(e.skip_events + (SkipEvent.from_error(e, e.record or f"record {where}"),))

    def __repr__(self) -> str:
        return f"Guarded({_describe(self.source)})"


class HostShard(RandomAccessSource):
    """Records ``shard_index, shard_index + shard_count, …`` of ``source``: this host's share.

    Strided, so the shares of all hosts partition the records and differ in size by at most
    one (grain's own contiguous sharding loses a record when the count does not divide).
    """

    def __init__(self, source: RandomAccessSource, shard_index: int, shard_count: int):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} / shard_count {shard_count}: need 0 ≤ index < count")
        if len(source) < shard_count:
            raise ValueError(f"{len(source)} records cannot feed {shard_count} hosts; use a larger source")
        self.source, self.shard_index, self.shard_count = source, shard_index, shard_count

    def __len__(self) -> int:
        return (len(self.source) - self.shard_index + self.shard_count - 1) // self.shard_count

    def global_index(self, index: int) -> int:
        return self.shard_index + index * self.shard_count

    def __getitem__(self, index: int):
        return self.source[self.global_index(index)]

    def __repr__(self) -> str:
        return f"HostShard({_describe(self.source)}, {self.shard_index}/{self.shard_count})"


def _describe(source) -> str:
    # grain compares this string when restoring a state: it must not contain an address.
    kind = type(source)
    if kind.__repr__ is not object.__repr__:
        return repr(source)
    return f"{kind.__module__}.{kind.__qualname__}(n={len(source)})"


def host_share(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(index, count) of this host: as given, or ``jax.process_index()``/``process_count()``."""
    if shard_index is None and shard_count is None:
        return jax.process_index(), jax.process_count()
    if shard_index is None or shard_count is None:
        raise ValueError("give both shard_index and shard_count, or neither (then jax's process index/count)")
    return shard_index, shard_count


def _allow_worker_processes() -> None:
    # grain's worker processes read absl flags; outside an absl app they are unparsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class Loader:
    """Iterable over ``transform(source[i])`` for a seeded, sharded order of indices ``i``."""

    def __init__(self, source: RandomAccessSource, *, seed: int, transform: Callable[[Any], Any] | None = None,
                 shuffle: bool = True, num_epochs: int | None = 1, shard_index: int | None = None,
                 shard_count: int | None = None, worker_count: int = 0, worker_buffer_size: int = 2,
                 read_threads: int = 4, prefetch: int = 16, skips: SkipCounter | None = None):
        self.shard = HostShard(source, *host_share(shard_index, shard_count))
        sampler = grain.samplers.IndexSampler(num_records=len(self.shard), shuffle=shuffle,
                                              num_epochs=num_epochs, seed=seed)
        if worker_count > 0:
            _allow_worker_processes()
        self.skips = skips
        self._loader = grain.DataLoader(
            data_source=_Guarded(self.shard, transform), sampler=sampler,
            worker_count=worker_count, worker_buffer_size=worker_buffer_size,
            read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))

    def __iter__(self) -> "LoaderIterator":
        return LoaderIterator(iter(self._loader), self.skips)


class LoaderIterator(Iterator[Any]):
    def __init__(self, inner, skips: SkipCounter | None = None):
        self._inner = inner
        self._skips = skips
        self.skipped: dict[str, int] = {}
        self.last_skip_message = ""

    def __next__(self):
        while True:
            element = next(self._inner)
            if isinstance(element, Skipped):
                self._count(element.events)
                self.last_skip_message = element.events[-1].message
                continue
            self._count(getattr(element, "skip_events", ()))
            return element

    def _count(self, events) -> None:
        for event in events:
            self.skipped[event.reason] = self.skipped.get(event.reason, 0) + 1
            if self._skips is not None:
                self._skips.add_event(event)

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

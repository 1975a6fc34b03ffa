"""The training input stream: seeded, resumable batches of fixed shape from an MMR-format split
or any random-access source of samples (the training mixture, ``data.mixed.MixedSource``).

Record ``i`` of a virtual ``epochs × records`` range is record ``i % n`` with its questions
drawn by a generator seeded with ``(seed, i)``, so an item is a pure function of its index
(a source without ``sample(index, rng)`` — e.g. the mixture — must already be one: item
``i`` is ``source[i % n]``); grain (``data.loader.Loader``) shuffles and shards the range and
its state is the whole iterator state. Each batch takes exactly ``images_per_batch``
examples, so nothing is held back between batches and the saved state resumes exactly.
Examples that cannot fit the static shapes are skipped and counted (by source and reason),
never truncated; images larger than the mask canvas are scored on a reduced grid
(``data.pipeline``, module doc), so no source is lost to its image size.

Several hosts: host ``h`` of ``n`` reads only its share of the range (records ``h, h+n, …``,
``data.loader.HostShard``) and builds only its part of each global batch: ``images/n`` images
and ``conversations/n`` conversations, its image indices local. ``sharding.put_host_batch``
assembles the global batch from the hosts' parts (and makes the image indices global). Every
record a host reads is trained on; none is read by two hosts.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from m2sa_jax.data.loader import Loader, RandomAccessSource, host_share
from m2sa_jax.data.mmr import MMRDataset
from m2sa_jax.data.pipeline import BatchShapes, collate, prepare_example
from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.data.tokenizer import LegacyLlamaTokenizer
from m2sa_jax.data.types import BadRecord


class EpochSource:
    """Random access over ``epochs`` passes of a dataset, each item seeded by its index.

    ``dataset`` is an MMRDataset (or any source with ``sample(index, rng)``: item ``i`` draws
    its questions with a generator seeded by ``(seed, i)``), or a random-access source whose
    ``source[i]`` already is a pure function of ``i`` (``MixedSource``, seeded by its own seed;
    its passes repeat the same draws, so give it enough draws for one pass instead).
    """

    def __init__(self, dataset: MMRDataset | RandomAccessSource, epochs: int, seed: int):
        if len(dataset) == 0:
            raise ValueError(f"{_name(dataset)}: no usable records")
        self.dataset, self.epochs, self.seed = dataset, epochs, seed
        self.seeded_here = callable(getattr(dataset, "sample", None))

    def __len__(self) -> int:
        return len(self.dataset) * self.epochs

    def __getitem__(self, index: int):
        if not self.seeded_here:
            return self.dataset[index % len(self.dataset)]
        rng = np.random.default_rng([self.seed, index])
        return self.dataset.sample(index % len(self.dataset), rng)

    def __repr__(self) -> str:
        # compared by grain when a state is restored: no addresses in it
        return f"EpochSource({_name(self.dataset)}, epochs={self.epochs}, seed={self.seed})"


def _name(dataset) -> str:
    path = getattr(dataset, "json_path", None)
    if path is not None:
        return str(path)
    return f"{type(dataset).__qualname__}(n={len(dataset)}, seed={getattr(dataset, 'seed', None)})"


@dataclasses.dataclass
class StreamConfig:
    shapes: BatchShapes
    sam_size: int
    clip_size: int
    max_length: int | None
    read_threads: int = 2


def host_shapes(shapes: BatchShapes, shard_count: int) -> BatchShapes:
    """One host's part of a global batch of ``shapes`` split over ``shard_count`` hosts."""
    if shapes.images % shard_count or shapes.conversations % shard_count:
        raise ValueError(f"a batch of {shapes.images} images / {shapes.conversations} "
                         f"conversations does not split over {shard_count} hosts; make "
                         "data.images_per_batch a multiple of the number of hosts")
    return dataclasses.replace(shapes, images=shapes.images // shard_count,
                               conversations=shapes.conversations // shard_count)


class TrainStream:
    """Iterator of collated batches with ``get_state``/``set_state`` for checkpoints.

    ``cfg.shapes`` is the global batch; on host ``shard_index`` of ``shard_count`` (default:
    ``jax.process_index()`` of ``jax.process_count()``) each batch is this host's part of it
    (module doc). Masks are uint8 coverage (``collate(coverage=True)``).
    """

    def __init__(self, dataset: MMRDataset | RandomAccessSource,
                 tokenizer: LegacyLlamaTokenizer, cfg: StreamConfig, *, seed: int, epochs: int,
                 skips: SkipCounter | None = None, shard_index: int | None = None,
                 shard_count: int | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.skips = skips if skips is not None else SkipCounter()
        shard_index, shard_count = host_share(shard_index, shard_count)
        self.shapes = shapes = host_shapes(cfg.shapes, shard_count)

        def transform(sample):
            try:
                ex = prepare_example(sample, tokenizer, sam_size=cfg.sam_size,
                                     clip_size=cfg.clip_size, max_length=cfg.max_length,
                                     canvas_hw=cfg.shapes.mask_hw)
            except BadRecord as e:
                e.source = e.source or sample.source
                e.record = e.record or sample.record_id
                e.skip_events = tuple(sample.skip_events) + e.skip_events
                raise
            why = shapes.fits(ex)
            if why is not None:
                raise BadRecord("does_not_fit_batch", f"{ex.record_id}: {why}", sample.source,
                                sample.record_id, skip_events=sample.skip_events)
            return ex

        self.loader = Loader(EpochSource(dataset, epochs, seed), seed=seed, transform=transform,
                             shuffle=True, num_epochs=1, shard_index=shard_index,
                             shard_count=shard_count, read_threads=cfg.read_threads,
                             skips=self.skips)
        self._it = iter(self.loader)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        examples = [next(self._it) for _ in range(self.shapes.images)]
        return collate(examples, self.shapes, self.tokenizer.pad_token_id, coverage=True)

    def get_state(self) -> bytes:
        return self._it.get_state()

    def set_state(self, state: bytes) -> None:
        self._it.set_state(state)

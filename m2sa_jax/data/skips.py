"""Counting the records a loader leaves out, so nothing is dropped silently.

Every loader (readers, the tokenising pipeline, the training mixture) reports a bad record to a
:class:`SkipCounter` with a short reason key, the source it came from ("mmr", "mapillary", ...)
and a message naming the file and the record. In strict mode the first report raises instead,
with that message.

A record left out on the way to another one (the mixture redraws after a bad record) travels
with the record finally used as a :class:`SkipEvent` (``Sample.skip_events``) and is counted
when that record is consumed, so a run's counts do not depend on how far its readers had
prefetched.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

from m2sa_jax.data.types import BadRecord

UNKNOWN_SOURCE = "unknown"


@dataclasses.dataclass(frozen=True)
class SkipEvent:
    """One record left out: where it came from, why, which one, and the full message."""

    source: str
    reason: str
    record: str
    message: str

    @classmethod
    def from_error(cls, error: BadRecord, record: str, source: str = "") -> "SkipEvent":
        return cls(error.source or source or UNKNOWN_SOURCE, error.reason, record, str(error))


@dataclasses.dataclass
class SkipCounter:
    """Counts per reason and per (source, reason), plus the first ``keep`` record ids (and
    messages) of each reason."""

    strict: bool = False
    keep: int = 5
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    by_source: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, record_id: str, message: str, source: str = "") -> None:
        if self.strict:
            raise BadRecord(reason, message, source)
        with self._lock:
            self.counts[reason] += 1
            self.by_source[(source or UNKNOWN_SOURCE, reason)] += 1
            if len(self.examples[reason]) < self.keep:
                self.examples[reason].append((record_id, message))

    def add_error(self, error: BadRecord, record_id: str, source: str = "") -> None:
        self.add(error.reason, record_id, str(error), error.source or source)

    def add_event(self, event: SkipEvent) -> None:
        self.add(event.reason, event.record, event.message, event.source)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipCounter") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = self.keep - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][:max(room, 0)])
        self.by_source.update(other.by_source)

    def per_source(self) -> dict[str, dict[str, int]]:
        """``{source: {reason: count}}``, sources and reasons sorted (what a run's summary and
        metrics.json report)."""
        out: dict[str, dict[str, int]] = {}
        for (source, reason), n in sorted(self.by_source.items()):
            out.setdefault(source, {})[reason] = n
        return out

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        lines = [f"{self.total} records skipped:"]
        for reason, n in self.counts.most_common():
            ids = ", ".join(rid for rid, _ in self.examples[reason])
            lines.append(f"  {reason}: {n} (e.g. {ids})")
        lines.append("by source:")
        for source, reasons in self.per_source().items():
            lines.append(f"  {source}: " + ", ".join(
                f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
        return "\n".join(lines)

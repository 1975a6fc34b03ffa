"""Counting the records a loader leaves out, so nothing is dropped silently.

Every loader (readers, the tokenising pipeline) reports a bad record to a :class:`SkipCounter`
with a short reason key and a message naming the file and the record. In strict mode the first
report raises instead, with that message.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

from m2sa_jax.data.types import BadRecord


@dataclasses.dataclass
class SkipCounter:
    """Counts per reason plus the first ``keep`` record ids (and messages) of each reason."""

    strict: bool = False
    keep: int = 5
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, record_id: str, message: str) -> None:
        if self.strict:
            raise BadRecord(reason, message)
        with self._lock:
            self.counts[reason] += 1
            if len(self.examples[reason]) < self.keep:
                self.examples[reason].append((record_id, message))

    def add_error(self, error: BadRecord, record_id: str) -> None:
        self.add(error.reason, record_id, str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipCounter") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = self.keep - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][:max(room, 0)])

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        lines = [f"{self.total} records skipped:"]
        for reason, n in self.counts.most_common():
            ids = ", ".join(rid for rid, _ in self.examples[reason])
            lines.append(f"  {reason}: {n} (e.g. {ids})")
        return "\n".join(lines)

"""The state of an evaluation in progress, kept so a killed run resumes where it stopped.

:class:`ResultsFile` is one JSON file replaced atomically (the metric accumulator, the skipped
records and the counters); :class:`RecordingSkips` remembers every skipped record id so a
resumed run does not read or count them again. Both protocols (teacher-forced and
generate-then-segment) save and restore through :func:`restore_or_start` / :func:`save_state`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from m2sa_jax.data.skips import SkipCounter
from m2sa_jax.evaluation.metrics import SegmentationMetrics

RESULTS_VERSION = 1


@dataclasses.dataclass
class RecordingSkips(SkipCounter):
    """A SkipCounter that also keeps every skipped record id (so a resumed run skips them
    without counting them again)."""

    ids: list = dataclasses.field(default_factory=list)

    def add(self, reason: str, record_id: str, message: str) -> None:
        super().add(reason, record_id, message)
        with self._lock:
            self.ids.append(record_id)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "ids": list(self.ids),
                "examples": {k: [list(e) for e in v] for k, v in self.examples.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RecordingSkips":
        s = cls()
        s.counts.update(state["counts"])
        s.ids = list(state["ids"])
        for k, v in state["examples"].items():
            s.examples[k] = [tuple(e) for e in v]
        return s


class ResultsFile:
    """The state of an evaluation in progress, one JSON file replaced atomically (write to a
    temporary file, fsync, rename): a run killed at any moment leaves the last complete save.

    ``key`` names the run (dataset, split, protocol, checkpoint); resuming from a file written
    for another key is refused.
    """

    def __init__(self, path: str, key: dict):
        self.path = os.path.abspath(path)
        self.key = dict(key)

    def load(self) -> dict | None:
        if not os.path.isfile(self.path):
            return None
        with open(self.path) as f:
            state = json.load(f)
        if state.get("version") != RESULTS_VERSION or state.get("key") != self.key:
            raise ValueError(
                f"{self.path}: results of another evaluation (key {state.get('key')}, this run "
                f"is {self.key}); delete the file or evaluate into another --workdir")
        return state

    def save(self, state: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(state, version=RESULTS_VERSION, key=self.key), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def empty_stats() -> dict:
    return dict(images=0, questions=0, masks=0, seconds=0.0, batches=0)


def restore_or_start(results: ResultsFile | None, metrics, skips):
    """(metrics, skips, stats, extra) from the results file if it holds a run, else fresh."""
    state = results.load() if results is not None else None
    if state is None:
        return (metrics if metrics is not None else SegmentationMetrics(),
                skips if skips is not None else RecordingSkips(), empty_stats(), {})
    return (SegmentationMetrics.from_state_dict(state["metrics"]),
            RecordingSkips.from_state_dict(state["skips"]), dict(state["stats"]),
            dict(state.get("extra", {})))


def save_state(results: ResultsFile | None, metrics, skips, stats, extra=None) -> None:
    if results is None:
        return
    results.save({"metrics": metrics.state_dict(), "stats": stats, "extra": extra or {},
                  "skips": skips.state_dict() if isinstance(skips, RecordingSkips) else
                  RecordingSkips(counts=skips.counts).state_dict()})

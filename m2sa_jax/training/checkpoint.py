"""Orbax checkpoints of a training run: state (parameters, LoRA, optimizer, step, RNG) plus the
data iterator's position, saved asynchronously every N steps and on SIGTERM, the last k kept.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save (even with SIGKILL) leaves the previous checkpoint intact; restoring picks the
latest complete step.
"""

from __future__ import annotations

import os
import signal

import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: bytes, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"loader": data_state.decode("utf-8")})), force=force)

    def restore(self, step: int, abstract_state):
        """(state laid out like ``abstract_state`` — shardings included, data_state bytes)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]["loader"].encode("utf-8")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopFlag:
    """Set by SIGTERM (and SIGINT): the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.stop = False
        self.signal = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:          # not the main thread (e.g. under a test runner thread)
                pass

    def _handler(self, signum, frame):
        self.stop = True
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a live tree, for a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)), tree)

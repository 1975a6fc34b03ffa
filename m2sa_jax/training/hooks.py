"""What ``train()`` does around each step, as named hooks: the metrics writer, checkpointing and
the stop rules. The end-of-run evaluation is a hook too, but it lives with the evaluation code
(:func:`m2sa_jax.evaluation.teacher_forced.split_evaluator`) and is handed to ``train()`` by its
caller (``train.py``), so training never imports evaluation.

A hook may implement ``on_step(step, state, metrics) -> stop reason or None`` and
``on_end(step, state, stopped)``; both are called in the order the hooks are listed.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from m2sa_jax.checkpoints.runs import RunCheckpoints
from m2sa_jax.training.checkpoint import StopFlag

TRAIN_LOG = "train_log.jsonl"      # one JSON line per step: step, lr, finite, loss terms
LOSS_TERMS = ("loss", "ce", "bce", "dice", "grad_norm")


class NonFiniteLoss(RuntimeError):
    pass


class TimeLimitExceeded(RuntimeError):
    """The run passed ``train.max_minutes`` before its last step. The limit is a guard against
    a run far slower than planned, never a way to end training early: a run trains its
    configured steps or fails with this error (its state saved, so running again continues)."""


class MetricsWriter:
    """Every step to ``workdir/train_log.jsonl`` (with the learning rate that update used);
    every ``log_every`` steps to TensorBoard and the progress bar (loss terms, lr, samples/s)."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, log_every: int,
                 schedule, progress: bool):
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self.schedule, self.log_every, self.total = schedule, log_every, total_steps
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.log = open(os.path.join(workdir, TRAIN_LOG), "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train",
                        disable=not progress, dynamic_ncols=True)
        self.losses: list[float] = []
        self.samples = 0
        self.nonfinite_steps = 0
        self.t0 = time.perf_counter()

    def on_step(self, step, state, m, batch) -> None:
        self.samples += int(np.asarray(batch["conv_valid"]).sum())
        self.losses.append(float(m["loss"]))
        self.nonfinite_steps += 0 if m["finite"] else 1
        lr = float(self.schedule(step - 1))          # the rate this step's update used
        self.log.write(json.dumps(dict(step=step, lr=lr, finite=bool(m["finite"]),
                                       **{k: float(m[k]) for k in LOSS_TERMS})) + "\n")
        self.log.flush()
        if step % self.log_every == 0 or step == self.total:
            rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
            for k in LOSS_TERMS:
                self.writer.add_scalar(f"train/{k}", float(m[k]), step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/samples_per_s", rate, step)
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}",
                                 bce=f"{m['bce']:.3f}", dice=f"{m['dice']:.3f}", lr=f"{lr:.2e}",
                                 sps=f"{rate:.1f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.log.close()
        self.writer.close()                      # flushed even when the run stops on an error

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


class Checkpointer:
    """Saves every ``every`` steps (asynchronously) and once more at the end if the last step
    was not saved; :meth:`close` waits for pending saves."""

    def __init__(self, ckpts: RunCheckpoints, every: int, start_step: int, stream):
        self.ckpts, self.every, self.saved, self.stream = ckpts, every, start_step, stream

    def on_step(self, step, state) -> None:
        if step % self.every == 0:
            self.ckpts.save(step, state, self.stream.get_state())
            self.saved = step

    def on_end(self, step, state) -> None:
        if self.saved != step:
            self.ckpts.save(step, state, self.stream.get_state(), force=True)
        self.ckpts.close()


class StopRules:
    """When a run stops before its configured steps: a signal (SIGTERM / SIGINT: save and
    exit), ``stop_after`` steps of this process (tests emulate a killed run with it), or too
    many non-finite steps in a row (raises :class:`NonFiniteLoss`). ``max_minutes`` of wall
    time is a guard, not a stop: past it the state is saved and :class:`TimeLimitExceeded`
    raised, so a run either does its configured steps or fails loudly."""

    def __init__(self, cfg, start_step: int, t_start: float, stop_after: int | None,
                 ckpts: RunCheckpoints, skips, stream):
        self.cfg, self.start_step, self.t_start = cfg, start_step, t_start
        self.stop_after, self.ckpts, self.skips, self.stream = stop_after, ckpts, skips, stream
        self.flag = StopFlag()

    def on_step(self, step, state) -> str | None:
        nonfinite = int(state["nonfinite"])
        if nonfinite >= self.cfg.train.max_nonfinite:
            self.ckpts.close()               # pending saves land before the run stops
            raise NonFiniteLoss(
                f"step {step}: the loss or its gradient was not finite for {nonfinite} steps in "
                f"a row (updates were skipped). Lower train.lr, check the data (skipped "
                f"records: {dict(self.skips.counts)}), or use float32 compute; the last good "
                f"state is in {self.ckpts.directory}.")
        if self.flag.stop or (self.stop_after is not None
                              and step - self.start_step >= self.stop_after):
            return self.flag.signal or "stop_after"
        minutes = (time.perf_counter() - self.t_start) / 60
        limit, total = self.cfg.train.get("max_minutes"), self.cfg.train.steps
        if limit and minutes > limit and step < total:
            self.ckpts.save(step, state, self.stream.get_state(), force=True)
            self.ckpts.close()               # the save lands before the run fails
            raise TimeLimitExceeded(
                f"step {step} of {total}: this run has taken {minutes:.1f} min, past "
                f"train.max_minutes={limit:g} (a guard against a run far slower than planned; "
                f"nothing was evaluated). Its state at step {step} is saved in "
                f"{self.ckpts.directory}: run the same command again to continue from there, "
                f"with --config.train.max_minutes=0 to train without the guard.")
        return None

    def close(self) -> None:
        self.flag.restore()

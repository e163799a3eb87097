"""Pipelines under a preemption notice (docs/reliability.md).

A training stage stopped by SIGTERM checkpoints and exits EXIT_PREEMPTED (75) with `"status": "preempted"`; a
pipeline that runs stages as their own processes reports that as a preemption (`StagePreempted`: the stage, its
checkpoint, and the command that resumes) and exits 75 itself, instead of calling it a failure. Re-running the same
pipeline command resumes: finished stages return their stored results ("cached"), and the preempted stage's job runs
with the same arguments, so Ray Train hands it the run's latest checkpoint.

SIGTERM to the pipeline process itself (`SigtermToStage`) is passed on to the stage process running at that moment,
which checkpoints and exits 75; no later stage starts.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.platform.runtime import EXIT_PREEMPTED


def stage_was_preempted(code: int, result: dict[str, Any] | None) -> bool:
    """Whether a stage job's exit status or result line says it stopped on a preemption notice."""
    return code == EXIT_PREEMPTED or (result or {}).get("status") == "preempted"


class StagePreempted(RuntimeError):
    """A stage stopped on a preemption notice: after a checkpoint when its `result` line names one, without one
    (a stage that keeps none, e.g. eval), or before it started (`log` None: the pipeline got SIGTERM between
    stages). `resume` is the command that carries on."""

    def __init__(self, stage: str, log: Path | None, result: dict[str, Any] | None, resume: str):
        self.stage = stage
        self.step = (result or {}).get("step")
        self.checkpoint = (result or {}).get("checkpoint")
        if log is None:
            what, then = f"stopped on SIGTERM before stage {stage} started", f"{stage} starts"
        elif self.checkpoint:
            what = f"stage {stage} was preempted (SIGTERM) with a checkpoint at step {self.step} in {self.checkpoint}"
            then = f"{stage} resumes from its checkpoint"
        else:
            what, then = f"stage {stage} was stopped by SIGTERM before it finished", f"{stage} runs again"
        where = f"\n  log: {log}" if log is not None else ""
        super().__init__(
            f"{what}{where}\n  resume with: {resume}\n  (finished stages are not redone; {then})"
        )

    def record(self) -> dict[str, Any]:
        """The pipeline's JSON result line."""
        return {
            "stage": "pipeline",
            "status": "preempted",
            "preempted_stage": self.stage,
            "step": self.step,
            "checkpoint": self.checkpoint,
            "error": str(self),
        }


class SigtermToStage:
    """While the pipeline runs (`installed()`, main thread only): SIGTERM sets `requested` and is sent on to the
    stage process in `child` (set by the caller while one runs). Leaving restores the previous handler."""

    def __init__(self) -> None:
        self.requested = False
        self.child: subprocess.Popen | None = None

    def handle(self, signum: int, frame: Any = None) -> None:
        self.requested = True
        child = self.child
        sys.stderr.write(
            f"pipeline: received signal {signum}; "
            + (
                f"passing it to the running stage (pid {child.pid}), which checkpoints and exits"
                if child is not None and child.poll() is None
                else "no later stage will start"
            )
            + "\n"
        )
        sys.stderr.flush()
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    @contextlib.contextmanager
    def installed(self) -> Iterator[SigtermToStage]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self.handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextlib.contextmanager
    def running(self, child: subprocess.Popen) -> Iterator[subprocess.Popen]:
        """Within the block, SIGTERM goes on to `child` (also one that arrived just before it started)."""
        self.child = child
        if self.requested and child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            yield child
        finally:
            self.child = None

"""Preemption: SIGTERM to a training job checkpoints at the next optimizer step and exits EXIT_PREEMPTED (75).

The signal reaches the driver (`python -m jobs.<stage>`); the Ray Train workers are other processes, possibly on
other nodes. The driver's handler writes the run's stop file (`<storage>/checkpoints/<run>/stop_requested`, a
local path or an object-store URI like the error file) and waits; every worker asks `StopPoller` after each
optimizer step. Rank 0 looks for the file (every step locally, at most once a second on an object store) and, with several workers, the answer
is all-reduced, so every rank stops at the same step and writes one checkpoint together. The workers report that
checkpoint to Ray Train and end normally; the driver then raises `Preempted` naming it. Running the same command
again resumes from it (Ray Train hands the run's latest checkpoint back), with the losses of an uninterrupted run.

After training (the export, registration and samples that follow it) SIGTERM no longer ends the job: launch()
installs `finish_after_training`'s handler, which says so and lets the job finish (every checkpoint is already
saved; should the platform's SIGKILL come first, the same command resumes the finished run and exports again).
`run_job` puts the job's original handler back when the job ends (`jobs.platform.runtime.job_sigterm_scope`).

If no checkpoint arrives within `Settings.preemption_timeout_s` (TULPAR_PREEMPTION_TIMEOUT_S, default 120 s; keep
it below the platform's grace period, e.g. Kubernetes' terminationGracePeriodSeconds), the driver says so, names
the last checkpoint Ray Train had, and exits 1 before the SIGKILL would come.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from jobs.platform.runtime import EXIT_INTERNAL_ERROR, running_a_job
from jobs.training.storage import delete, exists, write_bytes

log = logging.getLogger("tulpar.preemption")


def stop_file_for(checkpoint_storage: str, run_name: str) -> str:
    """The run's stop file: its existence asks the workers to checkpoint and stop."""
    return f"{checkpoint_storage}/{run_name}/stop_requested"


class StopRequest:
    """The driver's side: installed as the SIGTERM handler while Ray Train runs (see `sigterm_requests_stop`)."""

    def __init__(self, stop_file: str, timeout_s: float, exit_on_timeout: Callable[[int], None] = os._exit):
        self.stop_file, self.timeout_s = stop_file, timeout_s
        self.exit_on_timeout = exit_on_timeout
        self.requested_at: float | None = None
        self.done = threading.Event()
        self.latest_checkpoint: Callable[[], str | None] = lambda: None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def request(self, signum: int = signal.SIGTERM, frame=None) -> None:
        if self.requested:  # a repeated notice: already on the way out
            return
        self.requested_at = time.monotonic()
        write_bytes(self.stop_file, f"signal {signum} at {time.time():.3f}\n".encode())
        sys.stderr.write(
            f"preemption: received signal {signum}; checkpointing at the next optimizer step (waiting up to "
            f"{self.timeout_s:g} s, TULPAR_PREEMPTION_TIMEOUT_S)\n"
        )
        sys.stderr.flush()
        threading.Thread(target=self._watchdog, name="tulpar-preemption-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        if self.done.wait(self.timeout_s):
            return
        latest = self.latest_checkpoint()
        sys.stderr.write(
            f"preemption: no checkpoint within {self.timeout_s:g} s of the signal; exiting. The latest checkpoint "
            f"is {latest or 'none'}; the same command resumes from it (raise TULPAR_PREEMPTION_TIMEOUT_S if the "
            "platform's grace period allows)\n"
        )
        sys.stderr.flush()
        self.exit_on_timeout(EXIT_INTERNAL_ERROR)


@contextlib.contextmanager
def sigterm_requests_stop(stop_file: str, timeout_s: float) -> Iterator[StopRequest]:
    """While the block runs, SIGTERM writes `stop_file` (the workers checkpoint and stop) instead of ending the
    process; leaving the block restores the previous handler (Ray's, which exits). A stale stop file from an
    earlier attempt is removed first."""
    delete(stop_file)
    request = StopRequest(stop_file, timeout_s)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        log.warning("training launched outside the main thread: SIGTERM will not checkpoint before exiting")
        yield request
        return
    previous = signal.signal(signal.SIGTERM, request.request)
    try:
        yield request
    finally:
        request.done.set()
        signal.signal(signal.SIGTERM, previous)


class StopPoller:
    """The workers' side: `should_stop` for llm_core's Trainer.fit (and the RL loop). Call it on every rank at the
    same steps: with several ranks it is a collective (an all-reduce of rank 0's answer)."""

    def __init__(
        self,
        stop_file: str | None,
        rank: int,
        world_size: int,
        device=None,
        poll_interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stop_file, self.rank, self.world_size = stop_file, rank, world_size
        if poll_interval_s is None:  # a local file costs microseconds to look at; an object store a request
            poll_interval_s = 1.0 if stop_file and "://" in stop_file else 0.0
        self.device, self.poll_interval_s, self.clock = device, poll_interval_s, clock
        self.last_poll: float | None = None
        self.seen = False

    def _rank0_sees_file(self) -> bool:
        if self.seen or self.stop_file is None or self.rank != 0:
            return self.seen
        now = self.clock()
        if self.last_poll is None or now - self.last_poll >= self.poll_interval_s:
            self.last_poll = now
            self.seen = exists(self.stop_file)
        return self.seen

    def __call__(self) -> bool:
        flag = self._rank0_sees_file()
        if self.world_size > 1:
            import torch

            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag


def _finish_instead(signum: int, frame=None) -> None:
    sys.stderr.write(
        f"preemption: received signal {signum} after training; finishing the export and registration before "
        "exiting (the checkpoints are saved: if the job is killed first, the same command resumes the finished "
        "run and exports again)\n"
    )
    sys.stderr.flush()


def finish_after_training() -> None:
    """Called by launch() once training has ended: until the job returns, SIGTERM is reported and the job
    finishes its export and registration, instead of Ray's handler ending it mid-write (exit 15). Only inside
    run_job (which restores the handler) and in the main thread."""
    if running_a_job() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _finish_instead)

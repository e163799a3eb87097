"""Pipelines under a preemption notice (pipelines/preemption.py): a stage that exits 75 is reported as preempted,
naming its checkpoint and the command that resumes; SIGTERM to the pipeline reaches the running stage and no later
stage starts; the re-run runs the stage's job with the same arguments (so the job resumes from its checkpoint,
tests/test_pretrain.py). A fake stage (a small script, no training) stands in for the job."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from jobs.platform.runtime import EXIT_PREEMPTED, Settings
from pipelines.preemption import StagePreempted
from pipelines.recipes import load_recipe
from pipelines.submit import finish
from pipelines.train_to_serve import Pipeline, resume_command

# Preempted on its first run: it waits for SIGTERM, then "checkpoints" and exits 75, as a training job does; the
# second run finishes. Every run appends its arguments to calls.jsonl.
FAKE_STAGE = """
import json, pathlib, signal, sys

state = pathlib.Path(sys.argv[1])
with (state / "calls.jsonl").open("a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\\n")
if not (state / "preempted").exists():
    (state / "preempted").write_text("once")

    def stop(signum, frame):
        print(json.dumps({"stage": "sft", "status": "preempted", "step": 2, "checkpoint": "/ckpt/step-000002"}))
        sys.exit(75)

    signal.signal(signal.SIGTERM, stop)
    (state / "ready").write_text("waiting for SIGTERM")
    while True:
        signal.pause()
outputs = {"model_uri": "models:/m/1", "hf_dir": "/x", "checkpoint_dir": "/x", "best_checkpoint": "/x"}
print(json.dumps({"stage": "sft", "status": "ok", "outputs": outputs, "metrics": {}, "mlflow_run_id": None}))
"""


class FakeStagePipeline(Pipeline):
    def __init__(self, tmp_path: Path):
        settings = Settings(tmp_path, tmp_path, str(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}", None)
        super().__init__(load_recipe("tiny", []), settings, "local")
        self.state = tmp_path / "stage-state"
        self.state.mkdir(exist_ok=True)
        (self.state / "fake_stage.py").write_text(FAKE_STAGE)

    def stage_command(self, job: str, args: list[str]) -> list[str]:
        return [sys.executable, str(self.state / "fake_stage.py"), str(self.state), job, *args]


def sigterm_when_ready(ready: Path) -> threading.Thread:
    """SIGTERM to this process (the pipeline) once the stage is waiting for it."""
    stop = threading.Event()

    def send() -> None:
        while not ready.exists():
            if stop.wait(0.05):  # the condition is polled; the test's own timeout bounds it
                return
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_preempted_stage_is_reported_with_its_checkpoint_and_the_rerun_runs_it_again(tmp_path, capsys):
    pipe = FakeStagePipeline(tmp_path)
    pipe.resume_command = resume_command(["--recipe", "tiny", "--from", "sft"])
    assert pipe.resume_command.endswith(
        "-m pipelines.train_to_serve --recipe tiny"
    )  # --from would redo stages
    previous = signal.getsignal(signal.SIGTERM)
    with pipe.sigterm.installed():
        sender = sigterm_when_ready(pipe.state / "ready")
        with pytest.raises(StagePreempted) as stopped:
            pipe.run_stage("sft", {}, 1, 2, False, "parent-run")
        sender.join(timeout=30)
        assert pipe.sigterm.requested
        with pytest.raises(StagePreempted, match="before stage dpo started"):  # no later stage starts
            pipe.run_stage("dpo", {}, 2, 2, False, "parent-run")
    assert signal.getsignal(signal.SIGTERM) is previous
    exc = stopped.value
    assert (exc.stage, exc.step, exc.checkpoint) == ("sft", 2, "/ckpt/step-000002")
    assert "resume with: " + pipe.resume_command in str(exc) and "sft resumes from its checkpoint" in str(exc)
    assert exc.record()["status"] == "preempted"
    assert "[1/2] sft        preempted after" in capsys.readouterr().out

    again = FakeStagePipeline(tmp_path)  # the same pipeline command, run again
    result = again.run_stage("sft", {}, 1, 2, False, "parent-run")
    assert result.status == "ok" and not again.sigterm.requested
    calls = [json.loads(line) for line in (pipe.state / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and calls[0] == calls[1]  # the same job, the same arguments: it resumes


def test_a_submission_whose_job_was_preempted_exits_75(capsys):
    preempted = {"stage": "sft", "status": "preempted", "step": 4, "checkpoint": "s3://b/ckpt/step-000004"}
    assert finish(preempted, ok=False, tracking_uri=None) == EXIT_PREEMPTED
    assert finish({"stage": "sft", "status": "failed"}, ok=False, tracking_uri=None) == 1
    assert "submit it again to resume" in capsys.readouterr().err

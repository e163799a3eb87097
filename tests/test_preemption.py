"""Preemption: a stop request ends Trainer.fit at an optimizer-step boundary with a checkpoint, and resuming from
it gives the losses of an uninterrupted run, bit for bit, for every loss the training stages plug into the loop
(pretraining windows, SFT rows, DPO pairs, the reward model's Bradley-Terry pairs). The driver/worker plumbing
(stop file, poller, watchdog) is tested here in-process; the SIGTERM to a real job is in tests/test_pretrain.py."""

import threading

import numpy as np
import pytest
import torch

from jobs.training.preemption import StopPoller, StopRequest, sigterm_requests_stop
from jobs.training.tasks import make_bradley_terry_loss, make_dpo_loss
from llm_core.chat_data import RowSampler
from llm_core.data import RandomWindows
from llm_core.model import Transformer
from llm_core.trainer import TrainConfig, Trainer, lm_loss
from llm_core.value_model import ScalarHeadModel
from tests.conftest import small_config

STEPS, STOP_AT, T = 5, 2, 16


def rows(kind: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(12):
        ids = torch.randint(0, 256, (2, T) if kind != "sft" else (T,), generator=g)
        targets = torch.roll(ids, -1, dims=-1)
        targets[..., : T // 2] = -100  # loss on the "answer" half only
        row = {"input_ids": ids, "targets": targets}
        if kind == "dpo":
            row["ref_logps"] = torch.randn(2, generator=g)
        if kind == "reward-model":
            row["attention_mask"] = torch.ones_like(ids)
        out.append(row)
    return out


def setup(kind: str, seed: int):
    """(model, sampler, loss_fn) of one training stage's kind, at the smallest shapes."""
    torch.manual_seed(seed)
    model = Transformer(small_config())
    if kind == "pretrain":
        tokens = np.random.default_rng(0).integers(0, 256, 4_000).astype(np.uint16)
        return model, RandomWindows(tokens, T, 2, seed=1), lm_loss
    sampler = RowSampler(rows(kind), 2, seed=3)
    if kind == "sft":
        return model, sampler, lm_loss
    if kind == "dpo":
        return model, sampler, make_dpo_loss(beta=0.1, label_smoothing=0.0)
    return ScalarHeadModel(model), sampler, make_bradley_terry_loss()


def make_trainer(kind: str, seed: int):
    model, sampler, loss_fn = setup(kind, seed)
    cfg = TrainConfig(
        steps=STEPS, batch_size=2, seq_len=T, lr=1e-3, warmup_steps=1, eval_every=100, log_every=1
    )
    return Trainer(model, cfg, loss_fn=loss_fn), sampler


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo", "reward-model"])
def test_a_stop_request_checkpoints_at_the_step_boundary_and_the_resume_is_bit_identical(tmp_path, kind):
    straight, sampler = make_trainer(kind, seed=0)
    reference = straight.fit(sampler, [], progress=False)
    assert not reference.stopped and len(losses(reference.history)) == STEPS

    first, s1 = make_trainer(kind, seed=0)
    asked = []

    def should_stop() -> bool:  # the preemption notice arrives during step STOP_AT
        asked.append(first.step)
        return first.step >= STOP_AT

    r1 = first.fit(s1, [], checkpoint_root=tmp_path, should_stop=should_stop, progress=False)
    assert r1.stopped and r1.step == STOP_AT and asked == list(range(1, STOP_AT + 1))
    assert not (tmp_path / "best").exists()  # a preemption checkpoint is the resume point, never the best

    resumed, s2 = make_trainer(kind, seed=99)  # other weights: everything must come from the checkpoint
    resumed.resume(tmp_path / "last", s2)
    assert resumed.step == STOP_AT
    r2 = resumed.fit(s2, [], should_stop=lambda: False, progress=False)
    assert not r2.stopped and r2.step == STEPS
    assert losses(r1.history) + losses(r2.history) == losses(reference.history)


def test_stop_is_not_asked_after_the_last_step(tmp_path):
    trainer, sampler = make_trainer("pretrain", seed=0)
    asked = []
    result = trainer.fit(sampler, [], should_stop=lambda: asked.append(trainer.step) or True, progress=False)
    assert result.stopped and result.step == 1 and asked == [1]
    trainer.cfg = trainer.cfg.model_copy(update={"steps": 2})
    assert not trainer.fit(sampler, [], should_stop=lambda: True, progress=False).stopped  # step 2 is the end


def test_rank0_polls_the_stop_file_at_most_every_interval(tmp_path):
    stop_file = tmp_path / "run" / "stop_requested"
    now = [0.0]
    poller = StopPoller(str(stop_file), rank=0, world_size=1, poll_interval_s=1.0, clock=lambda: now[0])
    assert poller() is False
    stop_file.parent.mkdir()
    stop_file.write_text("signal 15\n")
    now[0] = 0.5
    assert poller() is False  # not looked at again within the interval
    now[0] = 1.0
    assert poller() is True
    stop_file.unlink()
    assert poller() is True  # once seen, the answer stays (every rank must stop at the same step)
    other_rank = StopPoller(str(stop_file), rank=1, world_size=1)
    stop_file.write_text("x")
    assert other_rank() is False  # only rank 0 reads storage; with world_size > 1 its answer is all-reduced
    assert StopPoller(None, rank=0, world_size=1)() is False


def test_sigterm_handler_writes_the_stop_file_and_restores_the_previous_handler(tmp_path):
    import os
    import signal

    stop_file = tmp_path / "run" / "stop_requested"
    stop_file.parent.mkdir()
    stop_file.write_text("stale, from an earlier attempt")
    previous = signal.getsignal(signal.SIGTERM)
    with sigterm_requests_stop(str(stop_file), timeout_s=60) as request:
        assert not stop_file.exists()  # the stale file is removed before the workers start
        os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes, in this (the main) thread
        for _ in range(1000):  # the handler runs at the next bytecode boundary; no sleep needed
            if request.requested:
                break
        assert request.requested and stop_file.read_text().startswith("signal 15")
    assert signal.getsignal(signal.SIGTERM) is previous


def test_the_watchdog_exits_when_no_checkpoint_comes_in_time(tmp_path, capsys):
    exited = threading.Event()
    codes = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    request = StopRequest(str(tmp_path / "stop_requested"), timeout_s=0.05, exit_on_timeout=fake_exit)
    request.latest_checkpoint = lambda: "/ckpt/step-000004"
    request.request()
    assert exited.wait(10), "the watchdog did not fire"
    assert codes == [1]
    err = capsys.readouterr().err
    assert "no checkpoint within 0.05 s" in err and "/ckpt/step-000004" in err

    on_time = StopRequest(str(tmp_path / "stop2"), timeout_s=60, exit_on_timeout=fake_exit)
    on_time.request()
    on_time.done.set()  # the checkpoint arrived: the watchdog ends without exiting
    assert codes == [1]


def test_a_preempted_jobs_mlflow_run_is_killed_with_the_checkpoint_in_its_tags(tulpar_home, capsys):
    import json

    import mlflow
    from pydantic import BaseModel

    from jobs.platform import tracking
    from jobs.platform.runtime import EXIT_PREEMPTED, Preempted, run_job

    class Config(BaseModel):
        steps: int = 3

    runs = []

    def main(cfg, settings):  # what launch() does when the workers checkpointed on a stop request
        with tracking.start_run(settings, "pretrain", cfg, run_name="preempted-run") as run:
            runs.append(run.info.run_id)
            tracking.log_metrics({"loss": 5.0}, step=1)
            raise Preempted(2, "/storage/checkpoints/r/step-000002", run.info.run_id)

    assert run_job("pretrain", Config, main, []) == EXIT_PREEMPTED
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["status"] == "preempted"
    assert "preempted: stopped on SIGTERM with a checkpoint at step 2" in err and "resume with:" in err
    run = mlflow.MlflowClient(f"sqlite:///{tulpar_home / 'mlflow.db'}").get_run(runs[0])
    assert run.info.status == "KILLED"
    assert run.data.tags["tulpar.preempted"] == "true" and run.data.tags["tulpar.preempted_step"] == "2"
    assert run.data.tags["tulpar.preemption_checkpoint"] == "/storage/checkpoints/r/step-000002"
    assert run.data.metrics["loss"] == 5.0  # what the attempt logged is kept


def test_sigterm_after_training_lets_the_export_finish_and_the_job_end_normally(tmp_path, capsys):
    """Ray's driver handler (sys.exit(15)) would end the job in the middle of its export; after launch() has
    trained, SIGTERM is reported and the job finishes. run_job puts the original handler back."""
    import os
    import signal

    from pydantic import BaseModel

    from jobs.platform.runtime import JobResult, run_job
    from jobs.training.preemption import finish_after_training

    class Config(BaseModel):
        steps: int = 3

    def rays_handler(signum, frame):
        raise SystemExit(signum)

    export = tmp_path / "export.txt"

    def main(cfg, settings):
        finish_after_training()  # what launch() does once Ray Train has returned
        os.kill(os.getpid(), signal.SIGTERM)  # the notice arrives during the export
        for _ in range(1000):  # the handler runs at a bytecode boundary of this (the main) thread
            if "received signal" in capsys.readouterr().err:
                break
        else:
            raise AssertionError("the SIGTERM handler did not run")
        export.write_text("every tensor")
        return JobResult(stage="export-test", metrics={"steps": 3.0})

    previous = signal.signal(signal.SIGTERM, rays_handler)
    try:
        assert run_job("export-test", Config, main, []) == 0
        assert export.read_text() == "every tensor"
        assert signal.getsignal(signal.SIGTERM) is rays_handler  # the job's own handler is gone with the job
    finally:
        signal.signal(signal.SIGTERM, previous)

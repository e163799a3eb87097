"""Data parallelism without Ray: DDP and FSDP2 over gloo give the single-process trajectory (the sigmoid MoE
router's balancing bias included); FSDP checkpoints gather the full state and resume exactly; a preemption stop
request read by rank 0 reaches every rank."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.training.preemption import StopPoller
from llm_core.data import RandomWindows
from llm_core.model import Transformer
from llm_core.trainer import EvalSet, TrainConfig, Trainer
from tests.conftest import small_config, small_moe_config
from tests.stack import free_port

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)
STEPS = 4


def make(batch_size: int, parallelism: str = "none") -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=10, batch_size=batch_size, seq_len=32, lr=1e-3, warmup_steps=0)
    return Trainer(Transformer(small_config()), cfg, parallelism=parallelism)


def trajectory(trainer: Trainer, sampler: RandomWindows) -> list[float]:
    losses = [trainer.train_step(sampler.next_step(trainer.accum))["loss"] for _ in range(STEPS)]
    return losses + [trainer.evaluate([EvalSet("x", TOKENS[:3000], 1.0)])["val_loss"]]


def make_sigmoid_moe(batch_size: int, parallelism: str = "none") -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=10, batch_size=batch_size, seq_len=32, lr=1e-3, warmup_steps=0)
    model = small_moe_config(router_score="sigmoid", shared_expert_gate=False, router_bias_update_rate=0.01)
    return Trainer(Transformer(model), cfg, parallelism=parallelism)


def router_biases(trainer: Trainer, sampler: RandomWindows) -> list[list[list[float]]]:
    """(layers, E) selection biases after each of two optimizer steps (lists: tensors cannot leave a finished
    worker)."""
    out = []
    for _ in range(2):
        trainer.train_step(sampler.next_step(trainer.accum))
        out.append(torch.stack([r.router_bias for r in trainer.routers]).tolist())
    return out


def _worker(rank: int, world: int, port: int, ckpt_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        out = {}
        for parallelism in ("ddp", "fsdp"):
            trainer = make(4, parallelism)
            sampler = RandomWindows(TOKENS, 32, 4, seed=1, rank=rank, world_size=world)
            out[parallelism] = trajectory(trainer, sampler)
        # FSDP: save (full state gathered), restore into a fresh sharded trainer, take one more step on each
        trainer.save_to(Path(ckpt_dir), sampler, {})
        dist.barrier()
        fresh = make(4, "fsdp")
        fresh_sampler = RandomWindows(TOKENS, 32, 4, seed=1, rank=rank, world_size=world)
        fresh.resume(Path(ckpt_dir), fresh_sampler)
        a = trainer.train_step(sampler.next_step())["loss"]
        b = fresh.train_step(fresh_sampler.next_step())["loss"]
        out["resume"] = (a, b)
        # the sigmoid router's bias: updated from expert counts summed over ranks, so identical on every rank
        for parallelism in ("ddp", "fsdp"):
            sampler = RandomWindows(TOKENS, 32, 4, seed=1, rank=rank, world_size=world)
            gathered: list = [None] * world
            dist.all_gather_object(gathered, router_biases(make_sigmoid_moe(4, parallelism), sampler))
            out[f"router_bias_{parallelism}"] = gathered
        # a preemption request: only rank 0 reads the stop file, and every rank gets its answer (all-reduce)
        stop_file = Path(ckpt_dir).parent / "stop_requested"
        answers = [StopPoller(str(stop_file), rank, world)()]
        if rank == 0:
            stop_file.write_text("signal 15")
        dist.barrier()
        answers.append(StopPoller(str(stop_file), rank, world)())
        gathered = [None] * world
        dist.all_gather_object(gathered, answers)
        out["stop_answers"] = gathered
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_and_fsdp_match_single_process(tmp_path):
    single = trajectory(make(8), RandomWindows(TOKENS, 32, 8, seed=1))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(2, free_port(), str(tmp_path / "ckpt"), queue), nprocs=2, start_method="spawn"
    )
    out = queue.get()
    for parallelism in ("ddp", "fsdp"):
        np.testing.assert_allclose(out[parallelism], single, rtol=1e-5, err_msg=parallelism)
    a, b = out["resume"]
    assert a == b, "a resumed FSDP run continues bit-identically"
    single_bias = router_biases(make_sigmoid_moe(8), RandomWindows(TOKENS, 32, 8, seed=1))
    assert any(b != 0 for layer in single_bias[0] for b in layer)
    for parallelism in ("ddp", "fsdp"):
        rank0, rank1 = out[f"router_bias_{parallelism}"]
        assert rank0 == rank1, f"{parallelism}: every rank holds the same biases after every step"
        # the first update, from the same weights, is one process's on the whole batch; later ones may differ
        # from it by a token whose routing flips with the float rounding of another batch split
        assert rank0[0] == single_bias[0], parallelism
    assert out["stop_answers"] == [[False, True], [False, True]], "every rank stops at the same step"


# ------------------------------------------------------------------------------- typed training tasks


def _every_registered_task():
    from jobs.rlhf.loop import (  # registers the `rl` task (jobs.rl's worker loop)
        GRPOSettings,
        PPOSettings,
        RLEvalConfig,
        RLTask,
        RLTrainConfig,
        RolloutConfig,
        UpdateConfig,
    )
    from jobs.rlhf.rewards import RewardSpec
    from jobs.training.tasks import (
        DPOTask,
        PretrainWindowsTask,
        RewardModelTask,
        SFTTask,
        WhiteboxDistillTask,
    )
    from llm_core.lora import LoRAConfig
    from llm_core.trainer import TrainConfig

    train = TrainConfig(steps=7, batch_size=3, seq_len=48, lr=2.5e-4, seed=11)
    rows = {"init": "/models/start", "prepared": "/runs/r/prepared.pt", "train": train}
    return [
        PretrainWindowsTask(model=small_config(), train=train, dataset="/data/ds", languages=["kk", "en"]),
        SFTTask(**rows, lora=LoRAConfig(rank=4, alpha=8)),
        DPOTask(**rows, reference="/models/ref", beta=0.25, label_smoothing=0.1),
        WhiteboxDistillTask(**rows, teacher="/models/teacher", temperature=1.5, alpha=0.3),
        RewardModelTask(**rows),
        RLTask(
            train=train,
            algorithm="ppo",
            init="/models/start",
            reference="/models/ref",
            prompts="/runs/r/prompts.pt",
            rewards=[RewardSpec(name="length_penalty", weight=0.5, params={"max_tokens": 8})],
            rollout=RolloutConfig(engine="vllm", num_engines=2, prompts_per_step=4),
            update=UpdateConfig(updates_per_batch=2, micro_batch_tokens=512),
            grpo=GRPOSettings(group_size=4),
            ppo=PPOSettings(kl_target=3.0),
            evaluation=RLEvalConfig(samples_per_prompt=2),
            rl_train=RLTrainConfig(steps=7, seed=11),
            engine_name="tulpar-rollout-r",
        ),
    ]


def test_every_registered_task_round_trips_through_the_worker_spec():
    """What a worker receives is JSON; validating it again gives back the driver's task, of the same class."""
    import json

    from jobs.training.distributed import RayTrainConfig, WorkerSpec
    from jobs.training.tasks import TASKS

    tasks = _every_registered_task()
    assert sorted(t.kind for t in tasks) == sorted(TASKS)
    for task in tasks:
        spec = WorkerSpec(task=task, ray=RayTrainConfig(), run_name="r", run_config={"name": "x"})
        received = WorkerSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
        assert type(received.task) is type(task)
        assert received.task == task and received == spec


def test_unknown_or_malformed_task_specs_are_rejected():
    from pydantic import ValidationError

    from jobs.training.tasks import PretrainWindowsTask, task_from_dict

    task = _every_registered_task()[0]
    data = task.model_dump(mode="json")
    with pytest.raises(LookupError, match="no training task 'pretrain-shards' is registered"):
        task_from_dict({**data, "kind": "pretrain-shards"})
    with pytest.raises(ValidationError, match="reference"):  # a DPO field on a pretraining task
        task_from_dict({**data, "reference": "/models/ref"})
    assert isinstance(task_from_dict(data), PretrainWindowsTask)


# ------------------------------------------------------------------------------- worker errors


def test_error_file_that_is_not_a_worker_record_is_an_internal_failure(tmp_path):
    from jobs.training.distributed import read_user_error, write_user_error
    from llm_core.data import DataError
    from llm_core.trainer import TrainingError

    error_file = str(tmp_path / "run" / "fatal_error.txt")
    assert read_user_error(error_file) is None
    write_user_error(error_file, DataError("shard 3 is truncated: re-run preprocessing"), rank=1)
    error = read_user_error(error_file)
    assert isinstance(error, TrainingError) and str(error) == "shard 3 is truncated: re-run preprocessing"
    Path(error_file).write_text("ValueError: shard 3 is truncated")  # text, as Ray would print it
    with pytest.raises(RuntimeError, match="not a worker's error record"):
        read_user_error(error_file)


USER_ERROR = "shard train/kk/0 ends mid-document: re-run preprocessing"


def raise_data_error(config: dict) -> None:
    from llm_core.data import DataError

    raise DataError(USER_ERROR)


def raise_runtime_error(config: dict) -> None:
    raise RuntimeError("the worker lost its device")


def raise_runtime_error_quoting_a_value_error(config: dict) -> None:
    raise RuntimeError(f"could not restore the checkpoint (it said ValueError: {USER_ERROR})")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    "loop, exit_code",
    [
        (raise_data_error, 2),
        (raise_runtime_error, 1),
        (raise_runtime_error_quoting_a_value_error, 1),
    ],
)
def test_worker_errors_reach_the_cli_through_the_error_file_only(
    loop, exit_code, local_ray, tulpar_home, monkeypatch, capsys
):
    """A ValueError subclass in a Ray Train worker is a user error (exit 2, its message, no traceback); any other
    exception is an internal failure (exit 1), even when its text quotes a ValueError."""
    import json

    from pydantic import BaseModel

    from jobs.platform.runtime import JobResult, Settings, run_job
    from jobs.training.distributed import RayTrainConfig, error_file_for, launch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_name = f"errors-{loop.__name__}"

    class Empty(BaseModel):
        pass

    def main(cfg: Empty, settings: Settings) -> JobResult:
        launch(
            settings=settings,
            run_name=run_name,
            ray_cfg=RayTrainConfig(num_workers=1, cpus_per_worker=1, max_failures=0),
            task=_every_registered_task()[0],
            run_config={},
            train_loop=loop,
        )
        return JobResult("errors")

    code = run_job("errors", Empty, main, argv=[])
    out, err = capsys.readouterr()
    assert code == exit_code, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    error_file = Path(error_file_for(Settings.from_env(), run_name))
    # the job's own traceback starts a line; Ray's log lines forwarded from its actors are prefixed "(Name pid=..)"
    job_traceback = any(line.startswith("Traceback") for line in err.splitlines())
    if exit_code == 2:
        assert err.strip().splitlines()[-1] == f"error: {USER_ERROR}" and not job_traceback
        assert result == {"stage": "errors", "status": "error", "error": USER_ERROR}
        assert json.loads(error_file.read_text()) == {"type": "DataError", "message": USER_ERROR, "rank": 0}
    else:
        assert result["status"] == "failed" and job_traceback
        assert "\nerror: " not in err and not error_file.exists()


def test_step_lines_give_progress_and_the_eta_of_this_attempt():
    from jobs.training.distributed import StepETA

    now = [0.0]
    eta = StepETA(100, 400, clock=lambda: now[0])  # an attempt resumed at step 100
    assert eta.describe(100) == "25% of 400 steps, ETA unknown"
    now[0] = 10.0  # 50 steps in 10 s: 250 steps left take 50 s
    assert eta.describe(150) == "38% of 400 steps, ETA 50s"
    now[0] = 40.0  # 100 steps in 40 s: 200 left take 80 s
    assert eta.describe(200) == "50% of 400 steps, ETA 1m20s"
    assert eta.describe(400) == "100% of 400 steps, ETA 0s"
    long = StepETA(0, 100_000, clock=lambda: now[0])
    now[0] = 100.0  # 10 steps in 60 s: 99,990 steps left take 599,940 s
    assert long.describe(10) == "0% of 100000 steps, ETA 166h39m"

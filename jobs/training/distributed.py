"""Ray Train plumbing shared by the training stages: launch a TorchTrainer and run llm_core's Trainer per worker.

The driver (a job's `main`) calls `launch(...)` with a typed training task (`jobs.training.tasks`); every Ray Train
worker runs `worker_loop`, which validates the task again, builds it (model, sampler, eval sets, loss), restores the
latest checkpoint if Ray Train hands one back (after a worker failure, or when the same run is started again),
trains, and reports each evaluation to Ray Train together with a checkpoint. Rank 0 logs step metrics straight to
the job's MLflow run. Nothing here is specific to one machine: on a cluster only `RAY_ADDRESS`,
`num_workers`/`use_gpu`, `TULPAR_STORAGE` and `MLFLOW_TRACKING_URI` change.

User errors raised in a worker (ValueError and subclasses: bad data, a diverged loss) reach the driver through one
channel: the worker writes {"type", "message", "rank"} as JSON to the run's error file
(`<storage>/checkpoints/<run>/fatal_error.txt`) and ends without a retry; the driver raises TrainingError with that
message (exit 2). Any other failure, whatever its text says, is an internal failure (exit 1).

SIGTERM to the driver (a preemption notice) crosses to the workers through the run's stop file
(`jobs.training.preemption`): they checkpoint after the current optimizer step and end; `launch` raises `Preempted`
(exit 75) naming that checkpoint, and the same command resumes from it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from jobs.platform import locks, tracking
from jobs.platform.raycluster import init_ray
from jobs.platform.runtime import Preempted, Settings
from jobs.training.preemption import (
    StopPoller,
    finish_after_training,
    sigterm_requests_stop,
    stop_file_for,
)
from jobs.training.storage import delete, read_bytes, write_bytes
from jobs.training.tasks import TaskSetup, TrainingTask, task_from_dict
from llm_core.config import StrictModel
from llm_core.trainer import TrainingError

log = logging.getLogger("tulpar.distributed")
# the worker loop's lines (steps, evaluations, resume); Ray Train's console handler sends them to stderr once
train_log = logging.getLogger("tulpar.train")


class RayTrainConfig(StrictModel):
    """How a training stage runs on Ray Train."""

    num_workers: int = Field(
        1, ge=1, description="data-parallel workers (processes); one GPU each with use_gpu"
    )
    use_gpu: bool = Field(False, description="NCCL + one GPU per worker; false: gloo on CPU")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker; default: 1 with GPUs, else the cluster's CPUs / num_workers",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: replicas; fsdp: FSDP2 sharding (large presets)"
    )
    max_failures: int = Field(
        1, ge=0, description="worker-group restarts from the latest checkpoint before giving up"
    )
    torch_threads: int | None = Field(
        None, gt=0, description="intra-op threads per worker; default cpus_per_worker"
    )
    fault_injection_kill_at_step: int | None = Field(
        None,
        gt=0,
        description="testing only: rank 0 kills its own process once at this step, to exercise recovery",
    )
    device: str = Field(
        "auto",
        description="auto: the GPU Ray gives each worker with use_gpu, else Apple MPS when available and "
        "num_workers=1, else the CPU; cuda (needs use_gpu), cpu, mps (one worker; untested here)",
    )

    @model_validator(mode="after")
    def _device_fits(self) -> RayTrainConfig:
        d = self.device
        if d not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"ray.device {d!r} is not one of auto, cpu, cuda, mps")
        if d == "cuda" and not self.use_gpu:
            raise ValueError("ray.device=cuda needs ray.use_gpu=true (Ray gives each worker one GPU)")
        if d in ("cpu", "mps") and self.use_gpu:
            raise ValueError(f"ray.device={d} with ray.use_gpu=true: drop use_gpu, or use device cuda/auto")
        if d == "mps" and self.num_workers != 1:
            raise ValueError("ray.device=mps trains in one process: set ray.num_workers=1")
        return self


def worker_device(cfg: RayTrainConfig, world_size: int):
    """The torch device of this Ray Train worker for `cfg.device` (see RayTrainConfig.device)."""
    import ray.train.torch
    import torch

    from llm_core.device import mps_available, resolve_device

    if cfg.use_gpu:  # device auto or cuda: the GPU Ray assigned to this worker
        return ray.train.torch.get_device()
    if cfg.device == "mps" or (cfg.device == "auto" and world_size == 1 and mps_available()):
        return resolve_device("mps")  # a ValueError when this worker has no MPS
    return torch.device("cpu")


def checkpoint_storage_path(settings: Settings) -> str:
    storage = settings.storage.rstrip("/")
    return f"{storage}/checkpoints" if "://" in storage else str(Path(storage, "checkpoints").resolve())


class WorkerSpec(StrictModel):
    """Everything a Ray Train worker gets from the driver: sent as `model_dump(mode="json")`, validated again there
    (the task through the registry of training tasks)."""

    task: SerializeAsAny[TrainingTask] = Field(description="the registered training task to build")
    ray: RayTrainConfig
    run_name: str
    run_config: dict[str, Any] = Field(description="the stage's resolved config, kept in every checkpoint")
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    metrics_journal: str | None = Field(
        None, description="rank 0's journal of metrics not yet delivered to MLflow (tracking.MetricBuffer)"
    )
    fault_marker: str | None = Field(None, description="file recording the one injected fault of a run")
    progress_bar: bool = Field(
        False, description="rank 0 draws a step bar on the driver's stderr (a terminal)"
    )
    stop_file: str | None = Field(
        None,
        description="the run's stop file: when it exists, checkpoint after this step and end (preemption)",
    )
    checkpoint_score: tuple[str, Literal["min", "max"]] = Field(
        ("val_loss", "min"),
        description="the metric Ray Train ranks checkpoints by, and whether lower or higher is better",
    )

    @field_validator("task", mode="before")
    @classmethod
    def _registered_task(cls, value: Any) -> TrainingTask:
        return value if isinstance(value, TrainingTask) else task_from_dict(value)


# ------------------------------------------------------------------------------------------ user errors


def error_file_for(settings: Settings, run_name: str) -> str:
    """The run's error file: where a worker records the user error that ended the run."""
    return f"{checkpoint_storage_path(settings)}/{run_name}/fatal_error.txt"


def write_user_error(uri: str, exc: ValueError, rank: int) -> None:
    record = {"type": type(exc).__name__, "message": str(exc), "rank": rank}
    write_bytes(uri, json.dumps(record, ensure_ascii=False).encode("utf-8"))


def read_user_error(uri: str) -> TrainingError | None:
    """TrainingError with the message a worker wrote to the error file; None when there is no such file. A file
    that is not a worker's JSON record is an internal failure (RuntimeError), never a user error."""
    data = read_bytes(uri)
    if data is None:
        return None
    try:
        record = json.loads(data.decode("utf-8"))
        message, kind = record["message"], record["type"]
        if not isinstance(message, str) or not isinstance(kind, str):
            raise TypeError("type and message must be strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"the worker error file {uri} is not a worker's error record ({exc}): {data[:200]!r}"
        ) from None
    return TrainingError(message)


def run_reporting_user_errors(
    loop: Callable[[dict[str, Any]], None], error_file: str, config: dict[str, Any]
) -> None:
    """Every worker's entry point: run `loop`. A user error (ValueError) is written to the error file and the
    worker ends normally: it is the same on every rank and would recur on a retry, so Ray Train must not restart
    the group. Anything else propagates to Ray Train (a restart from the latest checkpoint, then a failure)."""
    import ray.train

    try:
        loop(config)
    except ValueError as exc:
        write_user_error(error_file, exc, ray.train.get_context().get_world_rank())


def _internal(exc: BaseException) -> BaseException:
    """`exc` as an internal failure. Ray re-raises a worker's exception as a class derived from the original, so a
    ValueError that did not come through the error file must not reach the CLI as a user error."""
    if isinstance(exc, ValueError):
        return RuntimeError(f"Ray Train failed with {type(exc).__name__}: {exc}")
    return exc


# WORKER_PRINT_PATCH: Ray Train (v2) replaces `print` in its workers by a function that logs the text through the
# root logger (to the worker's stderr) and, because Ray has already swapped the worker's sys.stdout for its log
# file, also prints it to stdout: every line a training worker prints reached the driver twice, once on stdout and
# once on stderr. init_ray turns that patch off (RAY_TRAIN_ENABLE_PRINT_PATCH=0), and the worker loop writes its
# own lines through the `tulpar.train` logger, which Ray Train sends to stderr once.


def hide_placement_group_cleaner_output() -> None:
    """Drop what Ray Train's detached `PlacementGroupCleaner` actor prints, on this driver's console only.

    Why: every Ray Train run starts the cleaner, which asks the Ray State API (served by the dashboard) every
    few seconds whether the Train controller is alive. The local Ray that init_ray starts has no dashboard
    (include_dashboard=False keeps start-up light on small machines), so every query fails: a 30-line
    `ConnectionError` traceback when the cleaner cannot find an API server, or a "Failed to query Ray Train
    Controller actor state. State API may be temporarily unavailable" warning every check interval (212 of 416
    console lines in a 400-step run with one worker restart). The cleaner only removes the placement group of
    a controller that died ungracefully, which shutting the local Ray down with the job does anyway. Called
    only for a local Ray (on a cluster the dashboard serves the State API and the cleaner's lines are real);
    they stay in /tmp/ray/session_latest/logs. Ray's log dispatcher is private API: if it changes, this leaves
    the output untouched (and tests/test_pretrain.py's console assertions fail)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without this dispatcher: leave the output as it is
        return
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    for name, handler in handlers:
        if name != "ray_print_logs" or getattr(handler, "tulpar_filtered", False):
            continue

        def filtered(data, _print=handler):
            if data.get("actor_name") != "PlacementGroupCleaner":
                _print(data)

        filtered.tulpar_filtered = True
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    pid = re.search(r"\bpid[=:]\s*(\d+)", str(exc))
    return f"{type(exc).__name__}: {text}" + (f" (pid {pid.group(1)})" if pid else "")


def restart_events(max_failures: int):
    """A Ray Train callback (it runs on the Train controller) that prints one line per worker-group failure:
    which rank(s) died and why, and the checkpoint the restarted workers resume from (or that no restart is
    left). Rank 0 then prints "resumed from checkpoint at step N" once it has restored that checkpoint."""
    from ray.train import UserCallback

    class RestartEvents(UserCallback):
        def __init__(self) -> None:
            self.failures, self.latest = 0, None

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is not None:
                self.latest = Path(checkpoint.path).name

        def after_exception(self, run_context, worker_exceptions) -> None:
            self.failures += 1
            died = "; ".join(f"rank {r}: {_first_line(e)}" for r, e in sorted(worker_exceptions.items()))
            if self.failures > max_failures:
                then = f"no restart left (ray.max_failures={max_failures}): the run stops"
            else:
                start = f"checkpoint {self.latest}" if self.latest else "the latest checkpoint, if any"
                then = f"restart {self.failures} of {max_failures} from {start}"
            sys.stderr.write(f"training worker died: {died} -> {then}\n")
            sys.stderr.flush()

    return RestartEvents()


# ------------------------------------------------------------------------------------------ driver side


def launch(
    *,
    settings: Settings,
    run_name: str,
    ray_cfg: RayTrainConfig,
    task: TrainingTask,
    run_config: dict[str, Any],
    mlflow_run_id: str | None = None,
    fault_marker: str | None = None,
    train_loop: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_score: tuple[str, Literal["min", "max"]] = ("val_loss", "min"),
):
    """Train `task` on Ray Train with `train_loop` (default: worker_loop; it receives the WorkerSpec's dump) and
    return the ray.train.Result.

    Checkpoints go to <TULPAR_STORAGE>/checkpoints/<run_name>/step-XXXXXX; Ray Train keeps the best one by
    `checkpoint_score` (the reported metric and whether lower or higher is better: mean validation loss by
    default) and the latest one. Raises TrainingError with the message a worker wrote to the error file;
    every other failure is raised as an internal one."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(settings)
    if not settings.ray_address:
        hide_placement_group_cleaner_output()
    if ray_cfg.cpus_per_worker is None:  # CPU training: give the workers the cluster's cores (threads follow)
        import ray

        cpus = (
            1.0
            if ray_cfg.use_gpu
            else max(1.0, float(int(ray.cluster_resources().get("CPU", 1) // ray_cfg.num_workers)))
        )
        ray_cfg = ray_cfg.model_copy(update={"cpus_per_worker": cpus})
    resources = {"CPU": ray_cfg.cpus_per_worker}
    scaling = ScalingConfig(
        num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources
    )
    ray_run_config = RunConfig(
        name=run_name,
        storage_path=checkpoint_storage_path(settings),
        failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=checkpoint_score[0],
            checkpoint_score_order=checkpoint_score[1],
        ),
        # Ray Train's own INFO/WARNING records (a line with every reported metric per evaluation, the failure
        # policy's decision with the worker's whole traceback, "graceful shutdown failed" after a crash) stay in
        # its log files (/tmp/ray/session_latest/logs/train/); the console gets restart_events' one line instead.
        logging_config=LoggingConfig(log_level="ERROR"),
        callbacks=[restart_events(ray_cfg.max_failures)],
    )
    spec = WorkerSpec(
        task=task,
        ray=ray_cfg,
        run_name=run_name,
        run_config=run_config,
        mlflow_run_id=mlflow_run_id,
        mlflow_tracking_uri=settings.mlflow_tracking_uri if mlflow_run_id else None,
        metrics_journal=str(metrics_journal_for(settings, run_name)) if mlflow_run_id else None,
        fault_marker=fault_marker,
        progress_bar=sys.stderr.isatty(),  # else periodic plain lines (logs stay readable)
        stop_file=stop_file_for(checkpoint_storage_path(settings), run_name),
        checkpoint_score=checkpoint_score,
    )
    error_file = error_file_for(settings, run_name)
    delete(error_file)  # a stale error from an earlier attempt of this run
    trainer = TorchTrainer(
        train_loop_per_worker=functools.partial(
            run_reporting_user_errors, train_loop or worker_loop, error_file
        ),
        train_loop_config=spec.model_dump(mode="json"),
        scaling_config=scaling,
        run_config=ray_run_config,
    )
    assert spec.stop_file is not None
    stop = sigterm_requests_stop(spec.stop_file, settings.preemption_timeout_s)
    try:
        try:
            with stop as request:
                request.latest_checkpoint = functools.partial(latest_checkpoint_dir, settings, run_name)
                result = trainer.fit()
        finally:  # from here on SIGTERM lets the job finish its export (not Ray's handler: exit 15 mid-write)
            finish_after_training()
    except Exception as exc:
        user_error = read_user_error(error_file)
        if user_error is not None:
            raise user_error from None
        internal = _internal(exc)
        if internal is exc:
            raise
        raise internal from exc
    if (
        spec.metrics_journal
    ):  # what rank 0 could not deliver before it exited (the server still down, a crash)
        tracking.deliver_journal(Path(spec.metrics_journal), settings.mlflow_tracking_uri)
    user_error = read_user_error(error_file)
    if user_error is not None:
        raise user_error
    if result.error is not None:
        raise _internal(result.error) from result.error
    if request.requested:  # the workers checkpointed and stopped (or the run had just finished)
        latest = result.checkpoint
        step = int(latest.path.rsplit("step-", 1)[1]) if latest and "step-" in latest.path else None
        raise Preempted(step, latest.path if latest else None, mlflow_run_id)
    return result


def latest_checkpoint_dir(settings: Settings, run_name: str) -> str | None:
    """The newest step-XXXXXX directory of a run in local storage (None for object stores or when none)."""
    if "://" in settings.storage:
        return None
    steps = sorted(Path(checkpoint_storage_path(settings), run_name).glob("step-*"))
    return str(steps[-1]) if steps else None


def best_and_last(result, score: tuple[str, Literal["min", "max"]] = ("val_loss", "min")) -> tuple[Any, Any]:
    """(best checkpoint by the `score` metric -- val_loss, lowest, by default --, latest checkpoint) of a Ray
    Train result."""
    name, order = score
    latest = result.checkpoint
    # a preemption checkpoint (metric "preempted") has no evaluation: it is never the best
    ranked = [
        (c, m)
        for c, m in (result.best_checkpoints or [])
        if m and m.get(name) is not None and not m.get("preempted")
    ]
    pick = min if order == "min" else max
    best = pick(ranked, key=lambda cm: cm[1][name])[0] if ranked else latest
    return best, latest


def run_dir_for(settings: Settings, run_key: str) -> Path:
    """A training run's own small files (best/last links, checkpoints.json, plots, the metrics journal): beside
    Ray Train's checkpoints (<storage>/checkpoints/<run>) for local storage, under TULPAR_HOME when storage is a
    URI. The run key is the config's hash, so two identical runs would share it: this process takes the
    directory's lock (jobs.platform.locks) and a second job with the same config fails at once, naming the
    holder, instead of both writing the same checkpoints."""
    local = "://" not in settings.storage
    run_dir = (Path(settings.storage) if local else settings.home) / "checkpoints" / run_key
    run_dir.mkdir(parents=True, exist_ok=True)
    locks.hold(
        run_dir,
        "training run directory",
        "a job with the same config is training it now; wait for it to finish (its result is then reused), "
        "or change the config (e.g. name=...) to train a separate run",
    )
    return run_dir


def metrics_journal_for(settings: Settings, run_key: str) -> Path:
    """Rank 0's journal of step metrics (tracking.MetricBuffer), in the run directory: undelivered metrics of a
    crashed or cut-off worker are delivered by the next attempt's rank 0 or by the driver after training."""
    return run_dir_for(settings, run_key) / "mlflow-metrics.jsonl"


def final_checkpoints(
    result,
    settings: Settings,
    run_key: str,
    run_dir: Path,
    score: tuple[str, Literal["min", "max"]] = ("val_loss", "min"),
) -> tuple[Any, Any]:
    """(best, last) checkpoints of a finished run (`best_and_last`); with local storage, run_dir's best/ and
    last/ link to them."""
    best, last = best_and_last(result, score)
    if best is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint for run {run_key}")
    if "://" not in settings.storage:
        link_best_last(run_dir, best.path, last.path)
    return best, last


def best_val_metrics(meta: dict[str, Any]) -> dict[str, float]:
    """`best_<name>` for each validation metric recorded in a checkpoint's meta."""
    return {f"best_{k}": v for k, v in meta["metrics"].items() if k.startswith("val_") and v is not None}


def link_best_last(run_dir: Path, best_path: str, last_path: str) -> None:
    """Local storage: best/ and last/ as relative symlinks to Ray Train's checkpoint dirs."""
    for name, target in (("best", best_path), ("last", last_path)):
        link = run_dir / name
        tmp = run_dir / f".{name}.link-tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(Path(target).name)
        os.replace(tmp, link)


# ------------------------------------------------------------------------------------------ worker side


class StepMetricLogger:
    """`log(step, metrics)` to the driver's MLflow run from rank 0 through a tracking.MetricBuffer (a server
    outage never stops training; see MetricBuffer), a no-op on other ranks; `close()` at the end of training
    delivers what is still buffered."""

    def __init__(self, spec: WorkerSpec, rank: int) -> None:
        self.run_id, self.buffer = spec.mlflow_run_id, None
        if rank != 0 or not spec.mlflow_run_id or not spec.mlflow_tracking_uri:
            return
        journal = Path(spec.metrics_journal) if spec.metrics_journal else None
        if journal is not None:
            try:
                journal.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a worker on a node without the driver's run directory
                train_log.warning(
                    "no metrics journal at %s (%s): metrics are buffered in memory only", journal, exc
                )
                journal = None
        self.buffer = tracking.MetricBuffer(spec.mlflow_tracking_uri, journal)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.buffer is not None:
            assert self.run_id is not None
            self.buffer.log(self.run_id, metrics, step)

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()


def mlflow_logger(spec: WorkerSpec, rank: int) -> StepMetricLogger:
    """Log step metrics to the driver's MLflow run from rank 0 (no-op on other ranks)."""
    return StepMetricLogger(spec, rank)


class StepETA:
    """Progress of a run for the periodic step lines: "38% of 400 steps, ETA 1m40s", from this attempt's
    rate (a restarted attempt starts counting again at the step it resumed from)."""

    def __init__(self, start_step: int, total_steps: int, clock: Callable[[], float] = time.monotonic):
        self.start_step, self.total, self.clock = start_step, total_steps, clock
        self.t0 = clock()

    def describe(self, step: int) -> str:
        done = step - self.start_step
        elapsed = self.clock() - self.t0
        share = f"{100 * step / self.total:.0f}% of {self.total} steps"
        if done <= 0 or elapsed <= 0:
            return f"{share}, ETA unknown"
        return f"{share}, ETA {_duration((self.total - step) * elapsed / done)}"


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _quiet_ray_train_report_lines() -> None:
    """Ray Train logs "Reporting training result N: TrainingReport(<every metric>)" per rank and evaluation
    through a logger named by its source file's path, not under `ray.train`, so RunConfig's LoggingConfig does
    not reach it and Ray's root console handler prints it at INFO. Raise that one logger to WARNING."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of any training stage: validates the WorkerSpec, builds its task (`task.build`),
    restores the latest checkpoint, trains with llm_core's Trainer and reports to Ray Train."""
    import ray.train
    import ray.train.torch
    import torch

    from llm_core.trainer import Trainer

    try:
        spec = WorkerSpec.model_validate(config)
    except ValidationError as exc:  # the driver validated this spec: a mismatch here is ours, not the user's
        raise RuntimeError(f"the worker could not validate the driver's WorkerSpec: {exc}") from None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _quiet_ray_train_report_lines()
    ray_cfg, train_cfg = spec.ray, spec.task.train
    torch.set_num_threads(ray_cfg.torch_threads or max(1, int(ray_cfg.cpus_per_worker)))
    device = worker_device(ray_cfg, world)
    log_metrics = mlflow_logger(spec, rank)
    torch.manual_seed(train_cfg.seed)
    task: TaskSetup = spec.task.build(rank=rank, world_size=world, device=device)
    parallelism = "none" if world == 1 else ray_cfg.parallelism
    extra = {"loss_fn": task.loss_fn} if task.loss_fn is not None else {}
    trainer = Trainer(
        task.model,
        train_cfg,
        device=device,
        run_config=spec.run_config,
        parallelism=parallelism,
        **extra,
    )
    sampler, eval_sets = task.sampler, task.eval_sets
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as ckpt_dir:
            trainer.resume(Path(ckpt_dir), sampler)
        if rank == 0:
            name = Path(restored.path).name
            train_log.info("resumed from checkpoint at step %d (%s)", trainer.step, name)
    kill_at = ray_cfg.fault_injection_kill_at_step
    marker = spec.fault_marker
    eta = StepETA(trainer.step, train_cfg.steps)
    bar = None
    if rank == 0 and spec.progress_bar:  # the driver draws it on its stderr (a terminal)
        from ray.experimental.tqdm_ray import tqdm as driver_tqdm

        bar = driver_tqdm(desc="train", total=train_cfg.steps, unit="step")
        bar.update(trainer.step)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if bar is not None:
            bar.update(1)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        log_metrics(step, {("train_loss" if k == "loss" else k): v for k, v in metrics.items()})
        if rank == 0:
            # pretraining with data.recall: the text windows' loss and the recall rows' copy accuracy apart
            recall = (
                f" (text {metrics['text_loss']:.4f}, recall copy acc {metrics['recall_copy_acc']:.3f})"
                if "recall_copy_acc" in metrics and "text_loss" in metrics
                else ""
            )
            train_log.info(
                "step %5d | train loss %.4f%s | lr %.2e | %s tok/s | %s",
                step,
                metrics["loss"],
                recall,
                metrics["lr"],
                f"{metrics['tokens_per_s']:,.0f}",
                eta.describe(step),
            )
        if kill_at and step >= kill_at and rank == 0 and marker and not Path(marker).exists():
            Path(marker).write_text(f"killed at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)  # a real worker crash: Ray Train restarts the group

    def on_eval(step: int, metrics: dict[str, float], is_best: bool) -> None:
        log_metrics(step, metrics)
        if rank == 0:
            losses = " ".join(
                f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items() if k.startswith("val_loss/")
            )
            train_log.info("step %5d | val loss %s%s", step, losses, " (best)" if is_best else "")
        with tempfile.TemporaryDirectory(prefix="tulpar-ckpt-") as tmp:
            path = trainer.save_to(Path(tmp) / "checkpoint", sampler, metrics)
            checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
            ray.train.report(
                {**metrics, "step": step, "is_best": float(is_best)},
                checkpoint=checkpoint,
                checkpoint_dir_name=f"step-{step:06d}",
            )

    should_stop = StopPoller(spec.stop_file, rank, world, device)
    fit = trainer.fit(
        sampler,
        eval_sets,
        on_log=on_log,
        on_eval=on_eval,
        on_step=on_step,
        should_stop=should_stop,
        progress=False,
    )
    if fit.stopped:
        report_preemption_checkpoint(
            fit.step, spec, lambda tmp: trainer.save_to(tmp / "checkpoint", sampler, {}), rank
        )
    log_metrics.close()
    if bar is not None:
        bar.close()


def report_preemption_checkpoint(
    step: int, spec: WorkerSpec, save: Callable[[Path], Path | None], rank: int
) -> None:
    """Every rank: write this step's checkpoint with `save(tmp_dir)` (rank 0 returns its path) and report it to
    Ray Train as the run's latest checkpoint (the resume point) with the worst finite score, so Ray Train ranks it
    last and `best_and_last` skips it ("preempted"). Not NaN or inf: Ray Train's saved checkpoint list (JSON)
    turns those into null, which it cannot rank when the run resumes."""
    import ray.train

    name, order = spec.checkpoint_score
    worst = sys.float_info.max if order == "min" else -sys.float_info.max
    with tempfile.TemporaryDirectory(prefix="tulpar-ckpt-") as tmp:
        path = save(Path(tmp))
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
        ray.train.report(
            {name: worst, "step": step, "preempted": 1.0},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"step-{step:06d}",
        )
    if rank == 0:
        train_log.info("preemption: stopped after step %d with checkpoint step-%06d", step, step)

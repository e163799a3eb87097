"""What every job shares: settings from the environment, the CLI, the JSON result and exit codes.

Contract (../shared/design/platform.md, mirrored in docs/architecture.md):
  python -m jobs.<stage> --config configs/<stage>/<name>.yaml [dotted.key=value ...]
  - stdout's last line is one JSON object {"stage", "status", "outputs", "metrics", "mlflow_run_id"},
    also written as result.json in the job's output directory;
  - user errors (ValueError and subclasses) print `error: <message>` without a traceback and exit 2;
  - a training stage stopped by SIGTERM (a preemption notice) after checkpointing exits 75 (EX_TEMPFAIL) with one
    line naming the checkpoint and the command that resumes (`Preempted`; docs/reliability.md);
  - a model trained and exported but not registered because the tracking server stayed unavailable
    (tracking.RegistrationDeferred) prints `error: <message>` naming the checkpoint, the export and the command
    that registers it (`python -m jobs.register ...`) and exits 3 (EXIT_NOT_REGISTERED);
  - anything else is an internal failure: traceback, exit 1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from jobs.platform import locks
from jobs.platform.configfile import load_config
from jobs.platform.results import OUTPUTS_BY_STAGE, Outputs, ResultError, StageResult, parse_result
from llm_core.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_ROOT = REPO_ROOT / "configs"
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_NOT_REGISTERED = 3  # jobs.platform.tracking.RegistrationDeferred
EXIT_PREEMPTED = (
    75  # os.EX_TEMPFAIL: stopped on request (SIGTERM) after a checkpoint; the same command resumes
)
DEFAULT_PREEMPTION_TIMEOUT_S = 120.0


class Preempted(Exception):
    """A training run stopped on a preemption notice (SIGTERM) after writing `checkpoint` at `step`; running the
    same command again resumes from it. Not a user error: the job exits EXIT_PREEMPTED."""

    def __init__(self, step: int | None, checkpoint: str | None, mlflow_run_id: str | None = None):
        self.step, self.checkpoint, self.mlflow_run_id = step, checkpoint, mlflow_run_id
        super().__init__(f"checkpoint at step {step}: {checkpoint}")


log = logging.getLogger("tulpar")
_in_job = threading.Event()  # set while run_job runs a job's main in this process


def running_a_job() -> bool:
    """Whether run_job is running a job's main in this process (its SIGTERM handler is restored at the end)."""
    return _in_job.is_set()


@contextlib.contextmanager
def job_sigterm_scope() -> Iterator[None]:
    """run_job: whatever SIGTERM handler a job installs (launch's stop request, then
    `jobs.training.preemption.finish_after_training`), the one in place when the job started is back when it ends
    (for in-process callers: tests, the tokenizer study)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    _in_job.set()
    try:
        yield
    finally:
        _in_job.clear()
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Settings:
    """Where things are. Read from the environment; the defaults make everything run on one machine."""

    data: Path  # TULPAR_DATA: read-only inputs
    home: Path  # TULPAR_HOME: everything the platform writes
    storage: str  # TULPAR_STORAGE: Ray Train checkpoints and large outputs (a path or s3:// URI)
    mlflow_tracking_uri: str  # MLFLOW_TRACKING_URI
    ray_address: str | None  # RAY_ADDRESS; None starts a local Ray
    rerun: bool = False  # TULPAR_RERUN=1 or --rerun: redo the work even when a stored result is current
    # TULPAR_PREEMPTION_TIMEOUT_S: after SIGTERM, how long a training driver waits for the workers' checkpoint
    preemption_timeout_s: float = DEFAULT_PREEMPTION_TIMEOUT_S

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("TULPAR_HOME", ".tulpar")).expanduser().resolve()
        data_env = os.environ.get("TULPAR_DATA")
        if data_env:
            data = Path(data_env).expanduser().resolve()
        else:  # ../shared/data beside the checkout (or the working directory)
            candidates = [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
            data = next((c.resolve() for c in candidates if c.is_dir()), candidates[0].resolve())
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
        storage = os.environ.get("TULPAR_STORAGE") or str(home)
        return cls(
            data=data,
            home=home,
            storage=storage,
            mlflow_tracking_uri=tracking,
            ray_address=os.environ.get("RAY_ADDRESS") or None,
            rerun=os.environ.get("TULPAR_RERUN") == "1",
            preemption_timeout_s=preemption_timeout_from_env(),
        )

    def require_data(self, *parts: str) -> Path:
        """A path under TULPAR_DATA that must exist, or a ValueError saying how to get it."""
        path = self.data.joinpath(*parts)
        if not path.exists():
            raise ValueError(
                f"data not found: {path} (TULPAR_DATA={self.data}). Set TULPAR_DATA to the data directory "
                "(default ../shared/data) or run `make data` to download it"
            )
        return path

    @property
    def mlflow_artifact_root(self) -> str:
        return os.environ.get("TULPAR_MLFLOW_ARTIFACTS") or (self.home / "mlartifacts").as_uri()

    def path(self, *parts: str) -> Path:
        """A local path under TULPAR_HOME (created)."""
        p = self.home.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def preemption_timeout_from_env() -> float:
    text = os.environ.get("TULPAR_PREEMPTION_TIMEOUT_S")
    if not text:
        return DEFAULT_PREEMPTION_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(
            f"TULPAR_PREEMPTION_TIMEOUT_S={text!r} is not a positive number of seconds: set it below the "
            f"grace period between SIGTERM and SIGKILL (default {DEFAULT_PREEMPTION_TIMEOUT_S:g})"
        )
    return value


@dataclass
class JobResult:
    """What a job's `main` returns. Stages with a contract (jobs.platform.results.OUTPUTS_BY_STAGE) return their
    typed outputs model; helper jobs outside the chain (tokenizer_report, download_data) may return a dict."""

    stage: str
    outputs: Outputs | dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    status: str = "ok"
    output_dir: Path | None = None  # where result.json goes
    cache_key: str | None = (
        None  # the job's identity of this output (config, inputs, code): see jobs.platform.cache
    )
    reused: bool = False  # the job found its output current and did no work

    def to_dict(self) -> dict[str, Any]:
        if self.stage in OUTPUTS_BY_STAGE:  # validated against the stage's contract before anyone reads it
            outputs = self.outputs if isinstance(self.outputs, Outputs) else dict(self.outputs)
            typed = StageResult[OUTPUTS_BY_STAGE[self.stage]].model_validate(  # type: ignore[valid-type]
                {
                    "stage": self.stage,
                    "outputs": outputs,
                    "metrics": self.metrics,
                    "mlflow_run_id": self.mlflow_run_id,
                    "cache_key": self.cache_key,
                    "reused": self.reused,
                }
            )
            return typed.model_dump(mode="json")
        return {
            "stage": self.stage,
            "status": self.status,
            "outputs": self.outputs.model_dump(mode="json")
            if isinstance(self.outputs, Outputs)
            else self.outputs,
            "metrics": self.metrics,
            "mlflow_run_id": self.mlflow_run_id,
        }


C = TypeVar("C", bound=BaseModel)


def default_config_path(stage: str, name: str) -> Path:
    return CONFIG_ROOT / stage / f"{name}.yaml"


def parse_args(stage: str, argv: list[str] | None) -> tuple[Path | None, list[str], bool, list[str]]:
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{stage}",
        description=f"Tulpar {stage} job. Overrides are dotted key=value pairs, e.g. train.steps=100.",
    )
    parser.add_argument(
        "--config", "-c", help=f"YAML config (e.g. configs/{stage}/tiny.yaml) or a name in it"
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="redo the work even when a stored result for this config is current",
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="ROLE=RESULT",
        help="an earlier stage's typed result (its result.json path, or the JSON itself) in a role this stage "
        "takes, e.g. tokenizer=.tulpar/tokenizers/tiny/result.json; the pipeline passes these",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied after the file")
    args = parser.parse_intermixed_args(argv)  # options may follow overrides, as `make ... ARGS=` places them
    path = None
    if args.config:
        path = Path(args.config)
        if not path.exists() and "/" not in args.config and not args.config.endswith(".yaml"):
            path = default_config_path(stage, args.config)
    return path, args.overrides, args.rerun, args.input


def disconnect_ray() -> None:
    """Leave Ray (if this process joined it) so that no worker log line forwarded by Ray's log monitor can be
    printed after the JSON result line."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # the result still has to be printed; a failed disconnect only risks log order
        logging.getLogger(__name__).warning(
            "could not disconnect from Ray before printing the result: %s", exc
        )
    sys.stdout.flush()
    sys.stderr.flush()


def run_cli(body: Callable[[], Any]) -> int:
    """The exit status of a command-line tool that is not a pipeline stage (jobs.generate, jobs.publish, ...):
    0 when `body()` returns; a ValueError (a user error) prints `error: <message>` on stderr and gives 2, no
    traceback; Ctrl-C gives 130. Anything else propagates (a bug: its traceback is wanted)."""
    try:
        body()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def run_job(
    stage: str,
    config_cls: type[C],
    main: Callable[[C, Settings], JobResult],
    argv: list[str] | None = None,
    *,
    leave_ray: bool = False,
) -> int:
    """Parse the CLI, load the config, run `main`, print the JSON result; map errors to exit codes.

    `leave_ray` (set by the process entry point) disconnects from Ray before the result is printed, so the result
    stays the last line of stdout; in-process callers keep their Ray session."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    def emit(record: dict[str, Any]) -> None:
        if leave_ray:
            disconnect_ray()
        print(json.dumps(record, ensure_ascii=False))

    try:
        path, overrides, rerun, input_args = parse_args(stage, argv)
        cfg = load_config(config_cls, path, overrides)
        if input_args:
            cfg = apply_inputs(stage, cfg, parse_inputs(input_args))
        settings = Settings.from_env()
        if rerun:
            settings = dataclasses.replace(settings, rerun=True)
        try:
            with job_sigterm_scope():
                result = main(cfg, settings)
        finally:
            locks.release_all()  # directories this job held (jobs.platform.locks)
    except ValueError as exc:  # user error: say what and how to fix, no traceback
        print(f"error: {exc}", file=sys.stderr)
        emit({"stage": stage, "status": "error", "error": str(exc)})
        return EXIT_USER_ERROR
    except Preempted as exc:
        if exc.mlflow_run_id:  # KILLED (stopped from outside), not FAILED, with the resume point in its tags
            from jobs.platform.tracking import mark_run_preempted

            mark_run_preempted(exc.mlflow_run_id, exc.step, exc.checkpoint)
        command = shlex.join(
            [sys.executable, "-m", f"jobs.{stage}", *(sys.argv[1:] if argv is None else argv)]
        )
        print(
            f"preempted: stopped on SIGTERM with a checkpoint at step {exc.step} in {exc.checkpoint}; resume "
            f"with: {command}",
            file=sys.stderr,
            flush=True,
        )
        emit({"stage": stage, "status": "preempted", "step": exc.step, "checkpoint": exc.checkpoint})
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from jobs.platform.tracking import RegistrationDeferred

        if isinstance(exc, RegistrationDeferred):  # done but not registered: the message says how to finish
            print(f"error: {exc}", file=sys.stderr)
            emit({"stage": stage, "status": "not_registered", "error": str(exc)})
            return EXIT_NOT_REGISTERED
        traceback.print_exc()
        emit({"stage": stage, "status": "failed"})
        return EXIT_INTERNAL_ERROR
    if result.output_dir is not None:
        atomic_write_json(Path(result.output_dir) / "result.json", result.to_dict())
    emit(result.to_dict())
    return 0


def parse_inputs(pairs: list[str]) -> dict[str, StageResult]:
    """`--input ROLE=RESULT` pairs -> typed results (RESULT: a result.json path or the JSON itself)."""
    inputs: dict[str, StageResult] = {}
    for pair in pairs:
        role, sep, value = pair.partition("=")
        if not sep or not role:
            raise ValueError(
                f"--input {pair!r} is not ROLE=RESULT: e.g. --input tokenizer=path/to/result.json"
            )
        if role in inputs:
            raise ValueError(f"--input {role}= is given twice: pass each role once")
        text = value
        if value.startswith("b64:"):  # as pipelines.submit sends it to a cluster
            try:
                text = base64.urlsafe_b64decode(value[4:].encode("ascii")).decode("utf-8")
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"--input {role}=b64:...: not base64-encoded JSON ({exc})") from None
        elif not value.lstrip().startswith("{"):
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"--input {role}={value}: no such result file; pass a stage's result.json")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--input {role}=: not a JSON stage result ({exc})") from None
        try:
            inputs[role] = parse_result(str(data.get("stage")), data)
        except ResultError as exc:
            raise ValueError(f"--input {role}=: {exc}") from None
    return inputs


def apply_inputs(stage: str, cfg: C, inputs: dict[str, StageResult]) -> C:
    """The config with its inputs filled from earlier stages' typed results (the config class's `with_inputs`)."""
    with_inputs = getattr(cfg, "with_inputs", None)
    if with_inputs is None:
        raise ValueError(f"jobs.{stage} takes no --input ({', '.join(inputs)} given): drop them")
    return with_inputs(inputs)


def result_from_output(text: str) -> dict[str, Any] | None:
    """A job's JSON result line (the last line of its output that parses as a JSON object with "stage"), as
    `run_job` prints it; None when there is none."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"stage"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def main_entry(stage: str, config_cls: type[C], main: Callable[[C, Settings], JobResult]) -> None:
    sys.exit(run_job(stage, config_cls, main, leave_ray=True))

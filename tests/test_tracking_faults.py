"""Tracking under faults (docs/reliability.md, "Tracking outage, concurrent users, preprocessing"): metrics survive a
tracking-server outage and a crash of the logging process; registration outlasts a short outage and, after a long
one, leaves a pending registration that `python -m jobs.register` completes; two jobs never share a run directory,
and concurrent registrations each get their own version.

The outage is a small HTTP server on a fixed port that takes MLflow's log-batch requests and records them, stopped
(connection refused) and started again on the same port: a real `mlflow server` takes ~60-70 s to start on the
2-core CI machine (measured twice while writing this test), too slow to start twice in a test."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import BaseModel

from jobs.platform import tracking
from jobs.platform.runtime import EXIT_NOT_REGISTERED, Settings, run_job
from tests.conftest import REPO
from tests.stack import free_port


class MetricSink(BaseHTTPRequestHandler):
    """MLflow's REST log-batch endpoint: records (run_id, key, value, step, timestamp) of every metric received."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/mlflow/runs/log-batch") or body["run_id"] == "deleted-run":
            self.send_response(404)  # the server's answer, not an outage
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run not found"}')
            return
        self.server.received.extend(  # type: ignore[attr-defined]
            (body["run_id"], m["key"], float(m["value"]), int(m["step"]), int(m["timestamp"]))
            for m in body.get("metrics", [])
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


class FlakyServer:
    """A MetricSink on one port that can go down (connections refused) and come back."""

    def __init__(self) -> None:
        self.port, self.received = free_port(), []
        self.server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), MetricSink)
        self.server.received = self.received  # type: ignore[attr-defined]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None


def test_metrics_survive_a_tracking_outage_and_a_crash_exactly_once(tmp_path):
    sink = FlakyServer()
    uri, journal = f"http://127.0.0.1:{sink.port}", tmp_path / "run" / "mlflow-metrics.jsonl"
    expected: list[tuple] = []
    try:

        def log(buffer: tracking.MetricBuffer, step: int) -> None:
            before = int(time.time() * 1000)
            buffer.log("run-a", {"train_loss": 1 / (step + 1), "val_loss/kk": step + 0.5, "skip": None}, step)
            after = int(time.time() * 1000)
            sent = [m for m in buffer.pending[-2:]] if buffer.pending else []
            stamp = sent[0]["timestamp"] if sent else sink.received[-1][4]
            assert before <= stamp <= after  # stamped when logged, not when delivered
            expected.extend([("run-a", "train_loss", 1 / (step + 1), step, stamp),
                             ("run-a", "val_loss/kk", step + 0.5, step, stamp)])  # fmt: skip

        buffer = tracking.MetricBuffer(uri, journal, min_backoff_s=0.01, max_backoff_s=0.05)
        for step in range(3):
            log(buffer, step)
        assert sink.received == expected  # delivered as logged while the server is up

        sink.down()
        for step in range(3, 7):  # the server is down: training goes on, no exception
            log(buffer, step)
        assert sink.received == expected[:6] and len(buffer.pending) == 8

        # the logging process dies here; the restarted worker's buffer finds the undelivered metrics in the journal
        del buffer
        restarted = tracking.MetricBuffer(uri, journal, min_backoff_s=0.01, max_backoff_s=0.05)
        assert [(r["key"], r["step"]) for r in restarted.pending] == [(e[1], e[3]) for e in expected[6:]]
        sink.up()
        log(restarted, 7)
        assert restarted.close(timeout_s=30)
        assert (
            sink.received == expected
        )  # every metric exactly once, in order, with its own step and timestamp
        assert not journal.exists()  # all delivered: nothing left to replay
    finally:
        if sink.server is not None:
            sink.down()


def test_end_of_run_gives_up_after_its_budget_and_keeps_the_journal(tmp_path, monkeypatch):
    sink = FlakyServer()
    sink.down()
    uri, journal = f"http://127.0.0.1:{sink.port}", tmp_path / "mlflow-metrics.jsonl"
    buffer = tracking.MetricBuffer(uri, journal, min_backoff_s=0.01, max_backoff_s=0.02)
    buffer.log("run-b", {"loss": 2.0}, 5, timestamp_ms=1234)
    t0 = time.monotonic()
    assert not buffer.close(timeout_s=0.3)
    assert time.monotonic() - t0 < 10  # bounded: a few refused connections, no MLflow-internal retry loop
    kept = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(r["run_id"], r["key"], r["value"], r["step"]) for r in kept] == [("run-b", "loss", 2.0, 5)]

    sink.up()  # later, the command the log line names delivers the journal
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        assert tracking._main(["deliver", str(journal)]) == 0
    finally:
        sink.down()
    assert sink.received == [("run-b", "loss", 2.0, 5, 1234)] and not journal.exists()


def test_a_rejected_metric_is_an_error_not_buffered(tmp_path):
    """A server that answers (here: no such run) is not an outage: the error propagates, nothing is queued."""
    from mlflow.exceptions import MlflowException

    sink = FlakyServer()
    try:
        buffer = tracking.MetricBuffer(f"http://127.0.0.1:{sink.port}", tmp_path / "j.jsonl")
        with pytest.raises(MlflowException) as info:
            buffer.log("deleted-run", {"loss": 1.0}, 1)
        assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST" and sink.received == []
    finally:
        sink.down()


# ---------------------------------------------------------------------------------------- registration


class Cfg(BaseModel):
    n: int


def fake_export(model, out_dir: Path, tokenizer=None) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps({"model_type": "llama", "marker": model}))


@pytest.fixture(scope="module")
def store_home(tmp_path_factory) -> Path:
    """One TULPAR_HOME with its SQLite tracking store for the registration tests (creating a store takes ~10 s)."""
    home = tmp_path_factory.mktemp("store") / "home"
    tracking.setup(local_settings(home), "tulpar-train")
    return home


def local_settings(home: Path, uri: str | None = None) -> Settings:
    return Settings(
        data=home, home=home, storage=str(home), mlflow_tracking_uri=uri or f"sqlite:///{home / 'mlflow.db'}",
        ray_address=None,
    )  # fmt: skip


def test_registration_outage_exits_3_naming_paths_and_the_command_that_registers_later(
    store_home, tmp_path, monkeypatch, capsys
):
    import mlflow

    from jobs import register
    from jobs.platform import registry

    home = store_home
    monkeypatch.setenv("TULPAR_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.REGISTER_RETRY_ENV, "0.5")  # a tiny backoff budget
    monkeypatch.setenv(tracking.FLUSH_ENV, "0.5")
    settings = local_settings(home)
    dead = f"http://127.0.0.1:{free_port()}"  # the tracking server, gone after training
    (tmp_path / "job.yaml").write_text("n: 1\n")

    def job(cfg: Cfg, s: Settings):
        with tracking.start_run(s, "pretrain", cfg, run_name="outage"):
            mlflow.set_tracking_uri(dead)
            tracking.publish_hf_model(
                "v1", None, s, "tulpar-outage", register=True, stage="pretrain", alias="pretrain-latest",
                tags={"tulpar.checkpoint": "/ckpt/run/step-000004"}, export=fake_export,
            )  # fmt: skip
        raise AssertionError("registration against an unreachable server returned")

    t0 = time.monotonic()
    rc = run_job("pretrain", Cfg, lambda cfg, _: job(cfg, settings), ["--config", str(tmp_path / "job.yaml")])
    assert time.monotonic() - t0 < 30  # the retry budgets bound it
    err = capsys.readouterr().err
    pending = next((home / "models" / "tulpar-outage").glob(".staging-*.pending.json"))
    staging = pending.with_name(pending.name.removesuffix(".pending.json"))
    assert rc == EXIT_NOT_REGISTERED == 3
    assert "/ckpt/run/step-000004" in err and str(staging) in err
    assert f"python -m jobs.register {pending}" in err
    assert "Traceback" not in err

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)  # the server is back
    assert register.main([str(pending)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {
        "model_uri": "models:/tulpar-outage/1",
        "hf_dir": str(home / "models" / "tulpar-outage" / "1"),
    }
    resolved = registry.resolve("models:/tulpar-outage@pretrain-latest", settings)
    assert resolved.uri == "models:/tulpar-outage/1"
    assert resolved.tags["tulpar.checkpoint"] == "/ckpt/run/step-000004"
    assert json.loads((home / "models" / "tulpar-outage" / "1" / "config.json").read_text())["marker"] == "v1"
    assert not pending.exists() and not staging.exists()
    assert register.main([str(pending)]) == 2  # done: running it again is a user error, not a second version


def test_registration_retries_through_a_short_outage(store_home, tmp_path, monkeypatch):
    """The registry refuses the first two attempts (as a restarting server does), then answers: one version."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    settings = local_settings(store_home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    real = MlflowClient.create_model_version
    refused = []

    def flaky(self, *args, **kwargs):
        if len(refused) < 2:
            refused.append(1)
            raise MlflowException("API request failed: Connection refused")  # INTERNAL_ERROR, as rest_utils
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_model_version", flaky)
    hf = tmp_path / "hf"
    fake_export("v", hf)
    with tracking.start_run(settings, "pretrain", Cfg(n=2), run_name="short"):
        uri, version = tracking.register_hf_model(hf, "tulpar-short", stage="pretrain", alias="a", retry_s=30)
    assert (uri, version, len(refused)) == ("models:/tulpar-short/1", "1", 2)


# ---------------------------------------------------------------------------------------- concurrent users


def test_two_registrations_at_once_get_their_own_versions_and_directories(store_home):
    """Two jobs register versions of one model at the same moment: MLflow numbers them, no directory is shared."""
    import mlflow
    from mlflow import MlflowClient

    settings = local_settings(store_home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient(settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("tulpar-train").experiment_id
    results: dict[int, tuple[str, Path]] = {}
    start = threading.Barrier(2)

    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            register_one(i)
        except BaseException as exc:
            errors.append(exc)
            raise

    def register_one(i: int) -> None:
        run_id = client.create_run(exp).info.run_id
        staging = settings.path("models", "tulpar-race", f".staging-{run_id[:8]}")
        fake_export(f"job-{i}", staging)
        start.wait()
        _, version = tracking.register_hf_model(
            staging, "tulpar-race", stage="pretrain", alias="race-latest", run_id=run_id, retry_s=60
        )
        results[i] = (version, tracking.place_version(settings, "tulpar-race", version, staging))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(v for v, _ in results.values()) == ["1", "2"]
    for i, (version, hf_dir) in results.items():
        assert hf_dir == settings.home / "models" / "tulpar-race" / version
        assert json.loads((hf_dir / "config.json").read_text())["marker"] == f"job-{i}"
        assert MlflowClient(settings.mlflow_tracking_uri).get_model_version("tulpar-race", version).run_id


RACE = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.workspace, "
    "registered_model_aliases.name, registered_model_aliases.alias\n[SQL: INSERT INTO registered_model_aliases "
    "(workspace, alias, version, name) VALUES (?, ?, ?, ?)]"
)  # what MLflow's SQLite store raised in CI when two registrations created one alias at once


def test_an_alias_created_by_a_concurrent_job_is_set_again_and_other_errors_propagate(
    store_home, monkeypatch
):
    """The loser of the alias insert race points the alias at its own version (as if it had registered second);
    any other failure to set the alias still fails the registration."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, PERMISSION_DENIED

    settings = local_settings(store_home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient(settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("tulpar-train").experiment_id
    real = MlflowClient.set_registered_model_alias
    calls = []

    def racing(self, name, alias, version):
        calls.append(version)
        if len(calls) == 1:
            real(self, name, alias, "1")  # the other job's insert, first: the alias exists now
            raise MlflowException(RACE, error_code=BAD_REQUEST)  # as the SQL store wraps an IntegrityError
        return real(self, name, alias, version)

    def register(i: int) -> str:
        run_id = client.create_run(exp).info.run_id
        staging = store_home / f"race-staging-{i}"
        fake_export(f"job-{i}", staging)
        return tracking.register_hf_model(
            staging, "tulpar-alias", stage="pretrain", alias="newest", run_id=run_id
        )[1]

    assert register(0) == "1"
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", racing)
    assert register(1) == "2"
    assert [str(v) for v in calls] == ["2", "2"]  # set twice, for its own version
    assert str(client.get_model_version_by_alias("tulpar-alias", "newest").version) == "2"

    def refused(self, name, alias, version):
        raise MlflowException("no write access to registered_model_aliases", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refused)
    with pytest.raises(MlflowException, match="no write access"):
        register(2)
    assert str(client.get_model_version_by_alias("tulpar-alias", "newest").version) == "2"


def test_a_second_identical_training_run_fails_fast_naming_the_holder(tmp_path):
    """Two training jobs with one config (one run key) at once: the second is refused before it trains, with the
    directory and the first job's pid; once the first exits (however it exits), the directory is free."""
    from jobs.platform import locks
    from jobs.training.distributed import run_dir_for

    settings = local_settings(tmp_path / "home")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from jobs.platform import locks; "
         "locks.hold(Path(sys.argv[1]), 'training run directory', ''); print('held', flush=True); sys.stdin.read()",
         str(settings.home / "checkpoints" / "tiny-abcd1234")],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            ValueError, match=rf"checkpoints/tiny-abcd1234 is in use by process {holder.pid} on"
        ):
            run_dir_for(settings, "tiny-abcd1234")
        assert run_dir_for(settings, "tiny-other000").is_dir()  # another config: its own directory
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    try:
        run_dir = run_dir_for(settings, "tiny-abcd1234")
        assert run_dir_for(settings, "tiny-abcd1234") == run_dir  # this process already holds it
        record = json.loads((run_dir / locks.LOCK_FILE).read_text())
        assert record["pid"] != holder.pid
    finally:
        locks.release_all()

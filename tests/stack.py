"""The production-shaped stack on this machine, for tests: PostgreSQL (Debian's packages), a local S3-compatible
server (moto's standalone server), an MLflow tracking server started with the exact command, arguments and
environment that charts/tulpar renders for its Deployment, and a Ray head (`ray start --head`). Every process
listens on 127.0.0.1 on a free port, runs in its own session and is stopped (its whole process group) on exit."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are chosen, so the OS cannot hand out the
    same port twice (ports picked one at a time can collide, and `ray start` refuses a port given to two parts)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(
    check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout:.0f}s\n{tail}")


def http_ok(url: str) -> bool:
    return requests.get(url, timeout=2).status_code == 200


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
    """A background process in its own session; on exit its process group gets SIGTERM, then SIGKILL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


# -- PostgreSQL --------------------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]), None
    )
    return Path(found).resolve().parent if found else None


@contextlib.contextmanager
def postgres(user: str = "mlflow", database: str = "mlflow") -> Iterator[dict[str, Any]]:
    """A throwaway PostgreSQL cluster with password (scram) auth over TCP on 127.0.0.1."""
    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError(
            "PostgreSQL is not installed: apt-get install -y postgresql (Debian's package)"
        )
    root = Path(
        tempfile.mkdtemp(prefix="tulpar-pg-")
    )  # not under pytest's 0700 tmp: the postgres user reads it
    password = secrets.token_urlsafe(16)
    (root / "pw").write_text(password)
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the postgres user the Debian package creates
        import pwd

        pw = pwd.getpwnam("postgres")
        for p in (root, root / "pw"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={root / 'pw'}",
         "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8"],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user=user, password=password, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield {"host": "127.0.0.1", "port": port, "user": user, "password": password, "database": database}
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True, cwd=root,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


# -- S3 ------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    """moto's standalone S3-compatible server (the role MinIO plays in the chart)."""
    port = free_port()
    log = workdir / "s3.log"
    with process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(f"{url}/moto-api/", timeout=2).ok, 60, "S3 server", proc, log)
        yield url


# -- MLflow, as the chart runs it -------------------------------------------------------------------------------------


def container_env(container: dict[str, Any], secrets_: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: values, secretKeyRefs, and $(VAR) expansion."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(item["value"])
            )
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets_[ref["name"]][ref["key"]]
    return env


def local_command(container: dict[str, Any]) -> list[str]:
    """The container's command with the image's executables taken from this virtualenv, bound to 127.0.0.1."""
    cmd = [*container.get("command", []), *container.get("args", [])]
    exe = {"python": sys.executable, "mlflow": str(BIN / "mlflow")}
    cmd[0] = exe.get(cmd[0], cmd[0])
    return ["127.0.0.1" if a == "0.0.0.0" else a for a in cmd]


@contextlib.contextmanager
def mlflow_from_chart(
    deployment: dict[str, Any], secrets_: dict[str, dict[str, str]], workdir: Path
) -> Iterator[str]:
    """Run the rendered MLflow Deployment's init container (bucket creation) and server locally."""
    pod = deployment["spec"]["template"]["spec"]
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    for init in pod.get("initContainers", []):
        env = {**base, **container_env(init, secrets_), "HOME": str(workdir)}
        subprocess.run(local_command(init), env=env, check=True, capture_output=True, timeout=120)
    server = pod["containers"][0]
    env = {**base, **container_env(server, secrets_), "HOME": str(workdir)}
    port = next(p["containerPort"] for p in server["ports"] if p["name"] == "http")
    log = workdir / "mlflow.log"
    with process(local_command(server), log, env=env, cwd=workdir) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/health"), 120, "MLflow server", proc, log)
        yield url


# -- Ray -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RayHead:
    dashboard_url: str  # the Jobs API and the State API
    address: str  # GCS, `127.0.0.1:<port>`: what RAY_ADDRESS and ray.init take


@contextlib.contextmanager
def ray_head(
    workdir: Path, env: dict[str, str], num_cpus: int = 2, token_auth: bool = True
) -> Iterator[RayHead]:
    """`ray start --head --block` with its dashboard, on free ports and with its own temp dir. Stopped by
    signalling its process group: `ray stop` would stop every Ray on the machine (a containerized one too). Every
    port is chosen here, since a Ray in a container on the host network may hold Ray's default ones.
    token_auth=False: drivers join over GCS on loopback without the token `ray start` otherwise requires."""
    flags = [
        "--port",
        "--dashboard-port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp}", "--min-worker-port=0", "--max-worker-port=0",
           *[f"{k}={v}" for k, v in ports.items()]]  # fmt: skip
    log = workdir / "ray-head.log"
    # As in the images: `python` on the head's PATH is the one with Tulpar's dependencies.
    path = f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    head_env = {**env, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0"}
    if not token_auth:
        head_env["RAY_AUTH_MODE"] = "disabled"
    try:
        with process(cmd, log, env=head_env) as proc:
            url = f"http://127.0.0.1:{ports['--dashboard-port']}"
            wait_until(lambda: http_ok(f"{url}/api/gcs_healthz"), 120, "Ray head", proc, log)
            yield RayHead(dashboard_url=url, address=f"127.0.0.1:{ports['--port']}")
    finally:
        shutil.rmtree(temp, ignore_errors=True)


_SHARED_RAY: dict[str, Any] = {}


def shared_ray_env() -> dict[str, str]:
    """The environment that makes a job subprocess join the test session's one Ray (a `ray_head`, 2 CPUs like this
    machine), started at the first call and stopped when the session ends (tests/conftest.py): RAY_ADDRESS, as for
    a cluster's head, instead of each job starting and stopping a local Ray of its own (~5 s a job and its CPU),
    and RAY_AUTH_MODE as the head has it. A driver left to choose turns token authentication on when
    ~/.ray/auth_token exists, and then refuses the head's unauthenticated calls: the job hangs."""
    if "address" not in _SHARED_RAY:
        stack = contextlib.ExitStack()
        workdir = Path(tempfile.mkdtemp(prefix="tulpar-test-ray-"))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # last: after the head has stopped
        head = stack.enter_context(ray_head(workdir, env, num_cpus=2, token_auth=False))
        _SHARED_RAY.update(address=head.address, stack=stack)
    return {"RAY_ADDRESS": _SHARED_RAY["address"], "RAY_AUTH_MODE": "disabled"}


def job_env(home: Path, data_dir: Path) -> dict[str, str]:
    """The environment of a job or pipeline subprocess in a test: this process's, with its own TULPAR_HOME (MLflow
    on SQLite there, not MLFLOW_TRACKING_URI), TULPAR_DATA, unbuffered output, and the session's Ray joined as a
    cluster's head (`shared_ray_env`)."""
    env = {**os.environ, "TULPAR_HOME": str(home), "TULPAR_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(shared_ray_env())
    return env


def stop_shared_ray() -> None:
    stack = _SHARED_RAY.pop("stack", None)
    _SHARED_RAY.pop("address", None)
    if stack is not None:
        stack.close()

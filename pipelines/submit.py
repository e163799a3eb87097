"""Submit one stage to where it should run: `make submit-<stage> CONFIG=<name> TARGET=...`.

    python -m pipelines.submit pretrain --config tiny --target http://127.0.0.1:8265 train.steps=100
    python -m pipelines.submit sft --config tiny-lora --target k8s --namespace tulpar --set image.tag=0.1.0
    python -m pipelines.submit pretrain --config tiny --render rayjob.yaml      # for kubectl apply -f

Targets:
  local                      `python -m jobs.<stage> --config configs/<stage>/<name>.yaml ...` on this machine;
  http(s)://host:8265        a running Ray cluster's dashboard (or ray://host:10001): Ray Jobs API
                             (JobSubmissionClient) with this checkout as the job's working_dir;
  k8s                        a RayJob (charts/ray-job rendered for this stage and config) created with the
                             Kubernetes Python client in --namespace, using the current kubeconfig.
Without --target: RAY_ADDRESS when it is an http(s):// or ray:// address, else k8s.

The command is always the local one, so a stage behaves the same everywhere. It waits for the job (unless
--no-wait), prints its logs and status as it goes and, at the end, its JSON result and the MLflow run link. Exit
codes: 0 succeeded, 1 the job failed, 2 bad input or an unreachable target (the message says which and why).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.platform.runtime import EXIT_PREEMPTED, result_from_output
from pipelines import chart_schemas, charts

REPO = charts.REPO
CONFIG_ROOT = REPO / "configs"
STAGES = tuple(
    chart_schemas.STAGES
)  # the stages a job can run: one list for submit and the job chart's schema
# Uploaded with the job to a Ray cluster: the code and configs, never environments, outputs or VCS data.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv*",
    ".tulpar",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "charts",
    "infra",
    "docs",
    "build",
    "dist",
    "mlruns",
]
TERMINAL_RAY = {"SUCCEEDED", "FAILED", "STOPPED"}
TERMINAL_DEPLOYMENT = {"Complete", "Failed"}
RAYJOB_API = {"group": "ray.io", "version": "v1", "plural": "rayjobs"}


class SubmitError(ValueError):
    """Bad input or an unreachable target: printed without a traceback, exit code 2."""


@dataclass
class Submission:
    stage: str
    config: str
    overrides: list[str] = field(default_factory=list)
    config_content: str | None = None  # a config file outside configs/ (k8s: --set-file configContent)
    job_args: list[str] = field(default_factory=list)  # --rerun, --promote, --input ROLE=b64:<typed result>

    @property
    def config_path(self) -> str:
        return f"configs/{self.stage}/{self.config}.yaml"

    def command(self, config_root: str = "configs") -> list[str]:
        """The job's command line: the one `make <stage> CONFIG=<name> ARGS=...` runs."""
        return [
            "python",
            "-m",
            f"jobs.{self.stage}",
            "--config",
            f"{config_root}/{self.stage}/{self.config}.yaml",
            *self.job_args,
            *self.overrides,
        ]


def job_args(rerun: bool, promote: bool, inputs: list[str]) -> list[str]:
    """The job flags a submission carries. A typed input travels inside the command itself, base64-encoded so no
    shell or chart quoting can change it (the cluster cannot read this machine's result files)."""
    import base64

    out = ["--rerun"] if rerun else []
    if promote:
        out.append("--promote")
    for pair in inputs:
        role, sep, value = pair.partition("=")
        if not sep or not role:
            raise SubmitError(f"--input {pair!r} is not ROLE=RESULT (a result.json path or its JSON)")
        text = value if value.lstrip().startswith("{") or value.startswith("b64:") else None
        if text is None:
            path = Path(value)
            if not path.is_file():
                raise SubmitError(f"--input {role}={value}: no such result file")
            text = path.read_text(encoding="utf-8")
        if not text.startswith("b64:"):
            text = "b64:" + base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii")
        out += ["--input", f"{role}={text}"]
    return out


def resolve(stage: str, config: str, overrides: list[str]) -> Submission:
    """Check the stage, the config and the overrides; a config may also be a path to a YAML file."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    for o in overrides:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*=[^'\n]*", o):
            raise SubmitError(f"override {o!r} is not a dotted key=value pair (e.g. train.steps=100)")
    as_path = Path(config)
    if config.endswith((".yaml", ".yml")) and as_path.is_file():
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", as_path.stem)
        return Submission(stage, name, list(overrides), config_content=as_path.read_text())
    if not (CONFIG_ROOT / stage / f"{config}.yaml").is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / stage).glob("*.yaml"))
        raise SubmitError(
            f"config configs/{stage}/{config}.yaml not found: choose one of {known or '(none yet)'} "
            "or pass a path to a YAML file"
        )
    return Submission(stage, config, list(overrides))


def log(message: str) -> None:
    print(f"[submit] {message}", file=sys.stderr, flush=True)


def mlflow_run_link(result: dict[str, Any] | None, tracking_uri: str | None) -> str | None:
    run_id = (result or {}).get("mlflow_run_id")
    if not run_id or not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        import mlflow

        experiment = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    except Exception:  # the server may be reachable only from inside the cluster
        return f"{tracking_uri.rstrip('/')}/#/runs/{run_id}"


def finish(result: dict[str, Any] | None, ok: bool, tracking_uri: str | None) -> int:
    """The exit status of a submission: 0 ok; EXIT_PREEMPTED (75) when the job's result line says it stopped on a
    preemption notice after a checkpoint (the cluster reports that job FAILED: it exited 75); else 1."""
    if result is not None:
        print(json.dumps(result, ensure_ascii=False))
    link = mlflow_run_link(result, tracking_uri)
    if link:
        log(f"MLflow run: {link}")
    if not ok and (result or {}).get("status") == "preempted":
        log(
            f"the job was preempted with a checkpoint at step {result.get('step')}: submit it again to resume"
        )
        return EXIT_PREEMPTED
    return 0 if ok else 1


# -- local ---------------------------------------------------------------------------------------------------------


def submit_local(sub: Submission) -> int:
    """Run the stage on this machine, exactly as `make <stage>` does."""
    cmd = [sys.executable, *sub.command()[1:]]
    if sub.config_content is not None:
        raise SubmitError(
            "a config file outside configs/ runs locally as: python -m jobs.<stage> --config <path>"
        )
    log(f"running locally: {shlex.join(sub.command())}")
    return subprocess.call(cmd, cwd=REPO)


# -- Ray Jobs API ---------------------------------------------------------------------------------------------------


def ray_job_spec(sub: Submission, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What JobSubmissionClient.submit_job gets: the local command, run from this checkout uploaded as working_dir."""
    env_vars = dict(env or {})
    if os.environ.get("TULPAR_PARENT_RUN_ID"):
        env_vars.setdefault("TULPAR_PARENT_RUN_ID", os.environ["TULPAR_PARENT_RUN_ID"])
    runtime_env: dict[str, Any] = {"working_dir": str(REPO), "excludes": list(WORKING_DIR_EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return {
        "entrypoint": shlex.join(sub.command()),
        "runtime_env": runtime_env,
        "metadata": {"tulpar.stage": sub.stage, "tulpar.config": sub.config},
        "submission_id": f"tulpar-{sub.stage}-{sub.config}-{uuid.uuid4().hex[:8]}".replace("_", "-"),
    }


def ray_client(address: str, timeout: float = 10.0):
    """A JobSubmissionClient, after checking quickly that the dashboard answers (fails fast with the cause)."""
    if address.startswith(("http://", "https://")):
        import requests

        try:  # any HTTP answer will do; 401: the cluster uses Ray's token authentication
            status = requests.get(f"{address.rstrip('/')}/api/version", timeout=timeout).status_code
        except requests.RequestException as exc:
            raise SubmitError(
                f"Ray cluster at {address} is unreachable ({type(exc).__name__}: {exc}). Is the head running and "
                "the dashboard port (8265) forwarded? e.g. kubectl port-forward svc/<cluster>-head-svc 8265:8265"
            ) from None
        if status == 401 and not os.environ.get("RAY_AUTH_MODE"):
            # Send the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) with every request.
            os.environ["RAY_AUTH_MODE"] = "token"
            with contextlib.suppress(Exception):  # Ray already imported: refresh its cached config
                from ray._raylet import Config

                Config.initialize("")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        hint = ""
        if "401" in str(exc) or "nauthorized" in str(exc):
            hint = (
                " (the cluster uses token authentication: set RAY_AUTH_TOKEN, e.g. from the Secret KubeRay created "
                "for the cluster, or put the token in ~/.ray/auth_token)"
            )
        raise SubmitError(f"cannot connect to Ray at {address}: {exc}{hint}") from None


def submit_ray(
    sub: Submission,
    address: str,
    *,
    wait: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> int:
    if sub.config_content is not None:
        raise SubmitError(
            "Ray Jobs API submissions take a config from configs/ (it is uploaded with the code)"
        )
    client = ray_client(address)
    spec = ray_job_spec(sub, env)
    job_id = client.submit_job(**spec)
    log(f"submitted {job_id} to {address}: {spec['entrypoint']}")
    if not wait:
        print(json.dumps({"target": address, "submission_id": job_id}))
        return 0
    status, logs = wait_ray(client, job_id, timeout)
    result = result_from_output(logs)
    log(f"{job_id}: {status}")
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        log(f"job failed: {info.message or ''}".strip())
    return finish(result, status == "SUCCEEDED", os.environ.get("MLFLOW_TRACKING_URI"))


def wait_ray(client, job_id: str, timeout: float | None, poll: float = 1.0) -> tuple[str, str]:
    """Poll the job, echoing new log output to stderr; returns (final status, all logs)."""
    start, shown, status, logs = time.monotonic(), 0, "", ""
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stderr.write(logs[shown:])
            sys.stderr.flush()
            shown = len(logs)
        if status in TERMINAL_RAY:
            return status, logs
        if timeout and time.monotonic() - start > timeout:
            client.stop_job(job_id)
            raise SubmitError(f"job {job_id} did not finish in {timeout:.0f}s; stopped it")
        time.sleep(poll)


# -- Kubernetes (RayJob) --------------------------------------------------------------------------------------------


def rayjob_values(sub: Submission, name: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
    base: dict[str, Any] = {
        "stage": sub.stage,
        "config": sub.config,
        "overrides": [*sub.job_args, *sub.overrides],
        "name": name,
    }
    if sub.config_content is not None:
        base["configContent"] = sub.config_content
    return charts.deep_merge(values or {}, base)


def job_name(sub: Submission) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", f"{sub.stage}-{sub.config}".lower()).strip("-")[:30].strip("-")
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def render_rayjob(
    sub: Submission,
    values: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    namespace: str = "tulpar",
) -> list[dict[str, Any]]:
    """The objects `TARGET=k8s` creates (a ConfigMap with the configs, unless on an existing cluster, and the
    RayJob), rendered by Helm from charts/ray-job."""
    return charts.render("ray-job", rayjob_values(sub, name or job_name(sub), values), namespace=namespace)


@dataclass
class KubeApis:
    core: Any
    custom: Any
    host: str = ""


def kube_apis(context: str | None = None, timeout: float = 5.0) -> KubeApis:
    """Clients for the current kubeconfig (or the in-cluster ServiceAccount), without retries, so an unreachable
    API server fails in seconds."""
    from kubernetes import client, config

    try:
        # KUBECONFIG is read here, not when the kubernetes package was imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context)
    except Exception as kube_exc:
        try:
            config.load_incluster_config()
        except Exception:
            raise SubmitError(
                f"no Kubernetes credentials: {kube_exc}. Point KUBECONFIG at your cluster (or run in a pod with "
                "the <release>-submitter ServiceAccount)"
            ) from None
    cfg = client.Configuration.get_default_copy()
    cfg.retries = 0
    api = client.ApiClient(cfg)
    return KubeApis(core=client.CoreV1Api(api), custom=client.CustomObjectsApi(api), host=cfg.host)


def _api_error(exc: Exception, apis: KubeApis, what: str) -> SubmitError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        reason = exc.reason
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            reason = json.loads(exc.body or "{}").get("message") or reason
        if exc.status == 404 and "rayjobs" in str(exc.body or ""):
            reason += " (is the KubeRay operator installed? `helm install tulpar charts/tulpar`)"
        return SubmitError(f"{what}: HTTP {exc.status} {reason}")
    return SubmitError(f"cannot reach the Kubernetes API at {apis.host or '?'} ({type(exc).__name__}: {exc})")


def check_namespace(apis: KubeApis, namespace: str, timeout: float = 5.0) -> None:
    try:
        apis.core.read_namespace(namespace, _request_timeout=timeout)
    except Exception as exc:
        from kubernetes.client.exceptions import ApiException

        if isinstance(exc, ApiException) and exc.status == 404:
            raise SubmitError(
                f"namespace {namespace!r} does not exist: create it (kubectl create namespace {namespace}) and install "
                f"the platform there (helm install tulpar charts/tulpar -n {namespace}), or pass --namespace"
            ) from None
        if isinstance(exc, ApiException) and exc.status == 403:
            # Namespaced RBAC (the submitter Role) cannot read Namespace objects: probe the namespace instead.
            try:
                apis.core.list_namespaced_config_map(namespace, limit=1, _request_timeout=timeout)
                return
            except Exception as inner:
                raise _api_error(inner, apis, f"namespace {namespace!r}") from None
        raise _api_error(exc, apis, f"namespace {namespace!r}") from None


def create_rayjob(apis: KubeApis, objects: list[dict[str, Any]], namespace: str) -> dict[str, Any]:
    """Create the ConfigMap then the RayJob; the ConfigMap is then owned by the RayJob (deleted with it)."""
    rayjob = next(o for o in objects if o["kind"] == "RayJob")
    configmaps = [o for o in objects if o["kind"] == "ConfigMap"]
    name = rayjob["metadata"]["name"]
    try:
        for cm in configmaps:
            apis.core.create_namespaced_config_map(namespace, cm)
        created = apis.custom.create_namespaced_custom_object(body=rayjob, namespace=namespace, **RAYJOB_API)
        owner = {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "name": name,
            "uid": created["metadata"]["uid"],
            "blockOwnerDeletion": False,
        }
        for cm in configmaps:
            apis.core.patch_namespaced_config_map(
                cm["metadata"]["name"], namespace, {"metadata": {"ownerReferences": [owner]}}
            )
    except Exception as exc:
        raise _api_error(exc, apis, f"creating RayJob {name} in {namespace}") from None
    return created


def wait_rayjob(
    apis: KubeApis,
    name: str,
    namespace: str,
    timeout: float | None,
    poll: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, str]:
    """Follow the RayJob's status until it ends; returns (jobStatus, submitter logs)."""
    start, last = clock(), None
    while True:
        obj = apis.custom.get_namespaced_custom_object(name=name, namespace=namespace, **RAYJOB_API)
        status = obj.get("status", {})
        now = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if now != last:
            log(
                f"{name}: deployment={now[0] or '-'} job={now[1] or '-'} {status.get('message', '')}".rstrip()
            )
            last = now
        if now[0] in TERMINAL_DEPLOYMENT or now[1] in TERMINAL_RAY:
            return now[1] or now[0] or "UNKNOWN", submitter_logs(apis, name, namespace)
        if timeout and clock() - start > timeout:
            raise SubmitError(
                f"RayJob {name} did not finish in {timeout:.0f}s (it keeps running in the cluster)"
            )
        time.sleep(poll)


def submitter_logs(apis: KubeApis, name: str, namespace: str) -> str:
    """The driver's output, as printed by the submitter pod (`ray job submit` follows the logs)."""
    try:
        pods = apis.core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        if not pods:
            return ""
        newest = max(pods, key=lambda p: p.metadata.creation_timestamp)
        return apis.core.read_namespaced_pod_log(newest.metadata.name, namespace)
    except Exception as exc:  # logs are a convenience; the status is what counts
        log(f"could not read the submitter's logs: {exc}")
        return ""


def submit_k8s(
    sub: Submission,
    *,
    namespace: str,
    values: dict[str, Any] | None = None,
    wait: bool = True,
    timeout: float | None = None,
    apis: KubeApis | None = None,
) -> int:
    objects = render_rayjob(sub, values, namespace=namespace)
    rayjob = next(o for o in objects if o["kind"] == "RayJob")
    name = rayjob["metadata"]["name"]
    apis = apis or kube_apis()
    check_namespace(apis, namespace)
    create_rayjob(apis, objects, namespace)
    log(f"created RayJob {namespace}/{name}: {rayjob['spec']['entrypoint']}")
    log(f"follow: kubectl -n {namespace} get rayjob {name} -w; kubectl -n {namespace} logs -f job/{name}")
    if not wait:
        print(json.dumps({"target": "k8s", "namespace": namespace, "rayjob": name}))
        return 0
    status, logs = wait_rayjob(apis, name, namespace, timeout)
    if logs:
        sys.stderr.write(logs)
    tracking = next(
        (e.get("value") for e in _head_env(rayjob) if e.get("name") == "MLFLOW_TRACKING_URI"),
        None,
    )
    return finish(result_from_output(logs), status in ("SUCCEEDED", "Complete"), tracking)


def _head_env(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rayjob["spec"].get("rayClusterSpec")
    if not spec:
        return []
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])


# -- CLI ------------------------------------------------------------------------------------------------------------


def resolve_target(target: str | None) -> str:
    target = (target or "").strip()
    if not target:
        address = os.environ.get("RAY_ADDRESS", "")
        return address if address.startswith(("http://", "https://", "ray://")) else "k8s"
    if target in ("local", "k8s") or target.startswith(("http://", "https://", "ray://")):
        return target
    raise SubmitError(
        f"TARGET {target!r}: use local, k8s, http://<dashboard host>:8265 or ray://<head>:10001"
    )


def parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {pair!r}: expected NAME=value")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.submit",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", help=f"one of {', '.join(STAGES)}")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for the local job")
    parser.add_argument("--config", "-c", default="tiny", help="configs/<stage>/<name>.yaml, or a YAML path")
    parser.add_argument(
        "--target", "-t", default=os.environ.get("TARGET"), help="local, k8s, http://..., ray://..."
    )
    parser.add_argument("--namespace", "-n", default=os.environ.get("NAMESPACE") or "tulpar")
    parser.add_argument("-f", "--values", action="append", default=[], help="ray-job chart values file (k8s)")
    parser.add_argument("--set", action="append", default=[], help="ray-job chart --set expression (k8s)")
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the job (Ray Jobs API)")
    parser.add_argument(
        "--render", type=Path, metavar="FILE", help="write the k8s objects as YAML; submit nothing"
    )
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="return once submitted")
    parser.add_argument(
        "--rerun", action="store_true", help="passed to the job: redo work a stored result covers"
    )
    parser.add_argument(
        "--promote", action="store_true", help="passed to jobs.eval: move the alias if the gate holds"
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="ROLE=RESULT",
        help="passed to the job: an earlier stage's typed result (a result.json path or its JSON)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    args = parser.parse_intermixed_args(argv)  # overrides may follow options, as `make ... ARGS=` places them
    try:
        sub = resolve(args.stage, args.config, args.overrides)
        sub.job_args = job_args(args.rerun, args.promote, args.input)
        if args.render:
            values = charts.deep_merge(charts.load_values_files(args.values), charts.parse_sets(args.set))
            objects = render_rayjob(sub, values, name=f"{sub.stage}-{sub.config}", namespace=args.namespace)
            args.render.parent.mkdir(parents=True, exist_ok=True)
            args.render.write_text(charts.to_yaml(objects))
            log(f"wrote {args.render}: kubectl apply -n {args.namespace} -f {args.render}")
            return 0
        target = resolve_target(args.target)
        if target == "local":
            return submit_local(sub)
        if target == "k8s":
            values = charts.deep_merge(charts.load_values_files(args.values), charts.parse_sets(args.set))
            return submit_k8s(
                sub, namespace=args.namespace, values=values, wait=args.wait, timeout=args.timeout
            )
        return submit_ray(sub, target, wait=args.wait, timeout=args.timeout, env=parse_env(args.env))
    except (SubmitError, charts.ChartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (the job keeps running on the cluster)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

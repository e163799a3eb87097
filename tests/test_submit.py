"""Submission: the exact RayJob the k8s path creates, fast failures on bad targets, and a real run through
`make submit-pretrain` on a local `ray start --head` logging to the production-shaped MLflow (PostgreSQL + S3)
that charts/tulpar deploys, with the model then resolved as models:/<name>@<alias>."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines import charts, submit
from tests import stack
from tests.conftest import REPO

# -- the RayJob the k8s target creates ------------------------------------------------------------------------------


class FakeApiException(Exception):
    pass


class FakeCore:
    """Records what pipelines.submit sends to the Kubernetes API."""

    def __init__(self, namespaces=("tulpar",)):
        self.namespaces, self.calls = set(namespaces), []

    def read_namespace(self, name, _request_timeout=None):
        from kubernetes.client.exceptions import ApiException

        self.calls.append(("read_namespace", name))
        if name not in self.namespaces:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(metadata=SimpleNamespace(name=name))

    def create_namespaced_config_map(self, namespace, body):
        self.calls.append(("create_config_map", namespace, body))

    def patch_namespaced_config_map(self, name, namespace, body):
        self.calls.append(("patch_config_map", name, namespace, body))


class FakeCustom:
    def __init__(self):
        self.calls = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body))
        return {**body, "metadata": {**body["metadata"], "uid": "uid-123"}}


def test_k8s_target_creates_the_rendered_rayjob_with_the_local_command():
    sub = submit.resolve("pretrain", "tiny", ["train.steps=100", "ray.num_workers=2"])
    core, custom = FakeCore(), FakeCustom()
    apis = submit.KubeApis(core=core, custom=custom, host="https://k8s.test")
    rc = submit.submit_k8s(sub, namespace="tulpar", values={"image": {"tag": "9.9.9"}}, wait=False, apis=apis)
    assert rc == 0
    (_, group, version, namespace, plural, rayjob) = custom.calls[0]
    assert (group, version, namespace, plural) == ("ray.io", "v1", "tulpar", "rayjobs")
    name = rayjob["metadata"]["name"]
    assert name.startswith("pretrain-tiny-") and len(name) <= 40

    # exactly what the chart renders for these values (same name), and valid against the RayJob CRD
    expected = charts.render(
        "ray-job",
        {
            "stage": "pretrain",
            "config": "tiny",
            "overrides": ["train.steps=100", "ray.num_workers=2"],
            "name": name,
            "image": {"tag": "9.9.9"},
        },
        namespace="tulpar",
    )
    assert rayjob == next(o for o in expected if o["kind"] == "RayJob")
    assert charts.validate_object(rayjob) == []
    spec = rayjob["spec"]
    assert shlex.split(spec["entrypoint"]) == [
        "python",
        "-m",
        "jobs.pretrain",
        "--config",
        "/configs/pretrain/tiny.yaml",
        "train.steps=100",
        "ray.num_workers=2",
    ]
    assert shlex.split(spec["entrypoint"])[3:] == ["--config", "/configs/pretrain/tiny.yaml", *sub.overrides]
    assert sub.command()[:3] == ["python", "-m", "jobs.pretrain"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["submissionMode"] == "K8sJobMode"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].endswith(":9.9.9")

    # the ConfigMap with the same config file was created first, then owned by the RayJob
    (kind, ns, cm) = core.calls[1]
    assert kind == "create_config_map" and ns == "tulpar"
    assert (
        cm["data"]["pretrain__tiny.yaml"].strip() == (REPO / "configs/pretrain/tiny.yaml").read_text().strip()
    )
    volume = next(
        v
        for v in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
        if v["name"] == "configs"
    )
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert {"key": "pretrain__tiny.yaml", "path": "pretrain/tiny.yaml"} in volume["configMap"]["items"]
    patch = core.calls[2]
    assert patch[0] == "patch_config_map"
    assert patch[3]["metadata"]["ownerReferences"][0] == {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "name": name,
        "uid": "uid-123",
        "blockOwnerDeletion": False,
    }


def test_render_writes_objects_for_kubectl_apply(tmp_path):
    out = tmp_path / "sft.yaml"
    rc = submit.main(["sft", "--config", "tiny-lora", "--render", str(out), "--set", "job.backoffLimit=3"])
    assert rc == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert docs[1]["metadata"]["name"] == "sft-tiny-lora" and docs[1]["spec"]["backoffLimit"] == 3
    assert charts.validate_all(docs) == []


def test_missing_namespace_fails_fast_with_the_cause(capsys):
    sub = submit.resolve("pretrain", "tiny", [])
    apis = submit.KubeApis(core=FakeCore(namespaces=()), custom=FakeCustom())
    with pytest.raises(submit.SubmitError, match="namespace 'ml' does not exist: create it"):
        submit.submit_k8s(sub, namespace="ml", wait=False, apis=apis)
    assert apis.custom.calls == []  # nothing was created


def test_unreachable_kubernetes_api_fails_fast(tmp_path, monkeypatch, capsys):
    port = stack.free_port()  # nothing listens there
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    start = time.monotonic()
    rc = submit.main(["pretrain", "--config", "tiny", "--target", "k8s", "--no-wait"])
    assert rc == 2 and time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert f"cannot reach the Kubernetes API at https://127.0.0.1:{port}" in err


def test_unreachable_ray_cluster_fails_fast(capsys):
    port = stack.free_port()
    start = time.monotonic()
    rc = submit.main(["pretrain", "--config", "tiny", "--target", f"http://127.0.0.1:{port}", "--no-wait"])
    assert rc == 2 and time.monotonic() - start < 15
    assert (
        f"Ray cluster at http://127.0.0.1:{port} is unreachable (ConnectionError" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "tiny"], "unknown stage 'train'"),
        (["pretrain", "--config", "nope"], "config configs/pretrain/nope.yaml not found"),
        (["pretrain", "--config", "tiny", "steps"], "override 'steps' is not a dotted key=value pair"),
        (["pretrain", "--config", "tiny", "--target", "ssh://x"], "TARGET 'ssh://x'"),
    ],
)
def test_bad_input_is_a_user_error(args, message, capsys):
    assert submit.main(args) == 2
    assert message in capsys.readouterr().err


def test_default_target_follows_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert submit.resolve_target(None) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not a Jobs API endpoint
    assert submit.resolve_target(None) == "k8s"


# -- the production-shaped stack, for real ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_stack(tmp_path_factory):
    """PostgreSQL + S3 + the MLflow server exactly as charts/tulpar configures it (command, args, env, Secrets)."""
    if stack.postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does it)")
    work = tmp_path_factory.mktemp("stack")
    with stack.postgres() as pg, stack.s3_server(work) as s3_url:
        mlflow_port = stack.free_port()
        values = {
            "secrets": {"generate": False},
            "kuberay-operator": {"enabled": False},
            "postgresql": {
                "enabled": False,
                "external": {"host": pg["host"], "port": pg["port"]},
                "auth": {"existingSecret": "db", "username": pg["user"], "database": pg["database"]},
            },
            "minio": {"enabled": False},
            "s3": {"endpointUrl": s3_url, "existingSecret": "s3"},
            "mlflow": {"port": mlflow_port, "workers": 1},
        }
        objects = charts.render("tulpar", values)
        assert charts.validate_all(objects) == []
        deployment = next(
            o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "tulpar-mlflow"
        )
        creds = {"AWS_ACCESS_KEY_ID": "tulpar-test", "AWS_SECRET_ACCESS_KEY": "tulpar-test-secret"}
        fake_secrets = {"db": {"POSTGRES_PASSWORD": pg["password"]}, "s3": creds}
        with stack.mlflow_from_chart(deployment, fake_secrets, work) as url:
            yield {"url": url, "s3": s3_url, "creds": creds, "bucket": values_bucket(objects), "work": work}


def values_bucket(objects) -> str:
    dep = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "tulpar-mlflow")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    return env["MLFLOW_ARTIFACTS_DESTINATION"]


@pytest.mark.slow
def test_make_submit_pretrain_on_a_ray_head_logs_to_postgres_s3_mlflow(mlflow_stack, tmp_path, data_dir):
    from tests.test_pretrain import make_dataset

    dataset = make_dataset(tmp_path / "data", data_dir, chars_per_language=40_000, vocab=512)
    home = tmp_path / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TULPAR_", "MLFLOW_", "RAY_", "AWS_", "MAKE"))
    }
    env.update(TULPAR_HOME=str(home), TULPAR_DATA=str(data_dir), MLFLOW_TRACKING_URI=mlflow_stack["url"])
    with stack.ray_head(tmp_path, env, num_cpus=2) as head:
        dashboard = head.dashboard_url
        overrides = [
            f"data.dataset={dataset}",
            "train.steps=6",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.eval_every=3",
            "train.eval_windows=4",
            "train.log_every=3",
            "train.warmup_steps=1",
            "sample.max_new_tokens=4",
        ]
        proc = subprocess.run(
            ["make", "-o", "setup", "-o", ".venv/.tulpar-setup.stamp", "submit-pretrain", "CONFIG=tiny",
             f"TARGET={dashboard}", f"PY={sys.executable}", f"ARGS={' '.join(overrides)}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stage"] == "pretrain" and result["status"] == "ok"
    assert f"MLflow run: {mlflow_stack['url']}/#/experiments/" in proc.stderr

    # the run, its metrics and the registered version live in PostgreSQL behind the server ...
    import boto3
    import mlflow

    client = mlflow.MlflowClient(mlflow_stack["url"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["tulpar.stage"] == "pretrain" and client.get_metric_history(
        run.info.run_id, "train_loss"
    )
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: jobs hold no S3 credentials
    mv = client.get_model_version_by_alias("tulpar-tiny", "pretrain-latest")
    assert result["outputs"]["model_uri"] == f"models:/tulpar-tiny/{mv.version}"

    # ... and the model files in the S3 bucket the chart names
    bucket, _, prefix = mlflow_stack["bucket"].removeprefix("s3://").partition("/")
    s3 = boto3.client(
        "s3",
        endpoint_url=mlflow_stack["s3"],
        aws_access_key_id=mlflow_stack["creds"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=mlflow_stack["creds"]["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert any(k.endswith("model/config.json") for k in keys) and any(
        k.endswith(".safetensors") for k in keys
    )

    # serving resolves models:/<name>@<alias> through the same server and generates with the model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlflow.set_tracking_uri(mlflow_stack["url"])
    local = Path(
        mlflow.artifacts.download_artifacts("models:/tulpar-tiny@pretrain-latest", dst_path=str(tmp_path))
    )
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    ids = tok("Сәлем", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4

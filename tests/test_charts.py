"""Helm charts: every chart renders with each of its ci/*.yaml through Helm's own engine (helm-python-sdk), every
object validates against the Kubernetes OpenAPI schema (kubernetes-validate) or the KubeRay CRDs, and the values
that matter land where they should (GPUs, autoscaling, secrets, images, the job's command)."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines import chart_schemas, charts
from tests.conftest import REPO

CASES = [(c, f.name) for c in charts.CHARTS for f in charts.ci_values_files(c)]


@functools.cache
def rendered(chart: str, values_file: str) -> list[dict]:
    return charts.render(chart, charts.load_values_files([charts.CHARTS_DIR / chart / "ci" / values_file]))


def ours(objects):
    """Objects of Tulpar's templates (the KubeRay operator subchart is upstream's)."""
    return [
        o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "tulpar"
    ]


def pod_specs(obj):
    """(where, pod spec, long_running) for every pod an object creates."""
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet"):
        yield kind, obj["spec"]["template"]["spec"], True
    elif kind.startswith("Ray"):
        for where, template in charts.pod_templates(obj):
            yield where, template["spec"], where != "submitter"


def test_every_chart_has_its_files():
    for chart in charts.CHARTS:
        root = charts.CHARTS_DIR / chart
        for rel in (
            "Chart.yaml",
            "values.yaml",
            "values.schema.json",
            "templates/_helpers.tpl",
            "templates/NOTES.txt",
        ):
            assert (root / rel).is_file(), f"{chart}: {rel} missing"
        assert charts.ci_values_files(chart), f"{chart}: no ci/*.yaml"


def test_values_are_documented():
    """Every value is documented with a `# --` comment (helm-docs style), on itself or on its parent block."""
    for chart in charts.CHARTS:
        lines = (charts.CHARTS_DIR / chart / "values.yaml").read_text().splitlines()
        stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
        comment: list[str] = []
        undocumented = []
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("#"):
                comment.append(stripped)
                continue
            m = re.match(r"^( *)(- )?([\w.-]+):(.*)$", line)
            if not m or m.group(2):
                comment = []
                continue
            indent, key, rest = len(m.group(1)), m.group(3), m.group(4).strip()
            while stack and stack[-1][0] >= indent:
                stack.pop()
            documented = any(c.startswith("# --") for c in comment) or any(d for _, d in stack)
            is_parent = rest == "" and i + 1 < len(lines) and lines[i + 1].startswith(" " * (indent + 2))
            if not is_parent and not documented:
                undocumented.append(key)
            stack.append((indent, documented))
            comment = []
        assert not undocumented, f"{chart}/values.yaml: no `# --` doc for {undocumented}"


def test_schemas_are_up_to_date():
    assert chart_schemas.main(["--check"]) == 0


@pytest.mark.parametrize("chart, values_file", CASES)
def test_renders_and_validates(chart, values_file):
    objects = rendered(chart, values_file)
    assert objects, f"{chart} with {values_file} rendered nothing"
    assert [str(f) for f in charts.validate_all(objects)] == []
    assert (
        charts.lint(chart, charts.load_values_files([charts.CHARTS_DIR / chart / "ci" / values_file])) == []
    )


def test_validation_catches_mistakes():
    rayjob = next(o for o in rendered("ray-job", "sft-values.yaml") if o["kind"] == "RayJob")
    broken = yaml.safe_load(yaml.safe_dump(rayjob))
    broken["spec"]["shutdownAfterJobFinish"] = True  # typo: the API server would silently drop it
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ] = 3
    messages = [f.message for f in charts.validate_object(broken)]
    assert any("shutdownAfterJobFinish" in m for m in messages)
    assert any("resources" in m for m in messages)
    deployment = next(o for o in rendered("tulpar", "default-values.yaml") if o["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    assert charts.validate_object(bad)


@pytest.mark.parametrize("chart, values_file", CASES)
def test_pods_are_hardened_with_resources_and_probes(chart, values_file):
    for obj in ours(rendered(chart, values_file)):
        for where, spec, long_running in pod_specs(obj):
            name = f"{charts.kn(obj)}[{where}]"
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000, name
            assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
            assert spec["automountServiceAccountToken"] is (
                where == "head"
                and obj["spec"]
                .get("rayClusterSpec", obj["spec"].get("rayClusterConfig", obj["spec"]))
                .get("enableInTreeAutoscaling", False)
            ), name
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, name
                assert sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"], name
                assert sc["readOnlyRootFilesystem"] is True, name
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][part]), f"{name} {c['name']} {part}"
                if long_running and c in spec["containers"]:
                    assert c["livenessProbe"] and c["readinessProbe"], f"{name} {c['name']} probes"
                assert ":" in c["image"].rsplit("/", 1)[-1] or "@sha256:" in c["image"], c["image"]
                assert not c["image"].endswith(":latest"), c["image"]


def test_gpu_worker_groups():
    rc = next(o for o in rendered("ray-cluster", "multi-gpu-values.yaml") if o["kind"] == "RayCluster")
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    h100 = groups["h100x8"]
    container = h100["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert h100["rayStartParams"]["num-gpus"] == "8"
    assert h100["template"]["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert h100["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert (h100["minReplicas"], h100["maxReplicas"], h100["replicas"]) == (0, 4, 2)
    assert container["image"].endswith("@sha256:" + "0" * 64)
    # the CPU laptop profile asks for no GPU at all
    laptop = next(o for o in rendered("ray-cluster", "laptop-cpu-values.yaml") if o["kind"] == "RayCluster")
    text = yaml.safe_dump(laptop)
    assert "nvidia.com/gpu" not in text and "tulpar-train-cpu:0.1.0" in text


def test_autoscaling_bounds():
    rc = next(o for o in rendered("ray-cluster", "default-values.yaml") if o["kind"] == "RayCluster")
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    assert spec["autoscalerOptions"]["upscalingMode"] == "Default"
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8)  # scale to zero
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["authOptions"] == {"mode": "token"}

    rs = next(o for o in rendered("llm-serve", "scale-to-zero-values.yaml") if o["kind"] == "RayService")
    assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "services.llm_serve.app:build_app"
    model = app["args"]["models"][0]
    assert model["source"] == "models:/kk-350m@champion" and model["served_name"] == "kk-350m"
    assert model["autoscaling"]["min_replicas"] == 0 and model["autoscaling"]["max_replicas"] == 4
    assert model["tensor_parallel_size"] == 2 and app["args"]["use_gpu"] is True
    assert app["args"]["accelerator_type"] == "H100"
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    readiness = worker["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert readiness == {"path": "/-/healthz", "port": 8000}


@pytest.mark.parametrize("values_file", [f for c, f in CASES if c == "llm-serve"])
def test_serve_args_are_a_valid_serve_config(values_file):
    """The serving app's own config model accepts what the chart hands build_app (the contract between them)."""
    from services.llm_serve.config import ServeConfig

    rs = next(o for o in rendered("llm-serve", values_file) if o["kind"] == "RayService")
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.models[0].source.startswith("models:/") and cfg.host == "0.0.0.0" and cfg.port == 8000


def test_serving_defaults():
    rs = next(o for o in rendered("llm-serve", "default-values.yaml") if o["kind"] == "RayService")
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (
        args["models"][0]["source"] == "models:/tulpar-tiny@champion"
        and "served_name" not in args["models"][0]
    )
    assert rs["metadata"]["annotations"]["tulpar.io/model-uri"] == "models:/tulpar-tiny@champion"
    cpu = next(o for o in rendered("llm-serve", "laptop-cpu-values.yaml") if o["kind"] == "RayService")
    cpu_args = yaml.safe_load(cpu["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (
        cpu_args["use_gpu"] is False
        and cpu_args["kv_cache_space_gb"] == 1
        and "nvidia.com/gpu" not in str(cpu)
    )


SECRET_WORDS = re.compile(r"(password|passwd|secret|token|access_?key|private_?key)", re.I)


def leaf_items(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaf_items(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaf_items(v, f"{path}[{i}]")
    else:
        yield path, node


def test_secrets_never_in_values_or_specs():
    files = [
        p for c in charts.CHARTS for p in [charts.CHARTS_DIR / c / "values.yaml", *charts.ci_values_files(c)]
    ]
    for f in files:
        for path, _value in leaf_items(yaml.safe_load(f.read_text()) or {}):
            last = path.rsplit(".", 1)[-1]
            # keys *naming* a Secret or a key inside one are fine; a credential value is not
            if SECRET_WORDS.search(last) and not re.search(
                r"(existingSecret|FromSecret|secretName|Key|generate)$", last
            ):
                pytest.fail(f"{f}: {path} looks like a credential in values")
    for chart, values_file in CASES:
        for obj in ours(rendered(chart, values_file)):
            for _, spec, _ in pod_specs(obj):
                for c in spec.get("initContainers", []) + spec["containers"]:
                    for e in c.get("env", []):
                        if e["name"].endswith("_FILE"):  # a path to a mounted Secret file
                            assert e["value"].startswith("/run/secrets/"), f"{chart}: {e}"
                        elif SECRET_WORDS.search(e["name"]):
                            assert "valueFrom" in e and "secretKeyRef" in e["valueFrom"], f"{chart}: {e}"
    mlflow = next(
        o
        for o in rendered("tulpar", "default-values.yaml")
        if o["metadata"]["name"] == "tulpar-mlflow" and o["kind"] == "Deployment"
    )
    env = {e["name"]: e for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        "postgresql+psycopg://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)@tulpar-postgresql:5432/mlflow"
    )
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "tulpar-postgres",
        "key": "POSTGRES_PASSWORD",
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "tulpar-s3"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"] == "s3://tulpar-mlflow/artifacts"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://tulpar-minio:9000"
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--serve-artifacts" in args
    # generated credentials are kept across upgrades and uninstalls
    generated = [o for o in rendered("tulpar", "default-values.yaml") if o["kind"] == "Secret"]
    assert {o["metadata"]["name"] for o in generated} == {"tulpar-postgres", "tulpar-s3"}
    assert all(o["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for o in generated)
    # with your own Secrets nothing is generated
    managed = rendered("tulpar", "managed-services-values.yaml")
    assert not [o for o in managed if o["kind"] == "Secret"]


def test_image_tag_and_digest_values_land_everywhere():
    for chart in ("ray-cluster", "ray-job", "llm-serve"):
        objects = charts.render(chart, {"image": {"repository": "reg.example/t", "tag": "1.2.3"}})
        images = {c["image"] for o in objects for _, s, _ in pod_specs(o) for c in s["containers"]}
        assert images == {"reg.example/t:1.2.3"}, (chart, images)
    platform = charts.render(
        "tulpar",
        {"gateway": {"image": {"tag": "7.7.7"}}, "chatUi": {"image": {"digest": "sha256:" + "a" * 64}}},
    )
    images = {c["image"] for o in ours(platform) for _, s, _ in pod_specs(o) for c in s["containers"]}
    assert "ghcr.io/tulpar-ai/tulpar-gateway:7.7.7" in images
    assert "ghcr.io/tulpar-ai/tulpar-chat-ui@sha256:" + "a" * 64 in images
    # the pinned versions match pyproject (ray) and the released KubeRay operator
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_version = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    for chart in ("ray-cluster", "ray-job", "llm-serve"):
        assert (
            yaml.safe_load((charts.CHARTS_DIR / chart / "values.yaml").read_text())["rayVersion"]
            == ray_version
        )


def test_kuberay_operator_is_a_pinned_dependency_rendered_from_the_local_copy():
    meta = yaml.safe_load((charts.CHARTS_DIR / "tulpar" / "Chart.yaml").read_text())
    dep = next(d for d in meta["dependencies"] if d["name"] == "kuberay-operator")
    assert dep["version"] == charts.KUBERAY_VERSION and re.fullmatch(r"\d+\.\d+\.\d+", dep["version"])
    assert dep["repository"] == "https://ray-project.github.io/kuberay-helm/"
    assert dep["condition"] == "kuberay-operator.enabled"
    values = yaml.safe_load((charts.CHARTS_DIR / "tulpar" / "values.yaml").read_text())
    assert values["kuberay-operator"]["image"]["tag"] == f"v{charts.KUBERAY_VERSION}"
    objects = rendered("tulpar", "default-values.yaml")
    operator = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "kuberay-operator"
    )
    assert (
        operator["spec"]["template"]["spec"]["containers"][0]["image"]
        == f"quay.io/kuberay/operator:v{charts.KUBERAY_VERSION}"
    )
    assert not [
        o for o in rendered("tulpar", "managed-services-values.yaml") if "kuberay" in o["metadata"]["name"]
    ]


def test_platform_names_match_the_ray_charts_defaults():
    """The Ray charts' default settings point at what `helm install tulpar charts/tulpar` creates."""
    objects = rendered("tulpar", "default-values.yaml")
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for chart in ("ray-cluster", "ray-job"):
        settings = yaml.safe_load((charts.CHARTS_DIR / chart / "values.yaml").read_text())["settings"]
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", settings["mlflowTrackingUri"]).groups()
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
        s3_host, s3_port = re.fullmatch(r"http://([\w-]+):(\d+)", settings["s3"]["endpointUrl"]).groups()
        assert int(s3_port) in [p["port"] for p in services[s3_host]["spec"]["ports"]]
        assert settings["s3"]["existingSecret"] in {
            o["metadata"]["name"] for o in objects if o["kind"] == "Secret"
        }
        bucket = settings["storage"].removeprefix("s3://").split("/")[0]
        values = yaml.safe_load((charts.CHARTS_DIR / "tulpar" / "values.yaml").read_text())
        assert bucket == values["s3"]["buckets"]["storage"]


def test_network_policies_and_submitter_rbac():
    objects = rendered("tulpar", "default-values.yaml")
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    pg = policies["tulpar-postgresql"]["ingress"][0]
    assert pg["from"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "tulpar",
                    "app.kubernetes.io/instance": "tulpar",
                    "app.kubernetes.io/component": "mlflow",
                }
            }
        }
    ]
    assert pg["ports"] == [{"protocol": "TCP", "port": 5432}]
    assert {"tulpar-minio", "tulpar-mlflow", "tulpar-gateway", "tulpar-chat-ui", "tulpar-ray"} <= set(
        policies
    )
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "tulpar-submitter")
    ray_rule = next(r for r in role["rules"] if r["apiGroups"] == ["ray.io"] and "rayjobs" in r["resources"])
    assert "create" in ray_rule["verbs"]
    assert not [o for o in objects if o["kind"] == "ClusterRole" and "tulpar" in o["metadata"]["name"]]


def test_gateway_metrics_port_is_separate_and_closed_by_default():
    """The API port is open to Tulpar pods and the ingress; the admin (metrics) port only to gatewayMetricsFrom;
    probes use /livez (a down upstream must not take the gateway out of its Service)."""
    for values_file, metrics_from in (
        ("default-values.yaml", None),
        ("managed-services-values.yaml", [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]),
    ):  # fmt: skip
        objects = rendered("tulpar", values_file)
        by = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        svc_ports = {p["name"]: p["port"] for p in by["Service", "tulpar-gateway"]["spec"]["ports"]}
        assert svc_ports == {"http": 8080, "metrics": 9090}
        pod = by["Deployment", "tulpar-gateway"]["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9090}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert (
            env["TULPAR_GATEWAY__ADMIN__PORT"] == "9090" and env["TULPAR_GATEWAY__ADMIN__HOST"] == "0.0.0.0"
        )
        assert env["TULPAR_GATEWAY__STATE_DIR"] in {m["mountPath"] for m in c["volumeMounts"]}
        assert c["livenessProbe"]["httpGet"]["path"] == c["readinessProbe"]["httpGet"]["path"] == "/livez"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
        rules = by["NetworkPolicy", "tulpar-gateway"]["spec"]["ingress"]
        assert rules[0]["ports"] == [{"protocol": "TCP", "port": 8080}]
        if metrics_from is None:
            assert len(rules) == 1  # nobody outside the pod reaches /metrics
        else:
            assert rules[1] == {"from": metrics_from, "ports": [{"protocol": "TCP", "port": 9090}]}


def stage_configs():
    for stage in chart_schemas.STAGES:
        for path in sorted((REPO / "configs" / stage).glob("*.yaml")):
            yield stage, path


@pytest.mark.parametrize("stage, path", list(stage_configs()), ids=lambda x: getattr(x, "name", x))
def test_one_rayjob_per_stage_config_runs_the_local_command(stage, path):
    objects = charts.render("ray-job", {"stage": stage, "config": path.stem, "overrides": ["a.b=1"]})
    rayjob = next(o for o in objects if o["kind"] == "RayJob")
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    assert charts.validate_all(objects) == []
    assert shlex.split(rayjob["spec"]["entrypoint"]) == [
        "python", "-m", f"jobs.{stage}", "--config", f"/configs/{stage}/{path.name}", "a.b=1",
    ]  # fmt: skip
    assert (REPO / "jobs" / f"{stage}.py").is_file()
    # the file the job reads is the repo's file, byte for byte (a ConfigMap keeps text as is)
    assert cm["data"][f"{stage}__{path.name}"] == path.read_text().rstrip("\n")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "configs")
    assert mount == {"name": "configs", "mountPath": "/configs", "readOnly": True}
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] == 3600 and rayjob["spec"]["backoffLimit"] == 1


def test_rayjob_on_an_existing_cluster():
    objects = rendered("ray-job", "existing-cluster-values.yaml")
    assert [o["kind"] for o in objects] == ["RayJob"]
    spec = objects[0]["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "tulpar-ray-cluster"}
    assert "rayClusterSpec" not in spec and spec["shutdownAfterJobFinishes"] is False
    cluster = next(o for o in rendered("ray-cluster", "default-values.yaml") if o["kind"] == "RayCluster")
    assert cluster["metadata"]["name"] == "tulpar-ray-cluster"
    volumes = cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    items = next(v for v in volumes if v["name"] == "configs")["configMap"]["items"]
    assert {"key": "sft__tiny.yaml", "path": "sft/tiny.yaml"} in items


def gpu_group(**extra):
    group = {
        "name": "g",
        "maxReplicas": 2,
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }
    return {"workerGroups": [{**group, **extra}]}


@pytest.mark.parametrize(
    "chart, values, message",
    [
        (
            "ray-cluster",
            gpu_group(minReplicas=-1),
            "at '/workerGroups/0/minReplicas': minimum: got -1, want 0",
        ),
        ("ray-job", gpu_group(replicas=-2), "at '/workerGroups/0/replicas': minimum: got -2, want 0"),
        ("ray-cluster", {"image": {"repository": ""}}, "at '/image/repository': minLength: got 0, want 1"),
        ("llm-serve", {"image": {"tag": "", "digest": ""}}, "at '/image/tag': minLength: got 0, want 1"),
        ("ray-cluster", gpu_group(gpus=1), "at '/workerGroups/0': missing property 'nodeSelector'"),
        ("llm-serve", gpu_group(gpus=4, nodeSelector={}), "at '/workerGroups/0/nodeSelector': minProperties"),
        (
            "ray-cluster",
            gpu_group(minReplicas=3),
            'workerGroups "g": minReplicas (3) is above maxReplicas (2)',
        ),
        ("llm-serve", {"model": {"uri": "s3://bucket/model"}}, "at '/model/uri'"),
        (
            "llm-serve",
            {"model": {"autoscaling": {"maxReplicas": 9}}},
            "= 9 GPUs, but the worker groups can grow to 4",
        ),
        (
            "llm-serve",
            {"model": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}},
            "minReplicas (3) is above",
        ),
        ("ray-job", {"stage": "train"}, "at '/stage': value must be one of"),
        ("ray-job", {"config": "nope"}, "config configs/pretrain/nope.yaml not found: choose one of ["),
        ("ray-job", {"overrides": ["steps"]}, "at '/overrides/0'"),
        (
            "tulpar",
            {"postgresql": {"auth": {"password": "hunter2"}}},
            "additional properties 'password' not allowed",
        ),
        ("tulpar", {"minio": {"enabled": False}}, "at '/s3/existingSecret': minLength: got 0, want 1"),
        (
            "tulpar",
            {"postgresql": {"enabled": False, "auth": {"existingSecret": "db"}}},
            "at '/postgresql/external/host'",
        ),
    ],
)
def test_bad_values_fail_with_a_message(chart, values, message):
    with pytest.raises(charts.ChartError) as err:
        charts.render(chart, values)
    assert message in str(err.value)


def test_notes_say_what_to_do_next():
    assert "make submit-pretrain CONFIG=tiny TARGET=k8s" in charts.notes("tulpar")
    assert "kubectl -n tulpar logs -f job/pretrain-tiny" in charts.notes("ray-job")
    assert "port-forward svc/tulpar-llm-serve-serve-svc 8000:8000" in charts.notes("llm-serve")
    assert "gpu: 0..8 pods, 1 GPU each" in charts.notes("ray-cluster")


def test_configs_symlinks_point_at_the_repo_configs():
    for chart in ("ray-cluster", "ray-job"):
        link = charts.CHARTS_DIR / chart / "configs"
        assert link.is_symlink() and link.resolve() == (REPO / "configs").resolve()
    assert not (Path(charts.CHARTS_DIR / "llm-serve" / "configs")).exists()

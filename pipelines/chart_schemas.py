"""The charts' values.schema.json files, written from the definitions below so that the pieces the Ray charts share
(image, resources, settings, worker groups, autoscaler) are defined once. Helm validates values against them on
`helm template/install/upgrade`, so bad values fail before anything reaches the cluster.

    python -m pipelines.chart_schemas          # rewrite charts/*/values.schema.json
    python -m pipelines.chart_schemas --check  # exit 1 when a committed schema differs (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CHARTS_DIR = Path(__file__).resolve().parent.parent / "charts"
# The stages a Tulpar job runs (`jobs.<stage>`): the job chart's `stage` enum and pipelines.submit's list.
STAGES = [
    "preprocess",
    "tokenizer",
    "tokenizer_report",
    "pretrain",
    "sft",
    "dpo",
    "reward_model",
    "rl",
    "distill",
    "eval",
]
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    out.update(extra)
    return out


STR = {"type": "string"}
BOOL = {"type": "boolean"}
NONEMPTY = {"type": "string", "minLength": 1}
MAP = {"type": "object"}
LIST = {"type": "array"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
NONNEG = {"type": "integer", "minimum": 0}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
QUANTITY = {"type": ["string", "integer", "number"], "pattern": "^[0-9.]+[a-zA-Z]*$"}
NAME_OVERRIDES = {"nameOverride": STR, "fullnameOverride": STR}

IMAGE = obj(
    {
        "repository": {"type": "string", "minLength": 1},
        "tag": STR,
        "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    },
    ["repository", "pullPolicy"],
    anyOf=[
        {"required": ["tag"], "properties": {"tag": {"minLength": 1}}},
        {"required": ["digest"], "properties": {"digest": {"minLength": 1}}},
    ],
)
RESOURCE_LIST = {
    "type": "object",
    "required": ["cpu", "memory"],
    "properties": {"cpu": QUANTITY, "memory": QUANTITY},
    "additionalProperties": QUANTITY,
}
RESOURCES = obj({"requests": RESOURCE_LIST, "limits": RESOURCE_LIST}, ["requests", "limits"])
POD_SECURITY = obj(
    {"runAsUser": {"type": "integer", "minimum": 1}, "runAsGroup": NONNEG, "fsGroup": NONNEG},
    ["runAsUser"],
)
SECURITY = obj({"readOnlyRootFilesystem": BOOL})
S3_SETTINGS = obj(
    {
        "endpointUrl": STR,
        "region": STR,
        "existingSecret": STR,
        "accessKeyIdKey": {"type": "string", "minLength": 1},
        "secretAccessKeyKey": {"type": "string", "minLength": 1},
    }
)
SETTINGS = obj(
    {
        "mlflowTrackingUri": {"type": "string", "pattern": "^(https?|sqlite|file)://"},
        "storage": {"type": "string"},
        "home": {"type": "string", "minLength": 1},
        "data": {"type": "string", "minLength": 1},
        "s3": S3_SETTINGS,
        "extraEnv": LIST,
    },
    ["mlflowTrackingUri", "home", "data"],
)
CLAIM = obj({"existingClaim": STR, "mountPath": {"type": "string", "pattern": "^/"}})
STORAGE = obj(
    {"checkpoints": CLAIM, "data": CLAIM, "tmpSizeLimit": QUANTITY, "shmSizeLimit": QUANTITY},
    ["checkpoints", "data", "tmpSizeLimit", "shmSizeLimit"],
)
SCHEDULING = {
    "nodeSelector": STR_MAP,
    "tolerations": LIST,
    "affinity": MAP,
    "labels": STR_MAP,
    "annotations": STR_MAP,
}
HEAD = obj({"resources": RESOURCES, "rayStartParams": MAP, **SCHEDULING}, ["resources"])
WORKER_GROUP = obj(
    {
        "name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 30},
        "replicas": NONNEG,
        "minReplicas": NONNEG,
        "maxReplicas": {"type": "integer", "minimum": 1},
        "gpus": NONNEG,
        "resources": RESOURCES,
        "rayStartParams": MAP,
        **SCHEDULING,
    },
    ["name", "maxReplicas", "resources"],
    # A GPU group must say which nodes have the GPUs (the GPU node pool's label).
    **{
        "if": {"required": ["gpus"], "properties": {"gpus": {"minimum": 1}}},
        "then": {"required": ["nodeSelector"], "properties": {"nodeSelector": {"minProperties": 1}}},
    },
)
AUTOSCALER = obj(
    {
        "enabled": BOOL,
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "upscalingMode": {"enum": ["Conservative", "Default", "Aggressive"]},
        "resources": RESOURCES,
    },
    ["enabled", "idleTimeoutSeconds", "upscalingMode", "resources"],
)


def ray_chart_properties() -> dict[str, Any]:
    """Values every Ray chart (ray-cluster, ray-job, llm-serve) shares: the tulpar.rayClusterSpec inputs."""
    return {
        **NAME_OVERRIDES,
        "image": IMAGE,
        "imagePullSecrets": LIST,
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+"},
        "rayAuth": obj({"enabled": BOOL}, ["enabled"]),
        "settings": SETTINGS,
        "storage": STORAGE,
        "serviceAccount": obj({"name": STR}),
        "podSecurityContext": POD_SECURITY,
        "securityContext": SECURITY,
        "head": HEAD,
        "workerGroups": {"type": "array", "items": WORKER_GROUP},
        "autoscaler": AUTOSCALER,
    }


RAY_REQUIRED = ["image", "rayVersion", "rayAuth", "settings", "storage", "head", "workerGroups", "autoscaler"]


def root(title: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": title,
        **obj({**properties, "global": MAP, "tulpar-lib": MAP}, required),
    }


def ray_cluster() -> dict[str, Any]:
    return root("ray-cluster values", ray_chart_properties(), RAY_REQUIRED)


def ray_job() -> dict[str, Any]:
    props = ray_chart_properties()
    props.pop("fullnameOverride")
    props.update(
        {
            "stage": {"enum": STAGES},
            "config": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
            "overrides": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_.-]*=[^'\\n]*$"},
            },
            "configContent": STR,
            "name": {"type": "string", "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "maxLength": 40},
            "job": obj(
                {
                    "shutdownAfterJobFinishes": BOOL,
                    "ttlSecondsAfterFinished": NONNEG,
                    "backoffLimit": NONNEG,
                    "submitterBackoffLimit": NONNEG,
                    "activeDeadlineSeconds": NONNEG,
                    "runtimeEnv": MAP,
                    "submitterResources": RESOURCES,
                },
                ["shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit", "submitterResources"],
            ),
            "cluster": obj({"existing": STR}),
        }
    )
    return root("ray-job values", props, [*RAY_REQUIRED, "stage", "config", "job", "cluster"])


def llm_serve() -> dict[str, Any]:
    props = ray_chart_properties()
    props.update(
        {
            "model": obj(
                {
                    "uri": {"type": "string", "pattern": "^models:/[^@/]+(@[A-Za-z0-9_.-]+|/[0-9]+)$"},
                    "servedName": STR,
                    "dtype": {"enum": ["auto", "float32", "float16", "bfloat16"]},
                    "maxModelLen": NONNEG,
                    "gpuMemoryUtilization": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "tensorParallelSize": {"type": "integer", "minimum": 1},
                    "quantization": {
                        "enum": ["none", "bitsandbytes", "awq", "gptq", "int8_per_channel_weight_only"]
                    },
                    "engineArgs": MAP,
                    "autoscaling": obj(
                        {
                            "minReplicas": NONNEG,
                            "initialReplicas": NONNEG,
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "targetOngoingRequests": {"type": "number", "exclusiveMinimum": 0},
                        },
                        ["minReplicas", "maxReplicas", "targetOngoingRequests"],
                    ),
                },
                ["uri", "dtype", "tensorParallelSize", "quantization", "autoscaling"],
            ),
            "serve": obj(
                {
                    "importPath": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"},
                    "appName": {"type": "string", "minLength": 1},
                    "routePrefix": {"type": "string", "pattern": "^/"},
                    "useGpu": BOOL,
                    "acceleratorType": STR,
                    "cpusPerReplica": {"type": "number", "exclusiveMinimum": 0},
                    "extraArgs": MAP,
                },
                ["importPath", "appName", "routePrefix", "useGpu"],
            ),
            "upgradeStrategy": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
        }
    )
    return root("llm-serve values", props, [*RAY_REQUIRED, "model", "serve", "upgradeStrategy"])


def web_app(port_default_doc: str, **more: Any) -> dict[str, Any]:
    return obj(
        {
            **more,
            "enabled": BOOL,
            "image": IMAGE,
            "replicas": NONNEG,
            "port": PORT,
            "healthPath": {"type": "string", "pattern": "^/"},
            "upstreamUrl": {"type": "string", "pattern": "^https?://"},
            "gatewayUrl": {"type": "string", "pattern": "^(https?://.*)?$"},
            "envFromSecret": STR,
            "extraEnv": LIST,
            "resources": RESOURCES,
            "nodeSelector": STR_MAP,
        },
        ["enabled", "image", "replicas", "port", "healthPath", "resources"],
        description=port_default_doc,
    )


def tulpar() -> dict[str, Any]:
    volume = obj({"size": QUANTITY, "storageClass": STR}, ["size"])
    props = {
        **NAME_OVERRIDES,
        "imagePullSecrets": LIST,
        "podSecurityContext": POD_SECURITY,
        "securityContext": SECURITY,
        "secrets": obj({"generate": BOOL}, ["generate"]),
        "kuberay-operator": {"type": "object", "properties": {"enabled": BOOL}, "required": ["enabled"]},
        "postgresql": obj(
            {
                "enabled": BOOL,
                "image": IMAGE,
                "auth": obj(
                    {
                        "username": {"type": "string", "minLength": 1},
                        "database": {"type": "string", "minLength": 1},
                        "existingSecret": STR,
                        "passwordKey": {"type": "string", "minLength": 1},
                    },
                    ["username", "database", "passwordKey"],
                ),
                "external": obj({"host": STR, "port": PORT}),
                "persistence": volume,
                "resources": RESOURCES,
                "nodeSelector": STR_MAP,
            },
            ["enabled", "auth"],
            **{
                "if": {"properties": {"enabled": {"const": False}}},
                "then": {
                    "properties": {
                        "external": {"required": ["host"], "properties": {"host": {"minLength": 1}}}
                    }
                },
            },
        ),
        "minio": obj(
            {
                "enabled": BOOL,
                "image": IMAGE,
                "persistence": volume,
                "resources": RESOURCES,
                "nodeSelector": STR_MAP,
            },
            ["enabled"],
        ),
        "s3": obj(
            {
                "endpointUrl": {"type": "string", "pattern": "^(https?://.*)?$"},
                "region": STR,
                "existingSecret": STR,
                "accessKeyIdKey": {"type": "string", "minLength": 1},
                "secretAccessKeyKey": {"type": "string", "minLength": 1},
                "buckets": obj(
                    {
                        "artifacts": {"type": "string", "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"},
                        "storage": {"type": "string", "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"},
                    },
                    ["artifacts", "storage"],
                ),
                "createBuckets": BOOL,
            },
            ["buckets"],
        ),
        "mlflow": obj(
            {
                "image": IMAGE,
                "replicas": {"type": "integer", "minimum": 1},
                "workers": {"type": "integer", "minimum": 1},
                "port": PORT,
                "artifactsPrefix": {"type": "string", "minLength": 1},
                "allowedHosts": {"type": "array", "items": STR},
                "resources": RESOURCES,
                "nodeSelector": STR_MAP,
            },
            ["image", "replicas", "workers", "port", "artifactsPrefix", "resources"],
        ),
        "gateway": web_app(
            "python -m services.gateway; listens on $PORT, GET healthPath answers 200; metrics on metricsPort",
            metricsPort=PORT,
        ),
        "chatUi": web_app("python -m services.chat_ui; listens on $PORT, GET healthPath answers 200"),
        "ingress": obj(
            {
                "enabled": BOOL,
                "className": STR,
                "annotations": STR_MAP,
                "hosts": obj({"gateway": STR, "chatUi": STR, "mlflow": STR}),
                "tls": LIST,
            }
        ),
        "rbac": obj({"create": BOOL, "submitters": LIST}),
        "networkPolicy": obj(
            {
                "enabled": BOOL,
                "ingressNamespaceLabels": STR_MAP,
                "mlflowFrom": LIST,
                "gatewayFrom": LIST,
                "gatewayMetricsFrom": LIST,
                "rayFrom": LIST,
            }
        ),
    }
    schema = root(
        "tulpar platform values",
        props,
        ["secrets", "postgresql", "minio", "s3", "mlflow", "gateway", "chatUi", "rbac", "networkPolicy"],
    )
    # Credentials the chart does not generate must come from Secrets you created, named in values.
    s3_secret = {
        "properties": {"s3": {"required": ["existingSecret"], "properties": {"existingSecret": NONEMPTY}}}
    }
    pg_secret = {
        "properties": {
            "postgresql": {
                "properties": {
                    "auth": {"required": ["existingSecret"], "properties": {"existingSecret": NONEMPTY}}
                }
            }
        }
    }
    no_generate = {"properties": {"secrets": {"properties": {"generate": {"const": False}}}}}
    schema["allOf"] = [
        {"if": no_generate, "then": {"allOf": [s3_secret, pg_secret]}},
        {"if": {"properties": {"minio": {"properties": {"enabled": {"const": False}}}}}, "then": s3_secret},
        {
            "if": {"properties": {"postgresql": {"properties": {"enabled": {"const": False}}}}},
            "then": pg_secret,
        },
    ]
    return schema


SCHEMAS = {"tulpar": tulpar, "ray-cluster": ray_cluster, "ray-job": ray_job, "llm-serve": llm_serve}


def render(name: str) -> str:
    return json.dumps(SCHEMAS[name](), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.chart_schemas", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="fail when a committed schema is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in SCHEMAS:
        path = CHARTS_DIR / name / "values.schema.json"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run `python -m pipelines.chart_schemas`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render Tulpar's Helm charts with a real Helm (helm-python-sdk: Helm's Go engine, no `helm` binary) and validate
what they produce: Kubernetes objects against the Kubernetes OpenAPI schema (kubernetes-validate, pinned version) and
ray.io/v1 objects against the KubeRay CRDs' openAPIV3Schema.

Charts depend on the `tulpar-lib` library chart (file://../tulpar-lib) and `tulpar` on the released KubeRay operator
chart. `prepare_chart` copies a chart into a work directory (following the `configs` symlink) and resolves its
dependencies offline: file:// ones as Helm does, remote ones from a local chart copy given as an override (the
upstream operator chart in $TULPAR_DATA/k8s/kuberay). A real install resolves the remote one from KubeRay's Helm
repository instead (`make charts-deps`).

    python -m pipelines.charts render ray-job -f charts/ray-job/ci/pretrain-values.yaml --set stage=sft
    python -m pipelines.charts check          # render every chart with every ci/*.yaml and validate it all
"""

from __future__ import annotations

import argparse
import atexit
import copy
import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHARTS_DIR = REPO / "charts"
CHARTS = ("tulpar", "ray-cluster", "ray-job", "llm-serve")
LIBRARY = "tulpar-lib"
# Kubernetes version the rendered objects are validated against (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.33.0"
# The KubeRay operator chart version the `tulpar` chart pins (charts/tulpar/Chart.yaml); real installs pull it.
KUBERAY_VERSION = "1.5.1"
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


class ChartError(ValueError):
    """A chart that does not render (bad values, failed schema, a template `fail`): the message says which."""


def data_dir() -> Path:
    env = os.environ.get("TULPAR_DATA")
    return Path(env).resolve() if env else (REPO.parent / "shared" / "data").resolve()


def local_kuberay_chart() -> Path:
    """The upstream KubeRay operator chart (with its CRDs) kept in TULPAR_DATA for offline rendering."""
    return data_dir() / "k8s" / "kuberay" / "kuberay-operator"


def _helm():
    try:
        import helm_python
    except ImportError as exc:  # pragma: no cover - dev extra
        raise ChartError(
            "helm-python-sdk is not installed: `pip install -e .[dev]` (it renders charts without a helm binary)"
        ) from exc
    helm_python.disable_logging()
    return helm_python


def prepare_chart(
    name: str, workdir: Path, *, overrides: dict[str, Path] | None = None, charts_dir: Path = CHARTS_DIR
) -> Path:
    """Copy charts/<name> into workdir and resolve its dependencies without a network.

    `overrides` maps a remote dependency's name to a local chart directory used in its place (its version is taken
    from that chart). Remote dependencies without an override are left out: Helm renders the chart without them,
    which is what `<dep>.enabled=false` gives as well."""
    helm = _helm()
    src = charts_dir / name
    if not (src / "Chart.yaml").is_file():
        raise ChartError(f"no chart {name!r} in {charts_dir}: choose one of {', '.join(CHARTS)}")
    dest = workdir / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, symlinks=False, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    meta = yaml.safe_load((dest / "Chart.yaml").read_text())
    deps = []
    for dep in meta.get("dependencies", []):
        repo = dep.get("repository", "")
        if repo.startswith("file://"):
            target = (src / repo[len("file://") :]).resolve()
            dep = {**dep, "repository": f"file://{target}"}
        elif overrides and dep["name"] in overrides:
            local = Path(overrides[dep["name"]]).resolve()
            version = yaml.safe_load((local / "Chart.yaml").read_text())["version"]
            dep = {**dep, "repository": f"file://{local}", "version": str(version)}
        else:
            continue
        deps.append(dep)
    meta["dependencies"] = deps
    (dest / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    if deps:
        helm.dependency_update(dest, skip_refresh=True)
    return dest


@functools.lru_cache(maxsize=8)
def _prepared(name: str, with_operator: bool) -> Path:
    root = Path(tempfile.mkdtemp(prefix="tulpar-charts-"))
    atexit.register(shutil.rmtree, root, True)
    overrides = {"kuberay-operator": local_kuberay_chart()} if with_operator else None
    return prepare_chart(name, root, overrides=overrides)


def load_values_files(files: Iterable[str | Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for f in files:
        merged = deep_merge(merged, yaml.safe_load(Path(f).read_text()) or {})
    return merged


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_sets(sets: Iterable[str]) -> dict[str, Any]:
    """`--set a.b=1,c=x` expressions, parsed by Helm's own strvals parser."""
    helm = _helm()
    values: dict[str, Any] = {}
    for expr in sets:
        values = deep_merge(values, helm.parse_set_string(expr))
    return values


def render(
    name: str,
    values: dict[str, Any] | None = None,
    *,
    release: str = "tulpar",
    namespace: str = "tulpar",
    with_operator: bool = True,
    chart_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Render a chart to a list of Kubernetes objects (NOTES.txt and empty documents dropped).

    Raises ChartError with Helm's message when values fail the chart's schema or a template fails."""
    helm = _helm()
    path = chart_dir or _prepared(name, with_operator and name == "tulpar")
    try:
        with helm.Chart.load(str(path)) as chart:
            manifests = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    except helm.HelmError as exc:
        raise ChartError(f"chart {name}: {exc}") from None
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", None)
                if doc["metadata"]["annotations"] is None:
                    del doc["metadata"]["annotations"]
                objects.append(doc)
    return objects


def notes(
    name: str, values: dict[str, Any] | None = None, *, release: str = "tulpar", namespace: str = "tulpar"
):
    helm = _helm()
    with helm.Chart.load(str(_prepared(name, name == "tulpar"))) as chart:
        manifests = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    return next((v for k, v in manifests.items() if k.endswith("NOTES.txt")), "")


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(o, sort_keys=False) for o in objects)


# -- validation ----------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    obj: str
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.message}"


def kn(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


@functools.lru_cache(maxsize=1)
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): openAPIV3Schema made strict} from the KubeRay CRDs."""
    out = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for plural in RAY_KINDS.values():
        path = local_kuberay_chart() / "crds" / f"ray.io_{plural}.yaml"
        for crd in yaml.load_all(path.read_text(), Loader=loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                out[(f"{group}/{version['name']}", kind)] = schema
    return out


def strict_schema(schema: Any) -> Any:
    """A CRD schema where unknown fields fail instead of being pruned by the API server (catches typos), and
    int-or-string fields accept both."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_object(obj: dict[str, Any], k8s_version: str = KUBERNETES_VERSION) -> list[Finding]:
    """Schema errors of one object: CRD schema for ray.io objects, the Kubernetes OpenAPI schema otherwise."""
    api = obj.get("apiVersion", "")
    if api.startswith("ray.io/"):
        import jsonschema

        schema = crd_schemas().get((api, obj.get("kind")))
        if schema is None:
            return [Finding(kn(obj), f"no KubeRay CRD for {api} {obj.get('kind')}")]
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        validator = jsonschema.Draft7Validator(schema)
        errors = [
            Finding(kn(obj), f"{'/'.join(map(str, e.absolute_path))}: {e.message}")
            for e in validator.iter_errors(body)
        ]
        return errors + _pod_template_findings(obj, k8s_version)
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [Finding(kn(obj), f"{'/'.join(map(str, exc.path))}: {exc.message}")]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [Finding(kn(obj), str(exc))]
    return []


def pod_templates(obj: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) of every pod a Ray object will create."""
    spec = obj.get("spec", {})
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    if "headGroupSpec" in cluster:
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker:{group['groupName']}", group["template"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def ray_pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods KubeRay will create for the Ray objects, as plain Pod objects (for scanners such as checkov)."""
    pods = []
    for obj in objects:
        if not obj.get("apiVersion", "").startswith("ray.io/"):
            continue
        for where, template in pod_templates(obj):
            meta = template.get("metadata", {})
            pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        **meta,
                        "name": f"{obj['metadata']['name']}-{_name_safe(where.replace(':', '-'))}",
                        "namespace": obj["metadata"].get("namespace", "default"),
                    },
                    "spec": template["spec"],
                }
            )
    return pods


def _pod_template_findings(obj: dict[str, Any], k8s_version: str) -> list[Finding]:
    """The pod templates inside Ray objects, validated as Pods against the Kubernetes schema too."""
    import kubernetes_validate

    findings = []
    for where, template in pod_templates(obj):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x", **template.get("metadata", {})},
            "spec": template.get("spec", {}),
        }
        try:
            kubernetes_validate.validate(pod, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            findings.append(Finding(f"{kn(obj)}[{where}]", f"{'/'.join(map(str, exc.path))}: {exc.message}"))
    return findings


def validate_all(objects: list[dict[str, Any]], k8s_version: str = KUBERNETES_VERSION) -> list[Finding]:
    findings = []
    for obj in objects:
        findings += validate_object(obj, k8s_version)
    return findings


def lint(name: str, values: dict[str, Any] | None = None) -> list[str]:
    """`helm lint --strict` findings (warnings and errors) of a prepared chart."""
    helm = _helm()
    path = _prepared(name, name == "tulpar")
    report = helm.lint(
        str(path), values or {}, strict=True, namespace="tulpar", kube_version=f"v{KUBERNETES_VERSION}"
    )
    # Helm's one INFO finding for charts without an icon is not a problem.
    return [
        f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m.get("severity", 0) >= 2
    ] + list(report.get("errors") or [])


def lint_all() -> int:
    failed = 0
    for chart in CHARTS:
        for values_file in ci_values_files(chart):
            problems = lint(chart, load_values_files([values_file]))
            print(f"{chart:12s} {values_file.name:32s} {'ok' if not problems else 'FAILED'}")
            for p in problems:
                print(f"    {p}")
            failed += bool(problems)
    return 1 if failed else 0


def ci_values_files(name: str) -> list[Path]:
    return sorted((CHARTS_DIR / name / "ci").glob("*.yaml"))


# -- CLI -------------------------------------------------------------------------------------------------------------


def _name_safe(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.charts", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render one chart to YAML on stdout (or --out)")
    r.add_argument("chart", choices=CHARTS)
    r.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    r.add_argument("--set", action="append", default=[], help="Helm --set expression (repeatable)")
    r.add_argument("--release", default="tulpar")
    r.add_argument("--namespace", default="tulpar")
    r.add_argument("--out", type=Path, help="write the YAML here instead of stdout")
    c = sub.add_parser("check", help="render every chart with every ci/*.yaml and validate every object")
    c.add_argument("--out", type=Path, help="also write each rendering to OUT/<chart>--<values>.yaml")
    sub.add_parser("lint", help="helm lint (strict) every chart with every ci/*.yaml, offline")
    sub.add_parser(
        "deps", help="vendor every chart's dependencies into charts/<chart>/charts (needs network)"
    )
    args = parser.parse_args(argv)
    try:
        if args.cmd == "lint":
            return lint_all()
        if args.cmd == "deps":
            helm = _helm()
            for chart in CHARTS:
                helm.dependency_update(CHARTS_DIR / chart)
                print(f"{chart}: dependencies in {CHARTS_DIR / chart / 'charts'}")
            return 0
        if args.cmd == "render":
            values = deep_merge(load_values_files(args.values), parse_sets(args.set))
            text = to_yaml(render(args.chart, values, release=args.release, namespace=args.namespace))
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(text)
                print(f"wrote {args.out}", file=sys.stderr)
            else:
                sys.stdout.write(text)
            return 0
        failed = 0
        for chart in CHARTS:
            for values_file in ci_values_files(chart):
                objects = render(chart, load_values_files([values_file]))
                findings = validate_all(objects)
                status = "ok" if not findings else f"{len(findings)} schema error(s)"
                print(f"{chart:12s} {values_file.name:32s} {len(objects):3d} objects  {status}")
                for f in findings:
                    print(f"    {f}")
                failed += bool(findings)
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    out = args.out / f"{chart}--{_name_safe(values_file.stem)}.yaml"
                    # Ray pods as Pod objects too, so that scanners that skip custom resources check them.
                    out.write_text(to_yaml(objects + ray_pods(objects)))
        print(
            f"validated against Kubernetes {KUBERNETES_VERSION} and the KubeRay CRDs in {local_kuberay_chart()}"
        )
        return 1 if failed else 0
    except ChartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

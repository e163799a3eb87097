"""Container images (infra/images, infra/compose): what can be checked without building them (tests/test_containers.py
builds and runs them where Docker can be started): pinned bases, non-root users, versions equal to
pyproject/Makefile, and a build context without secrets or state."""

from __future__ import annotations

import re

from tests.conftest import REPO

IMAGES = REPO / "infra" / "images"


def pyproject_pin(name: str) -> str:
    return re.search(
        rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text()
    ).group(1)


DOCKERFILES = [
    IMAGES / "Dockerfile",
    IMAGES / "mlflow" / "Dockerfile",
    REPO / "infra/compose/postgres/Dockerfile",
    REPO / "infra/compose/s3/Dockerfile",
]


def test_dockerfiles_pin_bases_and_run_as_non_root():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M))
        for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
            if "$" in base or base in stages:  # a build arg (pinned below) or an earlier stage
                continue
            assert re.search(r":[\w.-]+$", base) and not base.endswith(":latest"), f"{dockerfile}: {base}"
        for default in re.findall(r"^ARG\s+(?:\w*BASE|UV_IMAGE)=(\S+)", text, re.M):
            assert re.search(r":[\w.-]+$", default) and not default.endswith(":latest"), (
                f"{dockerfile}: {default}"
            )
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        expected = "postgres" if "postgres" in dockerfile.parts else "10001"
        assert users and all(u.split(":")[0] == expected for u in users), f"{dockerfile}: {users}"
        assert "HEALTHCHECK" in text
        assert "org.opencontainers.image.revision" in text, f"{dockerfile}: no OCI revision label"
    assert re.search(
        r"RUNTIME_BASE=nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+\n", (IMAGES / "Dockerfile").read_text()
    )


def test_versions_match_pyproject_and_makefile():
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH_VERSION := (\S+)", makefile, re.M).group(1)
    assert torch == pyproject_pin("torch")
    assert f"ARG TORCH_VERSION={torch}" in (IMAGES / "Dockerfile").read_text()
    assert f'variable "TORCH_VERSION" {{ default = "{torch}" }}' in (IMAGES / "docker-bake.hcl").read_text()
    mlflow = (IMAGES / "mlflow" / "Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={pyproject_pin('mlflow')}" in mlflow
    pyproject = (REPO / "pyproject.toml").read_text()
    for pkg in ("psycopg", "boto3"):
        version = re.search(rf"ARG {pkg.upper()}_VERSION=(\S+)", mlflow).group(1)
        assert f'"{pkg}' in pyproject and version in pyproject, (
            f"{pkg} {version} not pinned alike in pyproject"
        )


def test_bake_targets_cover_every_image_the_charts_use():
    bake = (IMAGES / "docker-bake.hcl").read_text()
    targets = set(re.findall(r'^target "([\w-]+)"', bake, re.M)) - {"_common"}
    assert targets == {
        "train",
        "train-cpu",
        "serve",
        "serve-cpu",
        "gateway",
        "chat-ui",
        "mlflow",
        "postgres",
        "s3",
    }
    charts_text = "".join(p.read_text() for p in (REPO / "charts").glob("*/values.yaml"))
    charts_text += "".join(p.read_text() for p in (REPO / "charts").glob("*/ci/*.yaml"))
    used = set(re.findall(r"ghcr\.io/tulpar-ai/tulpar-([\w-]+)", charts_text))
    assert used <= targets, used - targets
    assert 'MODULE = "services.gateway"' in bake and 'MODULE = "services.chat_ui"' in bake


def test_build_context_sends_code_not_state():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # deny by default
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "llm_core",
        "jobs",
        "pipelines",
        "services",
        "configs",
        "build/wheels",  # torch's CPU wheel for local builds: a find-links mount, not copied into an image
        "infra/compose/postgres/entrypoint.sh",
        "infra/compose/s3/server.js",
    }

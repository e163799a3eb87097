// `make images` = docker buildx bake -f infra/images/docker-bake.hcl [--push|--load] <targets>
// Build context: the repo root (filtered by /.dockerignore). Tags: ${REGISTRY}/tulpar-<target>:${IMAGE_TAG}.
// Local builds without a registry: `make images-local` (build_local.sh: the same Dockerfiles, a debootstrap base).
// Versions: pyproject.toml pins the Python dependencies; TORCH_VERSION must equal the Makefile's.

variable "REGISTRY" { default = "ghcr.io/tulpar-ai" }
variable "IMAGE_TAG" { default = "0.1.0" }
variable "TORCH_VERSION" { default = "2.13.0" }
variable "CUDA_RUNTIME" { default = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" }
variable "CPU_RUNTIME" { default = "debian:12.12-slim" }
variable "TORCH_CPU_INDEX" { default = "https://download.pytorch.org/whl/cpu" }
variable "GIT_COMMIT" { default = "unknown" }
// GPU images: CPython 3.11 from uv on Ubuntu (the CUDA bases have no python3.11); CPU images: Debian's python3.

group "default" {
  targets = ["train", "train-cpu", "serve", "serve-cpu", "gateway", "chat-ui", "mlflow"]
}

// The compose stack's stores (infra/compose), for registries that have no postgres/S3 image of their own.
group "compose" {
  targets = ["postgres", "s3"]
}

target "_common" {
  context    = "."
  dockerfile = "infra/images/Dockerfile"
  platforms  = ["linux/amd64"]
  // the Dockerfiles' LABELs carry the OCI labels from these two args
  args       = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT }
}

target "train" {
  inherits = ["_common"]
  target   = "ray"
  args     = { BUILDER_BASE = "ubuntu:24.04", PYTHON_SOURCE = "standalone", VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, RUNTIME_BASE = CUDA_RUNTIME, TORCH_VERSION = TORCH_VERSION, EXTRAS = "" }
  tags     = ["${REGISTRY}/tulpar-train:${IMAGE_TAG}"]
}

target "train-cpu" {
  inherits = ["_common"]
  target   = "ray"
  args     = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, BUILDER_BASE = CPU_RUNTIME, RUNTIME_BASE = CPU_RUNTIME, PYTHON_SOURCE = "system", TORCH_VERSION = TORCH_VERSION, TORCH_INDEX = TORCH_CPU_INDEX, EXTRAS = "" }
  tags     = ["${REGISTRY}/tulpar-train-cpu:${IMAGE_TAG}"]
}

target "serve" {
  inherits = ["_common"]
  target   = "ray"
  args     = { BUILDER_BASE = "ubuntu:24.04", PYTHON_SOURCE = "standalone", VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, RUNTIME_BASE = CUDA_RUNTIME, TORCH_VERSION = TORCH_VERSION, EXTRAS = "gpu" }
  tags     = ["${REGISTRY}/tulpar-serve:${IMAGE_TAG}"]
}

target "serve-cpu" {
  inherits = ["_common"]
  target   = "ray"
  args     = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, BUILDER_BASE = CPU_RUNTIME, RUNTIME_BASE = CPU_RUNTIME, PYTHON_SOURCE = "system", TORCH_VERSION = TORCH_VERSION, TORCH_INDEX = TORCH_CPU_INDEX, EXTRAS = "cpu" }
  tags     = ["${REGISTRY}/tulpar-serve-cpu:${IMAGE_TAG}"]
}

target "gateway" {
  inherits = ["_common"]
  target   = "web"
  args     = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, BUILDER_BASE = CPU_RUNTIME, RUNTIME_BASE = CPU_RUNTIME, PYTHON_SOURCE = "system", TORCH_VERSION = TORCH_VERSION, TORCH_INDEX = TORCH_CPU_INDEX, MODULE = "services.gateway", PORT = "8080" }
  tags     = ["${REGISTRY}/tulpar-gateway:${IMAGE_TAG}"]
}

target "chat-ui" {
  inherits = ["_common"]
  target   = "web"
  args     = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, BUILDER_BASE = CPU_RUNTIME, RUNTIME_BASE = CPU_RUNTIME, PYTHON_SOURCE = "system", TORCH_VERSION = TORCH_VERSION, TORCH_INDEX = TORCH_CPU_INDEX, EXTRAS = "ui", MODULE = "services.chat_ui", PORT = "8501", HEALTH_PATH = "/_stcore/health" }
  tags     = ["${REGISTRY}/tulpar-chat-ui:${IMAGE_TAG}"]
}

target "mlflow" {
  inherits   = ["_common"]
  dockerfile = "infra/images/mlflow/Dockerfile"
  args       = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, BASE = "python:3.11.14-slim-bookworm" }
  tags       = ["${REGISTRY}/tulpar-mlflow:${IMAGE_TAG}"]
}

target "postgres" {
  inherits   = ["_common"]
  dockerfile = "infra/compose/postgres/Dockerfile"
  args       = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, BASE = CPU_RUNTIME }
  tags       = ["${REGISTRY}/tulpar-postgres:${IMAGE_TAG}"]
}

target "s3" {
  inherits   = ["_common"]
  dockerfile = "infra/compose/s3/Dockerfile"
  args       = { VERSION = IMAGE_TAG, GIT_COMMIT = GIT_COMMIT, BASE = CPU_RUNTIME }
  tags       = ["${REGISTRY}/tulpar-s3:${IMAGE_TAG}"]
}

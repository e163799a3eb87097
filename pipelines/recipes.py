"""Recipes: one file per model (`configs/recipes/<model>.yaml`) naming each stage's config once, from our tokenizer
to a served model, plus what the recipe is written for (hardware) and how to rehearse it on this machine.

    make recipe RECIPE=kk-350m               # python -m pipelines.train_to_serve --recipe kk-350m
    make recipe RECIPE=kk-350m REHEARSAL=1   # every stage at the recipe's real shapes, a handful of steps, here
    make recipe-check                        # python -m pipelines.recipes --check: validate every recipe

A stage's inputs come from the previous stage's result (the pipeline passes them): the dataset records its
tokenizer, pretraining takes the tokenizer from the dataset, and the model's vocabulary comes from the tokenizer.
A recipe therefore never names a tokenizer path, a dataset path, a model URI or a vocabulary size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from jobs.platform.configfile import load_config
from jobs.platform.runtime import REPO_ROOT
from llm_core.config import ConfigError, StrictModel

RECIPE_DIR = REPO_ROOT / "configs" / "recipes"
STAGES = ("tokenizer", "preprocess", "pretrain", "extend", "sft", "dpo", "rl", "distill", "eval", "serve")
# A recipe stage run by another stage's job: `extend` (context extension) is jobs.pretrain again, with `init` = the
# model the pretrain stage registered; its configs are in configs/pretrain/.
STAGE_JOBS = {"extend": "pretrain"}


def stage_job(stage: str) -> str:
    """The job (jobs.<job>) that runs a recipe stage, and so the configs/<job>/ directory of its configs."""
    return STAGE_JOBS.get(stage, stage)


class StageSpec(StrictModel):
    """One stage of a recipe: its config (configs/<stage>/<config>.yaml, or a path) and dotted overrides."""

    config: str = Field(description="configs/<stage>/<config>.yaml, or a path to a YAML file")
    overrides: list[str] = Field(default_factory=list, description="dotted key=value overrides")
    enabled: bool = True


class ServeSpec(StrictModel):
    """The serving stage and its smoke test."""

    config: str = Field("tiny", description="configs/serve/<config>.yaml")
    overrides: list[str] = Field(default_factory=list)
    alias: str = Field("champion", description="serve models:/<name>@<alias>: the version the gate promoted")
    prompts: dict[str, str] = Field(
        default_factory=lambda: {
            "kk": "Сәлем! Қалың қалай?",
            "ru": "Привет! Как дела?",
            "en": "Hello! How are you?",
        }
    )
    max_tokens: int = Field(32, gt=0)
    startup_timeout_s: float = Field(900, gt=0)
    enabled: bool = True


class Hardware(StrictModel):
    """What the recipe is written for; `make recipe-check` checks the shapes against it."""

    accelerator: Literal["cpu", "gpu"] = Field(description="where pretraining is meant to run")
    gpu_type: str | None = Field(None, description="e.g. H100-80GB, A100-40GB, L4-24GB (accelerator gpu)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU (accelerator gpu)")
    tokens_per_step: int | None = Field(
        None, gt=0, description="the stated global batch in tokens; must equal batch x seq x accum x workers"
    )


class Rehearsal(StrictModel):
    """Overrides per stage for `REHEARSAL=1`: same shapes (vocabulary, dims, layers, seq_len), a handful of
    steps, one CPU worker, so the whole chain runs on a laptop before GPUs are rented."""

    tokenizer: list[str] = Field(default_factory=list)
    preprocess: list[str] = Field(default_factory=list)
    pretrain: list[str] = Field(default_factory=list)
    extend: list[str] = Field(default_factory=list)
    sft: list[str] = Field(default_factory=list)
    dpo: list[str] = Field(default_factory=list)
    rl: list[str] = Field(default_factory=list)
    distill: list[str] = Field(default_factory=list)
    eval: list[str] = Field(default_factory=list)
    serve: list[str] = Field(default_factory=list)


class RecipeConfig(StrictModel):
    """A whole chain for one model: tokenizer -> preprocess -> pretrain -> (extend) -> sft -> dpo -> (rl) ->
    (distill) -> eval -> serve."""

    name: str = Field(description="the recipe's name (pipeline state, logs and the MLflow parent run)")
    model_name: str = Field(description="registered model name the training stages produce")
    description: str = ""
    target: str = Field("local", description="local | http(s)://<ray dashboard>:8265 | ray://... | k8s")
    hardware: Hardware
    tokenizer: StageSpec
    preprocess: StageSpec
    pretrain: StageSpec
    extend: StageSpec | None = Field(
        None,
        description="context extension after pretraining: jobs.pretrain with a configs/pretrain/ config that "
        "continues from the pretrain stage's model (the pipeline passes it as `init`) at a longer context",
    )
    sft: StageSpec | None = None
    dpo: StageSpec | None = None
    rl: StageSpec | None = Field(None, description="RL fine-tuning (jobs.rl) after SFT/DPO")
    distill: StageSpec | None = None
    eval: StageSpec | None = None
    serve: ServeSpec = Field(default_factory=ServeSpec)
    rehearsal: Rehearsal = Field(default_factory=Rehearsal)


def recipe_path(name: str) -> Path:
    """configs/recipes/<name>.yaml, or `name` itself when it is a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    return RECIPE_DIR / f"{name}.yaml"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name: str, overrides: list[str] | None = None) -> RecipeConfig:
    """A recipe by name (configs/recipes/<name>.yaml) or path, with dotted overrides; ConfigError naming the bad
    key."""
    path = recipe_path(name)
    if not path.is_file():
        known = ", ".join(list_recipes()) or "none"
        raise ConfigError(f"unknown recipe {name!r}: choose one of {known} (files in {RECIPE_DIR})")
    return load_config(RecipeConfig, path, overrides)


def stage_config_path(stage: str, config: str, base: Path | None = None) -> Path:
    """configs/<stage>/<config>.yaml, or `config` itself when it names a YAML file (relative to the recipe's
    directory first, then the working directory)."""
    p = Path(config)
    if p.suffix in (".yaml", ".yml"):
        for candidate in ([base / p] if base is not None and not p.is_absolute() else []) + [p]:
            if candidate.is_file():
                return candidate
        return p
    return REPO_ROOT / "configs" / stage_job(stage) / f"{config}.yaml"


SERVE_SPEC_KEYS = frozenset(ServeSpec.model_fields) - {"config", "overrides"}


def split_serve_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Rehearsal `serve:` overrides: keys of the smoke test (ServeSpec: alias, max_tokens, prompts, ...) apply to
    the recipe's serve spec, every other key to the serve config (configs/serve/<config>.yaml)."""
    spec, config = [], []
    for item in items:
        (spec if item.split("=", 1)[0].split(".", 1)[0] in SERVE_SPEC_KEYS else config).append(item)
    return spec, config


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.recipes --check [NAME ...]`: exit 0 when every named recipe (default: all) passes,
    2 with every failure listed (recipe, stage, key, fix) when one does not."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipelines.recipes", description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="validate recipes without training")
    parser.add_argument(
        "names", nargs="*", help=f"recipes to check (default all: {', '.join(list_recipes())})"
    )
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_usage(sys.stderr)
        print(
            "nothing to do: pass --check (to run a recipe: python -m pipelines.train_to_serve --recipe NAME)",
            file=sys.stderr,
        )
        return 2
    from pipelines.recipe_check import run_check

    try:
        run_check(args.names or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

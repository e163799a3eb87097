"""What stages hand each other: one pydantic model per stage's `outputs`, inside one typed result envelope.

Every job ends by printing `StageResult.model_dump_json()` as the last line of stdout and writing it as
`result.json` (platform.md). The pipeline and the next stage read it back with `read_result`, which validates the
envelope and the stage's outputs: a missing or misspelt field is an error there, not a `KeyError` three stages
later. No stage reads another stage's result through dictionary keys or `key=value` strings.

| stage | outputs model | what the next stage takes from it |
|---|---|---|
| tokenizer | `TokenizerOutputs` | `tokenizer_dir` -> preprocess |
| preprocess | `DatasetOutputs` | `dataset_dir` (its manifest records the tokenizer and vocabulary) -> pretrain |
| pretrain, sft, dpo, distill, rl | `ModelVersionOutputs` | `model_uri` (`models:/<name>/<version>`) -> the next training stage, eval |
| reward_model | `RewardModelOutputs` | `model_uri` of the reward model -> the RL stage's reward |
| eval | `EvalOutputs` | `gate` (passed, promoted) -> what the pipeline serves |
| serve | `EndpointOutputs` | `url`, `models` -> the smoke test |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Outputs(BaseModel):
    """Base of every stage's outputs: unknown fields are errors, so producer and consumer cannot drift apart."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TokenizerOutputs(Outputs):
    tokenizer_dir: str = Field(description="tokenizer.json + tokenizer_config.json (chat template) + report/")
    tokenizer_json: str
    tokenizer_sha256: str
    vocab_size: int = Field(description="tokens including the special tokens")
    report_md: str
    report_csv: str
    plots: list[str] = Field(default_factory=list)
    baseline_tokenizer_json: str | None = None
    sweep_files: dict[str, str] = Field(default_factory=dict, description="vocabulary sweep report files")


class DatasetOutputs(Outputs):
    dataset_dir: str = Field(description="a path or URI holding manifest.json, shards/, report.{md,json}")
    manifest: str
    manifest_sha256: str
    report: str
    tokenizer_dir: str = Field(
        description="the tokenizer the shards were written with (recorded in the manifest)"
    )
    tokenizer_sha256: str
    vocab_size: int = Field(
        description="the tokenizer's vocabulary: the model's vocabulary is derived from it"
    )


class ModelVersionOutputs(Outputs):
    model_uri: str | None = Field(
        description="models:/<name>/<version>; None when registration was turned off"
    )
    hf_dir: str = Field(description="the HF-format export of the version")
    checkpoint_dir: str
    best_checkpoint: str
    last_checkpoint: str | None = None
    parent_model_uri: str | None = Field(None, description="the model this one started from")
    dataset: str | None = None
    tokenizer_sha256: str | None = None
    adapter_dir: str | None = None
    loss_curve: str | None = None
    samples: dict[str, str] = Field(default_factory=dict)
    data: dict[str, Any] | None = None


class RewardModelOutputs(Outputs):
    """A registered reward model (jobs.reward_model): an HF sequence-classification export, not a language model,
    so no training stage takes it as `init` (a sibling of ModelVersionOutputs, not a subclass)."""

    model_uri: str | None = Field(
        description="models:/<name>/<version>; None when registration was turned off"
    )
    hf_dir: str = Field(description="the HF LlamaForSequenceClassification export (num_labels 1) + tokenizer")
    checkpoint_dir: str
    best_checkpoint: str
    last_checkpoint: str | None = None
    parent_model_uri: str = Field(description="the model whose trunk the reward model started from")
    tokenizer_sha256: str
    loss_curve: str | None = None
    heldout_accuracy: float = Field(
        description="pairwise accuracy on the held-out pairs (chosen scored higher)"
    )
    heldout_accuracy_ci95: tuple[float, float] = Field(description="its Wilson 95% interval")
    heldout_margin: float = Field(description="mean score(chosen) - score(rejected) on the held-out pairs")
    heldout_pairs: int
    data: dict[str, Any] | None = None


class GateCheck(Outputs):
    metric: str
    value: float | None
    baseline: float | None
    passed: bool
    reason: str


class GateOutcome(Outputs):
    alias: str
    passed: bool
    baseline_uri: str | None
    checks: list[GateCheck] = Field(default_factory=list)
    promoted: bool = False
    note: str = ""
    baseline_error: str | None = Field(
        None, description="why the baseline could not be read (the gate refused)"
    )
    reasons: str = ""


class EvalOutputs(Outputs):
    model_uri: str
    output_dir: str
    report: str
    results: str
    comparison_md: str | None = None
    comparison_png: str | None = None
    gate: GateOutcome | None = None
    lm_eval_command: str | None = None


class EndpointOutputs(Outputs):
    url: str | None = Field(None, description="the OpenAI-compatible base URL (…/v1); None for a --check run")
    models: dict[str, str] = Field(
        default_factory=dict, description="served model name -> the version it serves"
    )


OUTPUTS_BY_STAGE: dict[str, type[Outputs]] = {
    "tokenizer": TokenizerOutputs,
    "preprocess": DatasetOutputs,
    "pretrain": ModelVersionOutputs,
    "sft": ModelVersionOutputs,
    "dpo": ModelVersionOutputs,
    "rl": ModelVersionOutputs,
    "distill": ModelVersionOutputs,
    "reward_model": RewardModelOutputs,
    "eval": EvalOutputs,
    "serve": EndpointOutputs,
}

OutputsT = TypeVar("OutputsT", bound=Outputs)


class StageResult(BaseModel, Generic[OutputsT]):
    """The JSON result line of a job. `reused` says the job found its output current (same resolved config, same
    input hashes, same code) and returned it without redoing the work; `cache_key` is that identity."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    stage: str
    status: Literal["ok"] = "ok"
    outputs: OutputsT
    metrics: dict[str, float] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    cache_key: str | None = None
    reused: bool = False


class ResultError(RuntimeError):
    """A job's result line is missing or does not match its stage's contract (an internal failure)."""


def parse_result(stage: str, data: dict[str, Any]) -> StageResult:
    """A typed result from a parsed result dict; ResultError naming the stage and the bad fields."""
    cls = OUTPUTS_BY_STAGE.get(stage)
    if cls is None:
        raise ResultError(f"no result contract for stage {stage!r}: known {sorted(OUTPUTS_BY_STAGE)}")
    if data.get("stage") != stage:
        raise ResultError(f"expected the result of stage {stage!r}, got {data.get('stage')!r}")
    try:
        return StageResult[cls].model_validate(data)  # type: ignore[valid-type]
    except ValidationError as exc:
        raise ResultError(f"the {stage} result does not match its contract: {exc}") from None


def take_inputs(
    stage: str, inputs: dict[str, StageResult], roles: dict[str, tuple[type[Outputs], ...]]
) -> dict[str, Any]:
    """Check the `--input` roles a stage got against the ones it takes; returns role -> typed outputs."""
    unknown = sorted(set(inputs) - set(roles))
    if unknown:
        raise ValueError(f"jobs.{stage} takes inputs {sorted(roles)}, not {unknown}: drop or rename them")
    out: dict[str, Any] = {}
    for role, result in inputs.items():
        if not isinstance(result.outputs, roles[role]):
            want = " or ".join(c.__name__ for c in roles[role])
            raise ValueError(
                f"jobs.{stage} --input {role}= needs a result with {want}, got the {result.stage} stage's"
            )
        out[role] = result.outputs
    return out


def model_reference(outputs: ModelVersionOutputs, role: str) -> str:
    """The registered version a training result produced, for the next stage's `role`."""
    if outputs.model_uri is None:
        raise ValueError(
            f"--input {role}=: that training run registered no model version (register_model: false); "
            "re-run it with registration on, or pass the HF directory in the config instead"
        )
    return outputs.model_uri


def read_result(stage: str, source: str | Path) -> StageResult:
    """Read a stage's typed result from its `result.json` (a path) or from a job's output text (its last result
    line, as `run_job` prints it)."""
    if isinstance(source, Path):
        data = json.loads(source.read_text(encoding="utf-8"))
    else:
        from jobs.platform.runtime import result_from_output

        parsed = result_from_output(source)
        if parsed is None:
            raise ResultError(f"the {stage} job printed no result line")
        data = parsed
    if data.get("status") != "ok":
        raise ResultError(f"the {stage} job did not succeed: {data.get('error') or data.get('status')}")
    return parse_result(stage, data)

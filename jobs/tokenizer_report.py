"""Tokenizer comparison: `python -m jobs.tokenizer_report --config configs/tokenizer_report/<name>.yaml`.

Measures any number of tokenizers (a tokenizer.json, a Hugging Face model directory, or a hub id when online)
on parallel eval text per language (FLORES-200 devtest and NTREX-128 in TULPAR_DATA/eval/parallel), and writes
report.md, metrics.csv, report.json and one PNG bar chart per eval set (total tokens and parity per language
per tokenizer) to `$TULPAR_HOME/reports/tokenizers/<name>/`, all logged to MLflow (experiment tulpar-tokenizer).
The metrics are defined in `llm_core.tokenizer_eval`; the comparison itself is `jobs.reporting.tokenizers`, which
`jobs.tokenizer` also uses for the report/ it writes next to a trained tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from jobs.platform import tracking
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.reporting.tokenizers import (
    EvalSetSpec,
    TokenizerRef,
    build_report,
    check_target_keys,
    flat_metrics,
    log_report_to_mlflow,
    print_summary,
    target_metrics,
)
from llm_core.config import StrictModel

log = logging.getLogger("tulpar.tokenizer_report")


class ReportConfig(StrictModel):
    name: str = Field(description="report name: output dir $TULPAR_HOME/reports/tokenizers/<name>/")
    tokenizers: list[TokenizerRef] = Field(min_length=1)
    eval_sets: list[EvalSetSpec] = Field(
        default_factory=lambda: [EvalSetSpec.model_validate(n) for n in ("flores200_devtest", "ntrex128")]
    )
    languages: list[str] = Field(default_factory=lambda: ["kk", "ru", "en"], min_length=1)
    pivot: str = Field("en", description="parity = tokens(language) / tokens(pivot) on the same lines")
    targets: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="eval set -> language -> most tokens allowed (checked for `subject`)",
    )
    subject: str | None = Field(None, description="the tokenizer the targets and the summary focus on")
    output_dir: str | None = Field(None, description="default $TULPAR_HOME/reports/tokenizers/<name>")
    show_progress: bool = True

    @field_validator("tokenizers")
    @classmethod
    def _unique(cls, v: list[TokenizerRef]) -> list[TokenizerRef]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tokenizer names must be unique, repeated: {dup}: give each a distinct name")
        return v

    @model_validator(mode="after")
    def _check(self) -> ReportConfig:
        if self.subject is not None and self.subject not in [t.name for t in self.tokenizers]:
            raise ValueError(f"subject {self.subject!r} is not one of the tokenizers' names")
        if self.targets and self.subject is None:
            raise ValueError("targets need subject: the name of the tokenizer they are checked for")
        check_target_keys(self.targets, self.eval_sets, self.languages)
        return self


def main(cfg: ReportConfig, settings: Settings) -> JobResult:
    if cfg.pivot not in cfg.languages:
        log.info("pivot %r is not among the languages: no parity", cfg.pivot)
    texts = [spec.load(settings, cfg.languages) for spec in cfg.eval_sets]
    tokenizers = [
        ref.load(settings)
        for ref in tqdm(cfg.tokenizers, desc="loading tokenizers", leave=False, disable=not cfg.show_progress)
    ]
    out_dir = Path(cfg.output_dir) if cfg.output_dir else settings.path("reports", "tokenizers", cfg.name)
    with tracking.start_run(settings, "tokenizer_report", cfg, run_name=cfg.name) as run:
        report = build_report(
            tokenizers,
            texts,
            out_dir,
            languages=cfg.languages,
            pivot=cfg.pivot,
            targets=cfg.targets,
            subject=cfg.subject,
            title=f"Tokenizer comparison: {cfg.name}",
            show_progress=cfg.show_progress,
        )
        log_report_to_mlflow(report)
    print_summary(report, texts, cfg.languages)
    metrics = {**flat_metrics(report["rows"], ("tokens",)), **target_metrics(report)}
    outputs = {"report_dir": str(out_dir), **report["files"]}
    return JobResult(
        "tokenizer_report",
        outputs=outputs,
        metrics=metrics,
        mlflow_run_id=run.info.run_id,
        output_dir=out_dir,
    )


if __name__ == "__main__":
    main_entry("tokenizer_report", ReportConfig, main)

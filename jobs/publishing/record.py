"""What the registry, MLflow and the report files hold about a model: the facts a model card may state.

    lineage        the version, then its parents through `tulpar.parent_model_uri` (each with its MLflow run id,
                   stage and the run's plots/loss_curve.png), ending at the pretraining run or at a directory
    eval results   the version's `tulpar.eval.<suite>.*` tags, written by `jobs.eval` with the run id
    training data  the pretraining run's dataset (param `data.dataset`): its report.json, only when its
                   manifest.json still has the sha256 the run recorded (tag `tulpar.dataset_manifest_sha256`)
    tokenizer      a tokenizer report (report.json of `jobs.tokenizer` / `jobs.tokenizer_report`) that measured
                   this model's tokenizer (same sha256), preferring the one with the most reference tokenizers

Anything not found is None with a note saying why; nothing is estimated. A tracking server that cannot answer is
a ValueError (the card would otherwise silently omit facts).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.evaluation.report import TAG as EVAL_TAG
from jobs.evaluation.report import metrics_from_tags
from jobs.platform import registry
from jobs.platform.runtime import Settings
from llm_core.config import ModelConfig

PARENT_TAG = "tulpar.parent_model_uri"
HUB_REPO_TAG = "tulpar.hub.repo_id"
HUB_COMMIT_TAG = "tulpar.hub.commit"
REFERENCE_TOKENIZERS = {"qwen3": "Qwen3", "llama3": "Llama 3", "gemma3": "Gemma 3"}
MAX_LINEAGE = 50


@dataclass
class VersionRecord:
    uri: str  # models:/name/version
    stage: str | None
    run_id: str | None
    run_name: str | None
    parent_uri: str | None
    best_val_loss: str | None
    hub_repo_id: str | None
    loss_curve: Path | None = None  # downloaded plots/loss_curve.png of the version's run


@dataclass
class EvalRecord:
    suite: str
    run_id: str | None
    metrics: dict[str, float]


@dataclass
class DatasetRecord:
    path: str
    manifest_sha256: str
    report: dict[str, Any]


@dataclass
class TokenizerRecord:
    report_path: str
    subject: str  # our tokenizer's name in the report
    references: list[str]  # reference tokenizer names present (qwen3, llama3, gemma3)
    metrics: list[dict[str, Any]]  # the report's rows
    eval_sets: list[str]


@dataclass
class ModelRecord:
    reference: str
    uri: str
    kind: str  # registered | hf
    hf_dir: Path
    config: ModelConfig
    tokenizer_sha256: str | None
    versions: list[VersionRecord] = field(default_factory=list)
    root_parent: str | None = None  # where the oldest version started, when not a registered version
    evals: list[EvalRecord] = field(default_factory=list)
    dataset: DatasetRecord | None = None
    dataset_note: str = "not recorded"
    tokenizer: TokenizerRecord | None = None
    tokenizer_note: str = "not measured"

    @property
    def name(self) -> str | None:
        return self.uri.split("/")[1] if self.uri.startswith("models:/") else None

    @property
    def version(self) -> str | None:
        return self.uri.split("/")[2] if self.uri.startswith("models:/") else None


class TrackingUnreadable(ValueError):
    """The tracking server could not answer a question the card needs."""


def _ask(settings: Settings, what: str, fn, *args, **kwargs):
    """fn(...) with tracking-server failures as TrackingUnreadable (fail closed: no card with facts left out)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except (MlflowException, OSError) as exc:
        raise TrackingUnreadable(
            f"cannot read {what} from the tracking server {registry._redact(settings.mlflow_tracking_uri)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}): start the server or fix "
            "MLFLOW_TRACKING_URI, then re-run"
        ) from None


# ------------------------------------------------------------------------------------------- the model itself


def model_config(hf_dir: Path) -> ModelConfig:
    """The exact llm_core config (tulpar_config.json), else the one equivalent to config.json."""
    tulpar = hf_dir / "tulpar_config.json"
    if tulpar.is_file():
        return ModelConfig.model_validate_json(tulpar.read_text(encoding="utf-8"))
    from llm_core.export_hf import model_config_from_hf

    return model_config_from_hf(json.loads((hf_dir / "config.json").read_text(encoding="utf-8")), hf_dir.name)


def tokenizer_sha256(hf_dir: Path) -> str | None:
    from llm_core.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(hf_dir).sha256
    except (
        Exception
    ) as exc:  # fail closed: a missing, corrupt or foreign tokenizer.json stops the publish (exit 2)
        raise ValueError(
            f"the tokenizer in {hf_dir} cannot be loaded ({type(exc).__name__}: {exc}): export the model with its "
            "tokenizer (llm_core.export_hf(..., tokenizer=...))"
        ) from None


# ------------------------------------------------------------------------------------------- lineage


def _loss_curve(settings: Settings, client, run_id: str, dst: Path) -> Path | None:
    import mlflow

    listed = _ask(settings, f"the artifacts of run {run_id}", client.list_artifacts, run_id, "plots")
    if not any(a.path == "plots/loss_curve.png" for a in listed):
        return None
    local = _ask(
        settings,
        f"plots/loss_curve.png of run {run_id}",
        mlflow.artifacts.download_artifacts,
        run_id=run_id,
        artifact_path="plots/loss_curve.png",
        dst_path=str(dst),
        tracking_uri=settings.mlflow_tracking_uri,
    )
    return Path(local)


def lineage(settings: Settings, uri: str, workdir: Path) -> tuple[list[VersionRecord], str | None, Any]:
    """The version and its registered parents, newest first; where the oldest started when that is not a
    registered version; and the oldest version's MLflow run (None when it has none)."""
    reg = registry.registry_for(settings)
    client = reg.client
    versions: list[VersionRecord] = []
    seen: set[str] = set()
    current: str | None = uri
    root_parent = None
    oldest_run = None
    while current is not None:
        if current in seen or len(seen) >= MAX_LINEAGE:
            raise ValueError(
                f"the lineage of {uri} loops or is longer than {MAX_LINEAGE} versions at {current}: fix the "
                f"{PARENT_TAG} tags of these versions"
            )
        seen.add(current)
        resolved = reg.resolve(current)  # typed registry errors naming the fix
        mv = _ask(
            settings,
            f"model version {resolved.uri}",
            client.get_model_version,
            resolved.name,
            resolved.version,
        )
        run = _ask(settings, f"run {mv.run_id}", client.get_run, mv.run_id) if mv.run_id else None
        tags = dict(mv.tags or {})
        parent = tags.get(PARENT_TAG) or (run.data.tags.get(PARENT_TAG) if run else None)
        record = VersionRecord(
            uri=resolved.uri,
            stage=tags.get("tulpar.stage"),
            run_id=mv.run_id,
            run_name=run.info.run_name if run else None,
            parent_uri=parent,
            best_val_loss=tags.get("tulpar.best_val_loss"),
            hub_repo_id=tags.get(HUB_REPO_TAG),
        )
        if mv.run_id:
            dst = workdir / f"v{resolved.version}"
            dst.mkdir(parents=True, exist_ok=True)
            record.loss_curve = _loss_curve(settings, client, mv.run_id, dst)
        versions.append(record)
        oldest_run = run
        if parent and registry.is_registered(parent):
            current = parent
        else:
            root_parent, current = parent, None
    return versions, root_parent, oldest_run


# ------------------------------------------------------------------------------------------- eval results


def eval_records(tags: dict[str, str]) -> list[EvalRecord]:
    """Every suite `jobs.eval` recorded on the version, with its run id and metrics."""
    prefix, suffix = f"{EVAL_TAG}.", ".suite_sha256"
    suites = sorted(
        k[len(prefix) : -len(suffix)] for k in tags if k.startswith(prefix) and k.endswith(suffix)
    )
    out = []
    for suite in suites:
        metrics = metrics_from_tags(tags, suite) or {}
        # a suite whose name extends another's ("tiny" and "tiny.long") must not lend it its metrics
        longer = [s for s in suites if s != suite and s.startswith(suite + ".")]
        metrics = {
            k: v for k, v in metrics.items() if not any(f"{suite}.{k}".startswith(s + ".") for s in longer)
        }
        out.append(EvalRecord(suite, tags.get(f"{prefix}{suite}.run_id"), metrics))
    return out


# ------------------------------------------------------------------------------------------- training data


def dataset_record(settings: Settings, run) -> tuple[DatasetRecord | None, str]:
    """The pretraining run's dataset report, only when its manifest is the one the run trained on."""
    if run is None:
        return None, "not recorded: the oldest version in the lineage has no MLflow run"
    spec = run.data.params.get("data.dataset")
    recorded_sha = run.data.tags.get("tulpar.dataset_manifest_sha256")
    if not spec or not recorded_sha:
        return None, f"not recorded: run {run.info.run_id} names no dataset (it is not a pretraining run)"
    from jobs.pretrain import resolve_dataset
    from llm_core.shards import file_sha256

    try:
        path = Path(resolve_dataset(spec, settings))
    except ValueError:
        return (
            None,
            f"not available: the dataset {spec!r} of run {run.info.run_id} is no longer on this machine",
        )
    sha = file_sha256(path / "manifest.json")
    if sha != recorded_sha:
        return None, (
            f"not available: the dataset at {path} has changed since run {run.info.run_id} trained on it "
            f"(manifest sha256 {sha[:12]}, recorded {recorded_sha[:12]})"
        )
    report = path / "report.json"
    if not report.is_file():
        return None, f"not available: the dataset at {path} has no report.json"
    return DatasetRecord(str(path), sha, json.loads(report.read_text(encoding="utf-8"))), ""


# ------------------------------------------------------------------------------------------- tokenizer


def _file_tokenizer_sha(path: str) -> str | None:
    import hashlib

    from tokenizers import Tokenizer as HFTokenizer

    try:
        return hashlib.sha256(HFTokenizer.from_file(path).to_str().encode("utf-8")).hexdigest()
    except Exception:  # a report whose tokenizer file is gone or foreign cannot vouch for ours
        return None


def report_candidates(settings: Settings, dataset: DatasetRecord | None) -> list[Path]:
    found: list[Path] = []
    if dataset is not None:
        manifest = json.loads((Path(dataset.path) / "manifest.json").read_text(encoding="utf-8"))
        tok_dir = (manifest.get("tokenizer") or {}).get("path")
        if tok_dir:
            found.append(Path(tok_dir) / "report" / "report.json")
    found += sorted(settings.home.glob("tokenizers/*/report/report.json"))
    found += sorted(settings.home.glob("reports/tokenizers/*/report.json"))
    return list(dict.fromkeys(p for p in found if p.is_file()))


def tokenizer_record(
    settings: Settings, sha: str | None, dataset: DatasetRecord | None
) -> tuple[TokenizerRecord | None, str]:
    if sha is None:
        return None, "not measured: the model has no tokenizer"
    best: TokenizerRecord | None = None
    for path in report_candidates(settings, dataset):
        report = json.loads(path.read_text(encoding="utf-8"))
        names = [t["name"] for t in report.get("tokenizers", [])]
        subject = next(
            (
                t["name"]
                for t in report.get("tokenizers", [])
                if t["name"] not in REFERENCE_TOKENIZERS and _file_tokenizer_sha(t.get("source", "")) == sha
            ),
            None,
        )
        if subject is None:
            continue
        shown = (
            f"$TULPAR_HOME/{path.relative_to(settings.home)}"
            if path.is_relative_to(settings.home)
            else str(path)
        )
        record = TokenizerRecord(
            report_path=shown,
            subject=subject,
            references=[n for n in REFERENCE_TOKENIZERS if n in names],
            metrics=report.get("metrics", []),
            eval_sets=[e["name"] for e in report.get("eval_sets", []) if e.get("parallel")],
        )
        if best is None or len(record.references) > len(best.references):
            best = record
    if best is None:
        return None, "not measured: no tokenizer report on this machine measured this model's tokenizer"
    return best, ""


# ------------------------------------------------------------------------------------------- all of it


def read_record(
    settings: Settings, resolved: registry.ResolvedModel, hf_dir: Path, workdir: Path | None = None
) -> ModelRecord:
    """Everything the card states about `resolved` (a registered version or an HF directory)."""
    cfg = model_config(hf_dir)
    sha = tokenizer_sha256(hf_dir)
    record = ModelRecord(resolved.reference, resolved.uri, resolved.kind, hf_dir, cfg, sha)
    oldest_run = None
    if resolved.kind == "registered":
        workdir = workdir or Path(tempfile.mkdtemp(prefix="tulpar-publish-"))
        record.versions, record.root_parent, oldest_run = lineage(settings, resolved.uri, workdir)
        record.evals = eval_records(dict(resolved.tags))
        record.dataset, record.dataset_note = dataset_record(settings, oldest_run)
    else:
        record.dataset_note = "not recorded: the model is a directory, not a registered version"
    record.tokenizer, record.tokenizer_note = tokenizer_record(settings, sha, record.dataset)
    return record

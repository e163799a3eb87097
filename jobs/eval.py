"""Evaluation and the promotion gate:

    python -m jobs.eval --model <models:/name/version | models:/name@alias | HF dir | checkpoint dir> \\
        --config configs/eval/<suite>.yaml [--promote] [key=value ...]

Scores the model on the suite (bits-per-byte and perplexity per language on held-out text, multiple-choice suites
by log-likelihood, generation checks, long-context checks: passkey retrieval and bits-per-byte by position,
optionally lm-evaluation-harness), logs a run to MLflow (experiment
tulpar-eval) with params, metrics and artifacts (report.md, results.json, predictions, the comparison table and
chart), tags the model version with the results (tulpar.eval.<suite>.<metric>), checks the gate against the current
@champion (tags tulpar.gate.<alias> = pass|fail with the reasons, either way) and, with --promote, moves the alias
only when every rule holds. `--model`/`--promote` are shorthand for the overrides model.source=... / promote=true.
Metric definitions: jobs/evaluation/*.py and docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jobs.evaluation.config import EvalConfig
from jobs.evaluation.gate import GateDecision, decide
from jobs.evaluation.generation import generation_metrics, run_generation, use_chat
from jobs.evaluation.harness import (
    flat_results,
    lm_eval_command,
    run_lm_eval,
    task_name,
    write_mc_task,
    write_text_task,
)
from jobs.evaluation.lm import LMEvaluator
from jobs.evaluation.long_context import (
    evaluate_bpb_by_position,
    evaluate_passkey,
    long_context_markdown,
    passkey_heatmap,
    position_length,
    position_metrics,
    position_plot,
)
from jobs.evaluation.models import LoadedModel, load_model
from jobs.evaluation.multiple_choice import (
    MCResult,
    UnavailableError,
    build_prompt,
    evaluate_suite,
    load_suite,
    mc_metrics,
)
from jobs.evaluation.report import (
    comparison_markdown,
    comparison_png,
    default_columns,
    eval_tags,
    metrics_from_tags,
    model_report,
    set_version_tags,
    version_rows,
)
from jobs.evaluation.text import TextResult, evaluate_text_set, read_documents, resolve_path, text_metrics
from jobs.platform import registry, tracking
from jobs.platform.cache import StageCache, stat_fingerprint
from jobs.platform.runtime import JobResult, Settings, run_job
from llm_core.config import config_to_dict
from llm_core.io import atomic_write_json, atomic_write_text

log = logging.getLogger("tulpar.eval")
STAGE = "eval"
HF_EXPORT = "hf_export"  # where a checkpoint is exported for lm_eval (not logged to MLflow)


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    text: list[TextResult] = field(default_factory=list)
    mc: list[MCResult] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)
    gen_metrics: dict[str, float] = field(default_factory=dict)
    lm_eval: dict[str, float] = field(default_factory=dict)
    lm_eval_cmd: list[str] | None = None
    scoring: dict = field(default_factory=dict)
    long_context: dict = field(default_factory=dict)  # passkey grid, bpb by position, notes
    long_context_md: str = ""


# ---------------------------------------------------------------------------------------- CLI


def preparse(argv: list[str]) -> list[str]:
    """Turn `--model X` / `--model=X` and `--promote` into the overrides model.source=X / promote=true."""
    out: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--model":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                print(
                    "error: --model needs a value (models:/<name>/<version>, models:/<name>@<alias> or a directory)",
                    file=sys.stderr,
                )
                raise SystemExit(2)
            extra.append(f"model.source={json.dumps(argv[i + 1], ensure_ascii=False)}")
            i += 2
            continue
        if arg.startswith("--model="):
            extra.append(f"model.source={json.dumps(arg.split('=', 1)[1], ensure_ascii=False)}")
        elif arg == "--promote":
            extra.append("promote=true")
        else:
            out.append(arg)
        i += 1
    return out + extra


# ---------------------------------------------------------------------------------------- evaluation


def evaluate(loaded: LoadedModel, cfg: EvalConfig, settings: Settings, out_dir: Path) -> EvalOutput:
    """Every part of the suite on one model; writes results.json, predictions and generations into out_dir."""
    ev = LMEvaluator(loaded.model, loaded.tokenizer, cfg.scoring)
    out = EvalOutput(metrics={}, scoring={"window": ev.window, "stride": ev.stride})
    t0 = time.perf_counter()
    for spec in cfg.text:
        for r in evaluate_text_set(spec, ev, settings):
            out.text.append(r)
            print(
                f"[{loaded.label}] bpb {r.set}/{r.language}: {r.bpb:.4f} (ppl {r.ppl:.2f}, {r.docs} docs, {r.bytes:,} bytes)",
                flush=True,
            )
    out.metrics.update(text_metrics(out.text))
    for spec in cfg.multiple_choice:
        res = evaluate_suite(spec, ev, settings)
        if res is not None:
            out.mc.append(res)
            print(
                f"[{loaded.label}] mc {res.suite}: acc {res.acc:.3f} acc_norm {res.acc_norm:.3f} (random {res.random:.3f}, n={res.n})",
                flush=True,
            )
    out.metrics.update(mc_metrics(out.mc))
    if cfg.generation.enabled:
        chat = use_chat(cfg.generation, loaded.stage)
        out.generations = run_generation(loaded.model, loaded.tokenizer, cfg.generation, chat=chat)
        out.gen_metrics = generation_metrics(out.generations)
        out.metrics.update(out.gen_metrics)
        print(
            f"[{loaded.label}] generation ({'chat' if chat else 'plain'}): consistency {out.gen_metrics.get('gen/all/lang_consistency', 0):.2f}, refusal {out.gen_metrics.get('gen/all/refusal_rate', 0):.2f}",
            flush=True,
        )
    if cfg.long_context.enabled:
        run_long_context(loaded, cfg, settings, out_dir, out)
    if cfg.lm_eval.enabled:
        out.lm_eval, out.lm_eval_cmd = run_harness(loaded, cfg, settings, out_dir, ev)
        out.metrics.update(out.lm_eval)
    log.info("evaluated %s in %.1fs", loaded.label, time.perf_counter() - t0)
    atomic_write_json(
        out_dir / "results.json",
        {
            "model": loaded.uri,
            "suite": cfg.name,
            "suite_sha256": cfg.suite_sha256(),
            "scoring": out.scoring,
            "metrics": out.metrics,
            "text": [r.to_dict() for r in out.text],
            "multiple_choice": [r.summary() for r in out.mc],
            **({"long_context": out.long_context} if out.long_context else {}),
        },
    )
    if out.mc:
        atomic_write_text(
            out_dir / "mc_predictions.jsonl",
            "".join(
                json.dumps({"suite": r.suite, **p}, ensure_ascii=False) + "\n"
                for r in out.mc
                for p in r.predictions
            ),
        )
    if out.generations:
        atomic_write_text(
            out_dir / "generations.jsonl",
            "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in out.generations),
        )
    return out


def run_long_context(
    loaded: LoadedModel, cfg: EvalConfig, settings: Settings, out_dir: Path, out: EvalOutput
) -> None:
    """Passkey retrieval and bpb by position: metrics into `out`, plus long_context.md/.json, passkey_records.jsonl
    and the PNGs (passkey_heatmap.png, bpb_by_position.png) in out_dir."""
    lc = cfg.long_context
    if lc.bpb_by_position is not None:  # a length the model cannot take fails before the passkey grid runs
        position_length(lc.bpb_by_position, loaded.model.cfg.max_seq_len)
    passkey, positions, notes = None, [], []
    if lc.passkey is not None:
        passkey = evaluate_passkey(loaded.model, loaded.tokenizer, lc.passkey, settings)
        notes += passkey.notes
        out.metrics.update(passkey.metrics())
        out.long_context["passkey"] = passkey.to_dict()
        atomic_write_text(
            out_dir / "passkey_records.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in passkey.records),
        )
        if passkey.lengths:
            passkey_heatmap(passkey, out_dir / "passkey_heatmap.png", f"{loaded.label}: passkey accuracy")
        for n in passkey.lengths:
            print(
                f"[{loaded.label}] passkey {n} tokens: acc {out.metrics[f'passkey/{n}/acc']:.2f}", flush=True
            )
    if lc.bpb_by_position is not None:
        positions, pos_notes = evaluate_bpb_by_position(
            loaded.model, loaded.tokenizer, lc.bpb_by_position, settings
        )
        notes += pos_notes
        out.metrics.update(position_metrics(positions))
        out.long_context["bpb_by_position"] = [r.to_dict() for r in positions]
        position_plot(
            positions, out_dir / "bpb_by_position.png", f"{loaded.label}: bits-per-byte by position"
        )
        for r in positions:
            print(
                f"[{loaded.label}] bpb by position {r.language}: "
                + " ".join(f"{b['lo']}-{b['hi']}:{b['bpb']:.3f}" for b in r.buckets),
                flush=True,
            )
    for n in notes:
        print(f"[{loaded.label}] note: {n}", flush=True)
    out.long_context["notes"] = notes
    out.long_context_md = long_context_markdown(passkey, positions, notes)
    atomic_write_text(out_dir / "long_context.md", out.long_context_md)
    atomic_write_json(out_dir / "long_context.json", out.long_context)


def run_harness(
    loaded: LoadedModel, cfg: EvalConfig, settings: Settings, out_dir: Path, ev: LMEvaluator
) -> tuple[dict[str, float], list[str]]:
    """Write the suite as local lm_eval tasks and run `lm_eval --model hf` on the model's HF export."""
    hf_dir = loaded.hf_dir
    if hf_dir is None:  # a checkpoint: export it first
        from llm_core.export_hf import export_hf

        hf_dir = export_hf(loaded.model, out_dir / HF_EXPORT, tokenizer=loaded.tokenizer)
    tasks_dir = out_dir / "lm_eval_tasks"
    tasks = list(cfg.lm_eval.tasks)
    if cfg.lm_eval.include_local:
        for spec in cfg.text:
            for lang, file in spec.files.items():
                docs = read_documents(resolve_path(file, settings), spec.unit, spec.text_field, spec.max_docs)
                tasks.append(write_text_task(tasks_dir, task_name(cfg.name, spec.name, lang), docs))
        for spec in cfg.multiple_choice:
            try:
                items, pool, _ = load_suite(spec, settings)
            except UnavailableError:
                if spec.skip_unavailable:
                    continue
                raise
            prompts = []
            for i, item in enumerate(items):
                context, conts = build_prompt(item, i, items, pool, spec)
                prompts.append((context, conts, item.answer))
            tasks.append(write_mc_task(tasks_dir, task_name(cfg.name, spec.name), prompts))
    if not tasks:
        raise ValueError("lm_eval.enabled but no tasks: add lm_eval.tasks or text/multiple_choice suites")
    import torch

    cmd = lm_eval_command(
        hf_dir,
        tasks,
        include_path=tasks_dir if cfg.lm_eval.include_local else None,
        output_path=out_dir / "lm_eval",
        prefix_token_id=loaded.tokenizer.eos_id,
        max_length=ev.window,
        device="cuda" if next(loaded.model.parameters()).is_cuda and torch.cuda.is_available() else "cpu",
        batch_size=cfg.lm_eval.batch_size,
        limit=cfg.lm_eval.limit,
        dtype=cfg.model.dtype,
    )
    print("lm_eval: " + " ".join(cmd[2:]), flush=True)
    results = run_lm_eval(
        cmd, out_dir / "lm_eval", offline=not cfg.lm_eval.tasks, timeout_s=cfg.lm_eval.timeout_s
    )
    return flat_results(results), cmd


# ---------------------------------------------------------------------------------------- the gate


def baseline_metrics(
    loaded: LoadedModel,
    cfg: EvalConfig,
    settings: Settings,
    out_dir: Path,
    current: dict[str, float],
    run_id: str,
) -> tuple[str | None, dict[str, float] | None, str]:
    """(baseline URI, its metrics for this suite, note). The baseline is <name>@<baseline_alias>; results it has
    for this suite config are reused, otherwise it is evaluated now (and tagged) when gate.evaluate_baseline.
    Returns no baseline only when the alias is not set yet; any other failure to read it raises."""
    alias = cfg.gate.baseline_alias or cfg.gate.alias
    if loaded.name is None:
        return None, None, "not a registered model: relative rules have no baseline"
    mv = registry.champion_version(loaded.name, alias, settings)
    if mv is None:
        return None, None, f"no current @{alias} (the alias is not set yet): relative rules not applied"
    uri = mv.uri
    if str(mv.version) == str(loaded.version):
        return uri, current, f"the model is the current @{alias}"
    found = metrics_from_tags(dict(mv.tags), cfg.name, cfg.suite_sha256())
    if found is not None:
        return uri, found, f"baseline results from {uri}'s tags"
    if not cfg.gate.evaluate_baseline:
        return uri, None, f"{uri} has no results for suite {cfg.name!r} and gate.evaluate_baseline is false"
    print(f"evaluating the baseline {uri} (@{alias}) with suite {cfg.name!r}", flush=True)
    base = load_model(cfg.model, settings, source=uri)
    base_dir = out_dir / "baseline"
    base_dir.mkdir(parents=True, exist_ok=True)
    res = evaluate(base, cfg, settings, base_dir)
    set_version_tags(
        loaded.name, str(mv.version), eval_tags(cfg.name, cfg.suite_sha256(), run_id, res.metrics)
    )
    return uri, res.metrics, f"baseline {uri} evaluated in this run"


def apply_gate(
    loaded: LoadedModel,
    cfg: EvalConfig,
    settings: Settings,
    out_dir: Path,
    metrics: dict[str, float],
    run_id: str,
) -> GateDecision:
    import mlflow

    alias = cfg.gate.alias
    baseline_alias = cfg.gate.baseline_alias or alias
    baseline_error = None
    try:
        base_uri, base, note = baseline_metrics(loaded, cfg, settings, out_dir, metrics, run_id)
    # fail closed: only "alias not set yet" (no baseline, no error) lets the absolute rules decide alone
    except Exception as exc:
        if not isinstance(exc, ValueError):
            log.exception("reading the baseline @%s of %s failed", baseline_alias, loaded.name)
        base_uri, base = None, None
        baseline_error = (
            f"the baseline @{baseline_alias} of {loaded.name} could not be read, so the gate refuses instead of "
            f"skipping its relative rules: {type(exc).__name__}: {exc}"
        )
        note = "baseline unreadable"
    if base is not None and base is not metrics:
        tracking.log_metrics({f"baseline/{k}": v for k, v in base.items()})
    decision = decide(cfg.gate, metrics, base, base_uri, baseline_error)
    if cfg.promote and decision.passed:
        from mlflow import MlflowClient

        champion = registry.champion_version(str(loaded.name), alias, settings)
        previous = champion.version if champion is not None else None
        MlflowClient().set_registered_model_alias(loaded.name, alias, loaded.version)
        decision.promoted = True
        decision.note = f"{note}; promoted: @{alias} {'v' + str(previous) if previous else '(unset)'} -> v{loaded.version}"
    elif cfg.promote:
        decision.note = f"{note}; not promoted: the gate failed"
    else:
        decision.note = f"{note}; not promoted: --promote not given"
    print(f"gate @{alias}: {decision.reasons}", flush=True)
    reasons = decision.reasons
    tags = {
        f"tulpar.gate.{alias}": "pass" if decision.passed else "fail",
        f"tulpar.gate.{alias}.reasons": reasons,
        f"tulpar.gate.{alias}.baseline": base_uri or "none",
        f"tulpar.gate.{alias}.promoted": str(decision.promoted).lower(),
        f"tulpar.gate.{alias}.suite": cfg.name,
        f"tulpar.gate.{alias}.run_id": run_id,
    }
    if loaded.name is not None:
        set_version_tags(loaded.name, str(loaded.version), tags)
    mlflow.set_tags(
        {
            "tulpar.gate.alias": alias,
            "tulpar.gate.result": tags[f"tulpar.gate.{alias}"],
            "tulpar.gate.reasons": reasons[:5000],
            "tulpar.gate.baseline": base_uri or "none",
            "tulpar.gate.promoted": str(decision.promoted).lower(),
        }
    )
    return decision


# ---------------------------------------------------------------------------------------- the job


def check_config(cfg: EvalConfig) -> None:
    if not cfg.model.source:
        raise ValueError(
            "no model to evaluate: pass --model models:/<name>/<version> | models:/<name>@<alias> | <HF dir> | "
            "<checkpoint dir> (or model.source=...)"
        )
    if not (
        cfg.text
        or cfg.multiple_choice
        or cfg.generation.enabled
        or cfg.lm_eval.enabled
        or cfg.long_context.enabled
    ):
        raise ValueError(
            f"suite {cfg.name!r} evaluates nothing: add text, multiple_choice, generation or long_context"
        )
    if cfg.promote:
        if not registry.is_registered(cfg.model.source):
            raise ValueError(
                f"--promote moves an alias of a registered model, but {cfg.model.source!r} is not one: pass "
                "models:/<name>/<version> (register it first)"
            )
        if not cfg.gate.rules:
            raise ValueError(
                "--promote needs gate.rules in the config: the alias moves only when they all hold"
            )
    expected = cfg.expected_metrics()
    pb = cfg.long_context.bpb_by_position
    # bucket names depend on the model's max_seq_len when bpb_by_position.length is not set
    open_prefixes = (
        ("lm_eval/", "bpb_by_position/") if pb is not None and pb.length is None else ("lm_eval/",)
    )
    for rule in cfg.gate.rules:
        if rule.metric not in expected and not rule.metric.startswith(open_prefixes):
            raise ValueError(
                f"gate rule metric {rule.metric!r} is not produced by suite {cfg.name!r}: use one of "
                f"{sorted(expected)[:30]}"
            )


def main(cfg: EvalConfig, settings: Settings) -> JobResult:
    check_config(cfg)
    tracking.check_server(settings)
    loaded = load_model(cfg.model, settings)
    cache = StageCache(settings, STAGE, eval_identity(cfg, loaded, settings))
    if (stored := cache.lookup(gate_still_holds(settings, loaded))) is not None:
        return stored
    slug = f"{loaded.name}/{loaded.version}" if loaded.name else f"local/{Path(loaded.uri).name}"
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
    else:  # ours alone: start clean so that no file of an earlier run is logged with this one
        out_dir = settings.home / "evals" / slug / cfg.name
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    )
    suite_sha = cfg.suite_sha256()
    tags = {
        "tulpar.model_uri": loaded.uri,
        "tulpar.parent_model_uri": loaded.uri,
        "tulpar.tokenizer_sha256": loaded.tokenizer.sha256,
        "tulpar.eval.suite": cfg.name,
        "tulpar.eval.suite_sha256": suite_sha,
    }
    if loaded.name:
        tags["tulpar.model_name"] = loaded.name
    with tracking.start_run(settings, STAGE, cfg, run_name=f"{loaded.label}-{cfg.name}", tags=tags) as run:
        run_id = run.info.run_id
        res = evaluate(loaded, cfg, settings, out_dir)
        tracking.log_metrics(res.metrics)
        if loaded.name:
            set_version_tags(
                loaded.name, str(loaded.version), eval_tags(cfg.name, suite_sha, run_id, res.metrics)
            )
        decision = apply_gate(loaded, cfg, settings, out_dir, res.metrics, run_id) if cfg.gate.rules else None

        comparison = {}
        if cfg.compare.enabled:
            comparison = write_comparison(loaded, cfg, out_dir, res.metrics, suite_sha)
        report = model_report(
            loaded.label,
            loaded.uri,
            cfg.name,
            [r.to_dict() for r in res.text],
            [r.summary() for r in res.mc],
            res.generations,
            res.gen_metrics,
            res.lm_eval,
            decision.to_dict() if decision else None,
            res.scoring,
        )
        if res.long_context_md:
            report += "\n" + res.long_context_md
        if comparison.get("markdown"):
            report += "\n## Comparison across versions\n\n" + comparison["markdown"] + "\n"
        atomic_write_text(out_dir / "report.md", report)
        if decision is not None:
            atomic_write_json(out_dir / "gate.json", decision.to_dict())
        for item in sorted(out_dir.iterdir()):  # everything but a checkpoint's temporary HF export
            if item.name == HF_EXPORT:
                continue
            if item.is_dir():
                tracking.log_artifacts(item, f"eval/{item.name}")
            else:
                tracking.log_figure_file(item, "eval")
        if comparison.get("png"):
            tracking.log_figure_file(Path(comparison["png"]), "plots")

    outputs = {
        "model_uri": loaded.uri,
        "output_dir": str(out_dir),
        "report": str(out_dir / "report.md"),
        "results": str(out_dir / "results.json"),
        "comparison_md": comparison.get("md_path"),
        "comparison_png": comparison.get("png"),
        "gate": decision.to_dict() if decision else None,
        "lm_eval_command": " ".join(res.lm_eval_cmd) if res.lm_eval_cmd else None,
    }
    return cache.store(
        JobResult(STAGE, outputs=outputs, metrics=res.metrics, mlflow_run_id=run_id, output_dir=out_dir)
    )


def eval_identity(cfg: EvalConfig, loaded: LoadedModel, settings: Settings) -> dict:
    """What an evaluation's result depends on: the suite config, the model (a registered version is immutable; a
    directory is hashed) and the eval data (jobs.platform.cache)."""
    identity: dict = {"config": config_to_dict(cfg), "model": loaded.uri}
    if not loaded.uri.startswith("models:/"):
        identity["model_files"] = stat_fingerprint(Path(loaded.uri))
    identity["eval_data"] = stat_fingerprint(settings.data / "eval")
    identity["suites"] = {s.name: stat_fingerprint(Path(s.path)) for s in cfg.multiple_choice if s.path}
    lc = cfg.long_context
    if lc.bpb_by_position is not None:  # long texts usually live outside TULPAR_DATA/eval (e.g. corpus/)
        identity["bpb_by_position"] = {
            lang: stat_fingerprint(resolve_path(f, settings)) for lang, f in lc.bpb_by_position.files.items()
        }
    if lc.passkey is not None and lc.passkey.filler == "corpus":
        identity["passkey_corpus"] = {
            lang: stat_fingerprint(settings.data / "corpus" / lang) for lang in lc.passkey.languages
        }
    return identity


def gate_still_holds(settings: Settings, loaded: LoadedModel):
    """A stored evaluation with a gate is current only while the alias is where that decision left it: at this
    version if it promoted it, at the same baseline if it did not (an unreachable registry raises)."""

    def check(stored) -> bool:
        gate = stored.outputs.gate
        if gate is None or loaded.name is None:
            return True
        now = current_alias_version(settings, loaded.name, gate.alias)
        expected = stored.outputs.model_uri if gate.promoted else gate.baseline_uri
        return now == expected

    return check


def current_alias_version(settings: Settings, name: str, alias: str) -> str | None:
    """models:/<name>/<version> of @alias, None when the alias is not set; other registry errors raise."""
    resolved = registry.champion_version(name, alias, settings)
    return None if resolved is None else resolved.uri


def write_comparison(
    loaded: LoadedModel, cfg: EvalConfig, out_dir: Path, metrics: dict[str, float], suite_sha: str
) -> dict:
    """The table across registered versions with results for this suite config (just this model otherwise)."""
    if loaded.name:
        rows = version_rows(loaded.name, cfg.name, suite_sha, cfg.compare.max_versions)
        title_name = loaded.name
    else:
        rows = [{"version": loaded.label, "stage": "", "aliases": [], "metrics": metrics, "tags": {}}]
        title_name = loaded.label
    if not rows:
        return {}
    columns = cfg.compare.metrics or default_columns(list(metrics))
    md = comparison_markdown(title_name, rows, columns, cfg.gate.alias)
    md_path = atomic_write_text(out_dir / "comparison.md", f"# {title_name}: suite `{cfg.name}`\n\n{md}\n")
    png = comparison_png(
        title_name, rows, columns, out_dir / "comparison.png", f"{title_name} — suite {cfg.name}"
    )
    print(md, flush=True)
    return {"markdown": md, "md_path": str(md_path), "png": str(png)}


def run(argv: list[str] | None = None) -> int:
    return run_job(STAGE, EvalConfig, main, preparse(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(run())

"""A recipe end to end: our tokenizer -> token shards -> pretrain -> (context extension) -> SFT -> DPO -> (distill)
-> eval + promotion gate -> serve the promoted model -> smoke test with the `openai` client.

    python -m pipelines.train_to_serve --recipe tiny [--rehearsal] [--from sft] [--target k8s] [--keep-serving]
    make recipe RECIPE=kk-350m [REHEARSAL=1]          (make demo = make recipe RECIPE=tiny)

Each stage is its job's own entry point (`python -m jobs.<stage> --config ...`), run here (target `local`) or
submitted to a cluster through `pipelines.submit`. Stages hand each other their typed results
(`jobs.platform.results`): the pipeline passes an earlier stage's result to the next as `--input ROLE=result.json`
(tokenizer -> preprocess, dataset -> pretrain, model version -> the next training stage and eval), and reads each
job's result line back typed. A job decides whether its output is current (`jobs.platform.cache`): every stage's job
runs, and one whose config, inputs and code are unchanged returns its stored result at once ("cached").
`--from <stage>` makes that stage and the later ones redo their work (`--rerun`).

Serving is fail-closed: the pipeline serves the version the gate promoted; when the gate refused, the previous
`@champion` if there is one, else it stops and says so. `--serve-unpromoted` serves the just-trained model anyway.
Every stage's MLflow run is a child of one pipeline run (TULPAR_PARENT_RUN_ID).
Preemption (`pipelines.preemption`): a stage that stopped on SIGTERM after a checkpoint (exit 75) is reported as
preempted, not failed, and the pipeline exits 75; the same pipeline command resumes it (earlier stages are cached,
the stage's job resumes from its checkpoint). SIGTERM to the pipeline is passed on to the running stage.
Logs: $TULPAR_HOME/pipelines/<name>/logs/<stage>.log; results: $TULPAR_HOME/pipelines/<name>/results/<stage>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.platform import registry, tracking
from jobs.platform.configfile import apply_overrides, validate_config
from jobs.platform.results import (
    EvalOutputs,
    ModelVersionOutputs,
    ResultError,
    StageResult,
    read_result,
)
from jobs.platform.runtime import EXIT_USER_ERROR, REPO_ROOT, Settings, result_from_output
from llm_core.io import atomic_write_json
from pipelines.preemption import EXIT_PREEMPTED, SigtermToStage, StagePreempted, stage_was_preempted
from pipelines.recipes import (
    STAGES,
    RecipeConfig,
    ServeSpec,
    StageSpec,
    load_recipe,
    split_serve_overrides,
    stage_job,
)

TRAINING = ("pretrain", "extend", "sft", "dpo", "rl")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, log: Path, message: str):
        super().__init__(
            f"stage {stage} failed: {message}\n  log: {log}\n  fix the cause, then resume with: "
            f"python -m pipelines.train_to_serve --recipe <recipe> --from {stage}"
        )


class ServingRefused(RuntimeError):
    """The gate refused the model and there is no earlier champion to serve instead."""


def config_path(stage: str, name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    return REPO_ROOT / "configs" / stage_job(stage) / f"{name}.yaml"


@dataclass
class StageRun:
    result: StageResult
    seconds: float
    result_file: Path
    peak_rss_bytes: int = 0  # the job's whole process tree (its local Ray workers included), sampled


class PeakRss:
    """Samples, in a thread, the summed resident memory of a process and all its descendants (a local Ray's raylet
    and workers are descendants of the job that started it) every `interval_s`; `peak` is the largest sum."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Pipeline:
    def __init__(self, recipe: RecipeConfig, settings: Settings, target: str, *, rehearsal: bool = False):
        self.recipe, self.settings, self.target, self.rehearsal = recipe, settings, target, rehearsal
        self.name = f"{recipe.name}-rehearsal" if rehearsal else recipe.name
        self.model_name = f"{recipe.model_name}-rehearsal" if rehearsal else recipe.model_name
        self.root = settings.home / "pipelines" / self.name
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        (self.root / "results").mkdir(parents=True, exist_ok=True)
        self.runs: dict[str, StageRun] = {}
        self.serving: dict[str, Any] | None = None
        self.sigterm = SigtermToStage()
        # what carries on after a preemption (main sets the invocation's own; --from is dropped: it redoes stages)
        self.resume_command = f"python -m pipelines.train_to_serve --recipe {recipe.name}" + (
            " --rehearsal" if rehearsal else ""
        )
        # a rehearsal's serve overrides: smoke-test keys (alias, max_tokens, ...) to the spec, the rest to the config
        spec_over, self.serve_config_overrides = split_serve_overrides(
            list(recipe.rehearsal.serve) if rehearsal else []
        )
        self.serve_spec = validate_config(
            ServeSpec, apply_overrides(recipe.serve.model_dump(), spec_over), "recipe serve + rehearsal"
        )

    def order(self) -> list[str]:
        r = self.recipe
        return [
            s
            for s in STAGES
            if (s == "serve" and r.serve.enabled)
            or (s != "serve" and getattr(r, s) is not None and getattr(r, s).enabled)
        ]

    def overrides(self, stage: str, spec: StageSpec | ServeSpec) -> list[str]:
        if stage == "serve":
            return [*spec.overrides, *self.serve_config_overrides]
        extra = list(getattr(self.recipe.rehearsal, stage)) if self.rehearsal else []
        return [*spec.overrides, *extra]

    # ------------------------------------------------------------------ one job
    def run_stage(
        self,
        stage: str,
        inputs: dict[str, Path],
        index: int,
        total: int,
        rerun: bool,
        parent_run_id: str,
        job_args: list[str] | None = None,
    ) -> StageResult:
        spec: StageSpec = getattr(self.recipe, stage)
        label = f"[{index}/{total}] {stage:<10}"
        log_file = self.root / "logs" / f"{stage}.log"
        args = ["--config", str(config_path(stage, spec.config))]
        for role, path in inputs.items():  # pipelines.submit sends the result itself to a cluster
            args += ["--input", f"{role}={path}"]
        if rerun:
            args.append("--rerun")
        args += [*(job_args or []), *self.overrides(stage, spec)]
        if stage in TRAINING or stage == "distill":
            args.append(f"name={self.model_name}")
        if self.sigterm.requested:
            raise StagePreempted(stage, None, None, self.resume_command)
        job = stage_job(stage)
        cmd = self.stage_command(job, args)
        env = {**os.environ, "TULPAR_PARENT_RUN_ID": parent_run_id, "PYTHONUNBUFFERED": "1"}
        tty = sys.stdout.isatty()
        if tty:
            print(f"{label} running ...", end="", flush=True)
        started = time.perf_counter()
        with log_file.open("w") as log, tempfile.TemporaryFile("w+") as out:
            child = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=log, text=True)
            with PeakRss(child.pid) as rss, self.sigterm.running(child):
                child.wait()
            peak_rss = rss.peak
            out.seek(0)
            stdout = out.read()
            log.write(stdout)
        proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, None)
        elapsed = time.perf_counter() - started
        back = chr(13) if tty else ""
        raw = result_from_output(proc.stdout)
        if stage_was_preempted(proc.returncode, raw) or (proc.returncode != 0 and self.sigterm.requested):
            print(f"{back}{label} preempted after {elapsed:.0f}s", flush=True)
            raise StagePreempted(stage, log_file, raw or {}, self.resume_command)
        if proc.returncode != 0 or raw is None or raw.get("status") != "ok":
            print(f"{back}{label} failed after {elapsed:.0f}s", flush=True)
            message = (raw or {}).get("error") or f"exit code {proc.returncode}"
            raise StageFailed(stage, log_file, message)
        try:
            result = read_result(job, proc.stdout)  # the job's result contract (extend: pretrain's)
        except ResultError as exc:
            print(f"{back}{label} failed after {elapsed:.0f}s", flush=True)
            raise StageFailed(stage, log_file, str(exc)) from None
        result_file = self.root / "results" / f"{stage}.json"
        atomic_write_json(result_file, result.model_dump(mode="json"))
        word = "cached " if result.reused else f"ok in {elapsed:5.0f}s"
        print(f"{back}{label} {word}  {summarize(stage, result)}", flush=True)
        self.runs[stage] = StageRun(result, elapsed, result_file, peak_rss)
        return result

    def stage_command(self, job: str, args: list[str]) -> list[str]:
        """The stage's process: its job's entry point here, or `pipelines.submit` to the recipe's target."""
        if self.target == "local":
            return [sys.executable, "-m", f"jobs.{job}", *args]
        return [sys.executable, "-m", "pipelines.submit", job, "--target", self.target, *args]

    # ------------------------------------------------------------------ the chain
    def run(
        self, start_from: str | None, keep_serving: bool, serve_unpromoted: bool = False
    ) -> dict[str, Any]:
        order = self.order()
        if start_from and start_from not in order:
            raise ValueError(f"--from {start_from!r} is not an enabled stage of this recipe: {order}")
        forced = set(order[order.index(start_from) :]) if start_from else set()
        import mlflow

        exp = tracking.setup(self.settings, "tulpar-train")
        with (
            self.sigterm.installed(),
            mlflow.start_run(
                experiment_id=exp,
                run_name=f"pipeline-{self.name}",
                tags={"tulpar.stage": "pipeline", "tulpar.git_commit": tracking.git_commit()},
            ) as run,
        ):
            mlflow.log_dict(self.recipe.model_dump(), "recipe.yaml")
            n = len(order)
            i = 0

            def step(stage: str, inputs: dict[str, Path], job_args: list[str] | None = None) -> StageResult:
                nonlocal i
                i += 1
                return self.run_stage(stage, inputs, i, n, stage in forced, run.info.run_id, job_args)

            def file(stage: str) -> Path:
                return self.runs[stage].result_file

            try:
                last = self.run_stages(order, step, file)
                trained = self.runs[last].result.outputs
                assert isinstance(trained, ModelVersionOutputs)
                evaluation: EvalOutputs | None = None
                if "eval" in order:
                    evaluation = step("eval", {"model": file(last)}, ["--promote"]).outputs  # type: ignore[assignment]
                if "serve" in order:
                    if self.sigterm.requested:
                        raise StagePreempted("serve", None, None, self.resume_command)
                    i += 1
                    source, why = self.choose_served_model(trained, evaluation, serve_unpromoted)
                    self.serve(source, why, i, n, keep_serving)
            except StagePreempted as exc:  # stopped from outside: KILLED, as the stages' own runs
                mlflow.set_tags({"tulpar.preempted": "true", "tulpar.preempted_stage": exc.stage})
                mlflow.end_run("KILLED")
                raise
            mlflow.set_tag("tulpar.final_model_uri", trained.model_uri)
        return {"model_uri": trained.model_uri, "pipeline_run_id": run.info.run_id}

    def run_stages(self, order: list[str], step, file) -> str:
        """The training chain up to the last training stage; returns that stage's name."""
        step("tokenizer", {})
        step("preprocess", {"tokenizer": file("tokenizer")})
        step("pretrain", {"dataset": file("preprocess")})
        last = "pretrain"
        if "extend" in order:  # context extension: the same data, from the pretrained model
            step("extend", {"dataset": file("preprocess"), "init": file("pretrain")})
            last = "extend"
        for stage in ("sft", "dpo", "rl"):
            if stage in order:
                step(stage, {"init": file(last)})
                last = stage
        if "distill" in order:  # the student starts from the pretrained model, the teacher is the aligned one
            step("distill", {"init": file("pretrain"), "teacher": file(last)})
        return last

    # ------------------------------------------------------------------ what to serve
    def choose_served_model(
        self, trained: ModelVersionOutputs, evaluation: EvalOutputs | None, serve_unpromoted: bool
    ) -> tuple[str, str]:
        """(model reference to serve, why). Fail closed: only a promoted model, an earlier champion, or an
        explicitly unpromoted one (--serve-unpromoted)."""
        if trained.model_uri is None:
            raise ServingRefused("the last training stage registered no model version: nothing to serve")
        if serve_unpromoted:
            return trained.model_uri, "not promoted: --serve-unpromoted"
        gate = evaluation.gate if evaluation is not None else None
        if gate is not None and gate.passed and gate.promoted:
            return evaluation.model_uri, f"promoted to @{gate.alias}"  # type: ignore[union-attr]
        alias = gate.alias if gate is not None else self.serve_spec.alias
        refused = (
            f"the gate refused {trained.model_uri} ({gate.reasons})"
            if gate is not None
            else f"{trained.model_uri} was not evaluated (the recipe has no eval stage), so nothing promoted it"
        )
        previous = champion_version(self.settings, self.model_name, alias)
        if previous is None:
            raise ServingRefused(
                f"{refused}, and there is no earlier @{alias} to serve instead: fix the model or the gate rules, "
                "or pass --serve-unpromoted to serve it anyway"
            )
        print(f"    {refused}: serving the previous @{alias}, {previous}", flush=True)
        return previous, f"previous @{alias} (the gate refused the new model)"

    # ------------------------------------------------------------------ serve + smoke test
    def serve(self, source: str, why: str, index: int, total: int, keep_serving: bool) -> None:
        spec = self.serve_spec
        log_file = self.root / "logs" / "serve.log"
        cmd = [
            sys.executable,
            "-m",
            "services.llm_serve",
            "--config",
            str(config_path("serve", spec.config)),
            "--model",
            source,
            *self.overrides("serve", spec),
        ]
        label = f"[{index}/{total}] {'serve':<10}"
        tty = sys.stdout.isatty()
        back = chr(13) if tty else ""
        if tty:
            print(f"{label} starting {source} ...", end="", flush=True)
        started = time.perf_counter()
        log = log_file.open("w")
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        rss = PeakRss(proc.pid).__enter__()
        try:
            url, served = wait_ready(log_file, proc, spec.startup_timeout_s)
            answers = smoke_test(url, served, spec)
            seconds = time.perf_counter() - started
            rss.__exit__()
            print(
                f"{back}{label} ok in {seconds:5.0f}s  {url} serves {served} = {source} ({why})", flush=True
            )
            for lang, text in answers.items():
                print(f"    [{lang}] {spec.prompts[lang]!r} -> {text!r}", flush=True)
            self.serving = {
                "url": url,
                "model": served,
                "source": source,
                "why": why,
                "answers": answers,
                "seconds": seconds,
                "peak_rss_bytes": rss.peak,
            }
            if keep_serving:
                print(f"serving at {url} (model {served}); Ctrl-C stops", flush=True)
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
        except Exception as exc:
            print(f"{back}{label} failed", flush=True)
            raise StageFailed("serve", log_file, str(exc)) from None
        finally:
            rss.__exit__()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(90)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def champion_version(settings: Settings, name: str, alias: str) -> str | None:
    """models:/<name>/<version> that @alias points at; None only when the alias is not set yet. An unreachable or
    failing registry raises (jobs.platform.registry): never a default that lets an unpromoted model through."""
    resolved = registry.champion_version(name, alias, settings)
    return None if resolved is None else resolved.uri


def wait_ready(log_file: Path, proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with {proc.returncode}: {tail}")
        try:  # the server's typed result line, printed once it is up
            url = read_result("serve", log_file.read_text(errors="replace")).outputs.url
        except ResultError:
            url = None
        if url:
            try:
                models = httpx.get(f"{url}/models", timeout=5).json()["data"]
                return url, models[0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
        time.sleep(2)
    raise TimeoutError(f"the server was not ready after {timeout:.0f}s")


class SmokeTestFailed(RuntimeError):
    pass


def smoke_test(url: str, model: str, spec: ServeSpec) -> dict[str, str]:
    """One chat completion per language; an empty, whitespace-only or non-text answer fails the stage.

    The completion runs the whole `max_tokens` (vLLM's `ignore_eos`) and keeps special tokens in the text
    (`skip_special_tokens: false`): a barely trained rehearsal model whose likeliest tokens are end-of-text or
    chat markers (the tiny rehearsal's Kazakh answer after 30 pretraining steps) still comes back as text, so an
    empty answer always means broken serving, not an untrained model."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=2)
    answers = {}
    for lang, prompt in spec.prompts.items():
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=spec.max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
        content = r.choices[0].message.content if r.choices else None
        if not isinstance(content, str) or not content.strip():
            raise SmokeTestFailed(
                f"smoke test [{lang}]: {model} answered {content!r} to {prompt!r}: an empty or non-text answer "
                "means the served model or its chat template is broken"
            )
        answers[lang] = content
    return answers


def per_eval_set(metrics: dict[str, float], prefix: str) -> str:
    """`<prefix><eval set>/<lang>` metrics as 'set kk 1.234 ru 2.345 | set2 ...' (each figure under its set)."""
    sets: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        if k.startswith(prefix) and k.count("/") == prefix.count("/") + 1:
            name, lang = k[len(prefix) :].split("/")
            if lang != "avg":
                sets.setdefault(name, {})[lang] = v
    return " | ".join(
        f"{name} " + " ".join(f"{lang} {v:.3f}" for lang, v in sorted(vals.items()))
        for name, vals in sorted(sets.items())
    )


def summarize(stage: str, result: StageResult) -> str:
    """The key figure of a stage, for its progress line; every figure says what it was measured on."""
    m, o = result.metrics, result.outputs
    if stage == "tokenizer":
        return f"vocab {o.vocab_size} -> {o.tokenizer_dir}"  # type: ignore[attr-defined]
    if stage == "preprocess":
        kept, total = m.get("documents_kept", float("nan")), m.get("documents_in", float("nan"))
        return f"{kept:.0f} of {total:.0f} documents kept -> {o.dataset_dir}"  # type: ignore[attr-defined]
    if stage in ("pretrain", "extend"):
        vals = {k.split("/")[-1]: v for k, v in m.items() if k.startswith("best_val_bpb/")}
        bpb = " ".join(f"{lang} {v:.3f}" for lang, v in sorted(vals.items()))
        return f"bpb on the dataset's val split {bpb} -> {o.model_uri}"  # type: ignore[attr-defined]
    if stage in ("sft", "distill"):
        return f"val loss {m.get('best_val_loss', float('nan')):.3f} -> {o.model_uri}"  # type: ignore[attr-defined]
    if stage == "dpo":
        acc = m.get("best_val_rewards/accuracy/pairs")
        head = f"reward accuracy {acc:.2f} " if acc is not None else ""
        return f"{head}-> {o.model_uri}"  # type: ignore[attr-defined]
    if stage == "rl":
        gain = m.get("val_reward_gain")
        head = f"held-out reward {m.get('best_val_reward', float('nan')):.3f}" + (
            f" ({gain:+.3f} vs the start) " if gain is not None else " "
        )
        return f"{head}-> {o.model_uri}"  # type: ignore[attr-defined]
    if stage == "eval":
        gate = o.gate  # type: ignore[attr-defined]
        verdict = "no gate" if gate is None else ("gate passed" if gate.passed else "gate refused")
        if not per_eval_set(m, "bpb/") and "passkey/all/acc" in m:  # a long-context suite
            gain = m.get("passkey/all/key_gain", float("nan"))
            return f"passkey accuracy {m['passkey/all/acc']:.2f}, key gain {gain:+.3f} {verdict}"
        return f"bpb {per_eval_set(m, 'bpb/')} {verdict}".strip()
    return ""


def summary_table(pipe: Pipeline, outcome: dict[str, Any]) -> str:
    rows = [("stage", "seconds", "peak RSS", "result")]
    for stage, sr in pipe.runs.items():
        word = "cached" if sr.result.reused else f"{sr.seconds:.0f}"
        rows.append((stage, word, f"{sr.peak_rss_bytes / 2**30:.2f} GiB", summarize(stage, sr.result)))
    if pipe.serving:
        s = pipe.serving
        rows.append(("serve", f"{s['seconds']:.0f}", f"{s['peak_rss_bytes'] / 2**30:.2f} GiB", s["source"]))
    width = max(len(x[0]) for x in rows)
    lines = [f"{a:<{width}}  {b:>7}  {c:>9}  {d}" for a, b, c, d in rows]
    lines.append(f"final model: {outcome['model_uri']}")
    lines.append(f"MLflow UI:   make mlflow-ui   (tracking store {pipe.settings.mlflow_tracking_uri})")
    return "\n".join(lines)


def resume_command(argv: list[str]) -> str:
    """This invocation without --from (which would redo finished stages): what resumes a preempted pipeline."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--from":
            skip = True
        elif not a.startswith("--from="):
            kept.append(a)
    return shlex.join([sys.executable, "-m", "pipelines.train_to_serve", *kept])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train_to_serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--recipe", "-r", default="tiny", help="configs/recipes/<name>.yaml, or a path")
    parser.add_argument(
        "--rehearsal",
        action="store_true",
        help="the recipe's real shapes for a handful of steps on this machine (its rehearsal: overrides)",
    )
    parser.add_argument(
        "--from", dest="start_from", choices=STAGES, help="run this stage and all later ones again"
    )
    parser.add_argument(
        "--target", help="override the recipe's target: local | http://host:8265 | ray://... | k8s"
    )
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    parser.add_argument(
        "--serve-unpromoted",
        action="store_true",
        help="serve the just-trained model even when the gate did not promote it",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        settings = Settings.from_env()
        pipe = Pipeline(recipe, settings, args.target or recipe.target, rehearsal=args.rehearsal)
        pipe.resume_command = resume_command(sys.argv[1:] if argv is None else argv)
        started = time.perf_counter()
        outcome = pipe.run(
            args.start_from,
            args.keep_serving or os.environ.get("KEEP_SERVING") == "1",
            args.serve_unpromoted,
        )
    except StagePreempted as exc:
        print(f"\n{exc}", file=sys.stderr)
        print(json.dumps(exc.record(), ensure_ascii=False))
        return EXIT_PREEMPTED
    except (StageFailed, ServingRefused) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        print(json.dumps({"stage": "pipeline", "status": "error", "error": str(exc)}))
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"stage": "pipeline", "status": "error", "error": str(exc)}))
        return EXIT_USER_ERROR
    total = time.perf_counter() - started
    print("\n" + summary_table(pipe, outcome) + f"\ntotal: {total:.0f}s")
    timings = {f"seconds/{k}": sr.seconds for k, sr in pipe.runs.items()}
    timings.update({f"peak_rss_bytes/{k}": float(sr.peak_rss_bytes) for k, sr in pipe.runs.items()})
    if pipe.serving:
        timings["seconds/serve"] = pipe.serving["seconds"]
        timings["peak_rss_bytes/serve"] = float(pipe.serving["peak_rss_bytes"])
    result = {
        "stage": "pipeline",
        "status": "ok",
        "outputs": {
            "model_uri": outcome["model_uri"],
            "serve": {k: v for k, v in (pipe.serving or {}).items() if k not in ("seconds", "peak_rss_bytes")}
            or None,
            "results": {k: str(sr.result_file) for k, sr in pipe.runs.items()},
            "cached": sorted(k for k, sr in pipe.runs.items() if sr.result.reused),
        },
        "metrics": timings,
        "mlflow_run_id": outcome["pipeline_run_id"],
    }
    atomic_write_json(pipe.root / "result.json", result)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole platform in one command: raw text -> tokenizer -> shards -> pretrain -> SFT -> DPO -> (distill) ->
eval + promotion gate -> serve -> smoke test with the `openai` client.

    python -m pipelines.train_to_serve --config configs/pipelines/demo.yaml [--from sft] [--target k8s] [--keep-serving]

Each stage is its job's own entry point (`python -m jobs.<stage> --config ...`), run here (target `local`) or
submitted to a cluster through `pipelines.submit` (target `http://<ray dashboard>:8265`, `ray://...` or `k8s`).
Stages hand each other their JSON results (dataset dir -> pretrain, model URI -> next stage). A stage is cached by a
hash of its config file, overrides and inputs: a re-run skips finished stages, `--from <stage>` runs that stage and
everything after it again. Every stage's MLflow run is a child of one pipeline run (TULPAR_PARENT_RUN_ID).
Logs: $TULPAR_HOME/pipelines/<name>/logs/<stage>.log; state: $TULPAR_HOME/pipelines/<name>/state.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from jobs.platform import tracking
from jobs.platform.configfile import load_config
from jobs.platform.runtime import EXIT_USER_ERROR, REPO_ROOT, Settings, result_from_output
from llm_core.config import StrictModel
from llm_core.io import atomic_write_json

STAGES = ("tokenizer", "preprocess", "pretrain", "sft", "dpo", "distill", "eval", "serve")


class StageSpec(StrictModel):
    config: str = Field(description="configs/<stage>/<config>.yaml, or a path")
    overrides: list[str] = Field(default_factory=list, description="dotted key=value overrides")
    enabled: bool = True


class ServeSpec(StrictModel):
    config: str = Field("tiny", description="configs/serve/<config>.yaml")
    overrides: list[str] = Field(default_factory=list)
    alias: str = Field(
        "champion", description="serve models:/<name>@<alias> (falls back to the evaluated version)"
    )
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


class PipelineConfig(StrictModel):
    name: str = Field(description="the pipeline's name (state, logs and the MLflow parent run)")
    model_name: str = Field(description="registered model name the training stages produce")
    target: str = Field("local", description="local | http(s)://<ray dashboard>:8265 | ray://... | k8s")
    tokenizer: StageSpec | None = None
    preprocess: StageSpec
    pretrain: StageSpec
    sft: StageSpec | None = None
    dpo: StageSpec | None = None
    distill: StageSpec | None = None
    eval: StageSpec | None = None
    serve: ServeSpec = Field(default_factory=ServeSpec)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, log: Path, message: str):
        super().__init__(
            f"stage {stage} failed: {message}\n  log: {log}\n  fix the cause, then resume with: "
            f"python -m pipelines.train_to_serve --config <pipeline config> --from {stage}"
        )


def config_path(stage: str, name: str) -> Path:
    p = Path(name)
    return (
        p if p.suffix in (".yaml", ".yml") and p.exists() else REPO_ROOT / "configs" / stage / f"{name}.yaml"
    )


def stage_key(stage: str, spec: Any, inputs: dict[str, Any]) -> str:
    """Cache key: the stage's config file content, its overrides and what it receives from earlier stages."""
    path = config_path(stage, spec.config)
    blob = json.dumps(
        {
            "stage": stage,
            "config": path.read_text(encoding="utf-8") if path.is_file() else spec.config,
            "spec": spec.model_dump(),
            "inputs": inputs,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Pipeline:
    def __init__(self, cfg: PipelineConfig, settings: Settings, target: str):
        self.cfg, self.settings, self.target = cfg, settings, target
        self.root = settings.home / "pipelines" / cfg.name
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        state_file = self.root / "state.json"
        self.state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
        self.results: dict[str, dict] = {}
        self.timings: dict[str, float] = {}

    def save_state(self) -> None:
        atomic_write_json(self.root / "state.json", self.state)

    # ------------------------------------------------------------------ one stage
    def run_stage(
        self,
        stage: str,
        spec: StageSpec,
        extra: list[str],
        inputs: dict[str, Any],
        index: int,
        total: int,
        force: bool,
        parent_run_id: str,
    ) -> dict:
        key = stage_key(stage, spec, inputs)
        cached = self.state.get(stage)
        label = f"[{index}/{total}] {stage:<10}"
        if (
            not force
            and cached
            and cached.get("key") == key
            and cached.get("result", {}).get("status") == "ok"
        ):
            print(f"{label} cached  {summarize(stage, cached['result'])}", flush=True)
            self.timings[stage] = 0.0
            return cached["result"]
        log_file = self.root / "logs" / f"{stage}.log"
        args = ["--config", str(config_path(stage, spec.config)), *spec.overrides, *extra]
        if self.target == "local":
            cmd = [sys.executable, "-m", f"jobs.{stage}", *args]
        else:
            cmd = [sys.executable, "-m", "pipelines.submit", stage, "--target", self.target, *args]
        env = {**os.environ, "TULPAR_PARENT_RUN_ID": parent_run_id, "PYTHONUNBUFFERED": "1"}
        tty = sys.stdout.isatty()
        if tty:
            print(f"{label} running ...", end="", flush=True)
        started = time.perf_counter()
        with log_file.open("w") as log:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
            log.write(proc.stdout)
        elapsed = time.perf_counter() - started
        self.timings[stage] = elapsed
        result = result_from_output(proc.stdout)
        if proc.returncode != 0 or not result or result.get("status") != "ok":
            print(f"{chr(13) if tty else ''}{label} failed after {elapsed:.0f}s", flush=True)
            message = (result or {}).get("error") or f"exit code {proc.returncode}"
            raise StageFailed(stage, log_file, message)
        print(
            f"{chr(13) if tty else ''}{label} ok in {elapsed:5.0f}s  {summarize(stage, result)}", flush=True
        )
        self.state[stage] = {"key": key, "result": result, "seconds": elapsed}
        self.save_state()
        return result

    # ------------------------------------------------------------------ the chain
    def run(self, start_from: str | None, keep_serving: bool) -> dict[str, Any]:
        cfg = self.cfg
        order = [
            s
            for s in STAGES
            if s == "serve"
            and cfg.serve.enabled
            or (s != "serve" and getattr(cfg, s) is not None and getattr(cfg, s).enabled)
        ]
        if start_from and start_from not in order:
            raise ValueError(f"--from {start_from!r} is not an enabled stage of this pipeline: {order}")
        forced = set(order[order.index(start_from) :]) if start_from else set()
        import mlflow

        exp = tracking.setup(self.settings, "tulpar-train")
        with mlflow.start_run(
            experiment_id=exp,
            run_name=f"pipeline-{cfg.name}",
            tags={"tulpar.stage": "pipeline", "tulpar.git_commit": tracking.git_commit()},
        ) as run:
            mlflow.log_dict(cfg.model_dump(), "pipeline.yaml")
            n, r = len(order), self.results
            i = 0

            def step(stage: str, extra: list[str], inputs: dict[str, Any]) -> dict:
                nonlocal i
                i += 1
                spec = getattr(cfg, stage)
                r[stage] = self.run_stage(stage, spec, extra, inputs, i, n, stage in forced, run.info.run_id)
                return r[stage]

            tok_dir = None
            if "tokenizer" in order:
                tok_dir = step("tokenizer", [], {})["outputs"]["tokenizer_dir"]
            pre_extra = [f"tokenizer.path={tok_dir}", "tokenizer.train=null"] if tok_dir else []
            dataset = step("preprocess", pre_extra, {"tokenizer": tok_dir})["outputs"]["dataset_dir"]
            model_uri = step(
                "pretrain", [f"data.dataset={dataset}", f"name={cfg.model_name}"], {"dataset": dataset}
            )["outputs"]["model_uri"]
            pretrained = model_uri
            for stage in ("sft", "dpo"):
                if stage in order:
                    model_uri = step(
                        stage, [f"init={model_uri}", f"name={cfg.model_name}"], {"init": model_uri}
                    )["outputs"]["model_uri"]
            if (
                "distill" in order
            ):  # the student starts from the pretrained model, the teacher is the aligned one
                step(
                    "distill",
                    [f"init={pretrained}", f"teacher={model_uri}"],
                    {"init": pretrained, "teacher": model_uri},
                )
            if "eval" in order:
                step("eval", [f"model.source={model_uri}", "promote=true"], {"model": model_uri})
            if "serve" in order:
                i += 1
                self.serve(model_uri, i, n, keep_serving)
            mlflow.set_tag("tulpar.final_model_uri", model_uri)
        return {
            "model_uri": model_uri,
            "results": r,
            "timings": self.timings,
            "pipeline_run_id": run.info.run_id,
        }

    # ------------------------------------------------------------------ serve + smoke test
    def serve(self, model_uri: str, index: int, total: int, keep_serving: bool) -> None:
        spec = self.cfg.serve
        source = self.champion_or(model_uri, spec.alias)
        log_file = self.root / "logs" / "serve.log"
        cmd = [
            sys.executable,
            "-m",
            "services.llm_serve",
            "--config",
            str(config_path("serve", spec.config)),
            f"models.0.source={source}",
            *spec.overrides,
        ]
        label = f"[{index}/{total}] {'serve':<10}"
        tty = sys.stdout.isatty()
        if tty:
            print(f"{label} starting {source} ...", end="", flush=True)
        started = time.perf_counter()
        log = log_file.open("w")
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            url, served = wait_ready(log_file, proc, spec.startup_timeout_s)
            answers = smoke_test(url, served, spec)
            self.timings["serve"] = time.perf_counter() - started
            print(
                f"{chr(13) if tty else ''}{label} ok in {self.timings['serve']:5.0f}s  {url} serves {served}",
                flush=True,
            )
            for lang, text in answers.items():
                print(f"    [{lang}] {spec.prompts[lang]!r} -> {text!r}", flush=True)
            self.results["serve"] = {"url": url, "model": served, "source": source, "answers": answers}
            if keep_serving:
                print(f"serving at {url} (model {served}); Ctrl-C stops", flush=True)
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
        except Exception as exc:
            print(f"{chr(13) if tty else ''}{label} failed", flush=True)
            raise StageFailed("serve", log_file, str(exc)) from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(90)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            log.close()

    def champion_or(self, model_uri: str, alias: str) -> str:
        from mlflow import MlflowClient

        try:
            MlflowClient(self.settings.mlflow_tracking_uri).get_model_version_by_alias(
                self.cfg.model_name, alias
            )
            return f"models:/{self.cfg.model_name}@{alias}"
        except Exception:
            return model_uri  # the gate did not promote: serve what was just trained and evaluated


def wait_ready(log_file: Path, proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with {proc.returncode}: {tail}")
        status = result_from_output(log_file.read_text(errors="replace"))
        if status and status.get("status") == "ok" and "url" in status.get("outputs", {}):
            url = status["outputs"]["url"]
            try:
                models = httpx.get(f"{url}/models", timeout=5).json()["data"]
                return url, models[0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
        time.sleep(2)
    raise TimeoutError(f"the server was not ready after {timeout:.0f}s")


def smoke_test(url: str, model: str, spec: ServeSpec) -> dict[str, str]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=2)
    answers = {}
    for lang, prompt in spec.prompts.items():
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=spec.max_tokens,
            temperature=0,
        )
        answers[lang] = r.choices[0].message.content or ""
    return answers


def summarize(stage: str, result: dict) -> str:
    """The key figure of a stage, for its progress line."""
    m, o = result.get("metrics", {}), result.get("outputs", {})

    def per_lang(prefix: str) -> str:
        vals = {k.split("/")[-1]: v for k, v in m.items() if k.startswith(prefix)}
        return " ".join(f"{lang} {v:.3f}" for lang, v in sorted(vals.items()))

    if stage == "preprocess":
        return f"{m.get('documents_kept', '?')} of {m.get('documents_in', '?')} documents kept -> {o.get('dataset_dir')}"
    if stage == "tokenizer":
        return f"vocab {o.get('vocab_size')} -> {o.get('tokenizer_dir')}"
    if stage == "pretrain":
        return f"val bpb {per_lang('best_val_bpb/')} -> {o.get('model_uri')}"
    if stage in ("sft", "distill"):
        return f"val loss {m.get('best_val_loss', float('nan')):.3f} -> {o.get('model_uri')}"
    if stage == "dpo":
        acc = m.get("best_val_rewards/accuracy/pairs")
        return (
            f"reward accuracy {acc:.2f} -> {o.get('model_uri')}"
            if acc is not None
            else str(o.get("model_uri"))
        )
    if stage == "eval":
        gate = o.get("gate") or {}
        bpb = per_lang("bpb/") or per_lang("flores200/bpb/")
        return f"{bpb} gate {'passed' if gate.get('passed') else 'held'}".strip()
    return ""


def summary_table(pipe: Pipeline, outcome: dict[str, Any]) -> str:
    r, t = outcome["results"], outcome["timings"]
    rows = [("stage", "seconds", "result")]
    for stage in [s for s in STAGES if s in r]:
        res = r[stage]
        rows.append(
            (stage, f"{t.get(stage, 0):.0f}", summarize(stage, res) if stage != "serve" else res["url"])
        )
    width = max(len(x[0]) for x in rows)
    lines = [f"{a:<{width}}  {b:>7}  {c}" for a, b, c in rows]
    lines.append(f"final model: {outcome['model_uri']}")
    lines.append(f"MLflow UI:   make mlflow-ui   (tracking store {pipe.settings.mlflow_tracking_uri})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train_to_serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", "-c", default=str(REPO_ROOT / "configs" / "pipelines" / "demo.yaml"))
    parser.add_argument(
        "--from", dest="start_from", choices=STAGES, help="run this stage and all later ones again"
    )
    parser.add_argument(
        "--target", help="override the config's target: local | http://host:8265 | ray://... | k8s"
    )
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the pipeline config")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        settings = Settings.from_env()
        pipe = Pipeline(cfg, settings, args.target or cfg.target)
        started = time.perf_counter()
        outcome = pipe.run(args.start_from, args.keep_serving or os.environ.get("KEEP_SERVING") == "1")
    except StageFailed as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        print(json.dumps({"stage": "pipeline", "status": "error", "error": str(exc)}))
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"stage": "pipeline", "status": "error", "error": str(exc)}))
        return EXIT_USER_ERROR
    total = time.perf_counter() - started
    print("\n" + summary_table(pipe, outcome) + f"\ntotal: {total:.0f}s")
    result = {
        "stage": "pipeline",
        "status": "ok",
        "outputs": {
            "model_uri": outcome["model_uri"],
            "serve": outcome["results"].get("serve"),
            "state": str(pipe.root / "state.json"),
        },
        "metrics": {f"seconds/{k}": v for k, v in outcome["timings"].items()},
        "mlflow_run_id": outcome["pipeline_run_id"],
    }
    atomic_write_json(pipe.root / "result.json", result)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

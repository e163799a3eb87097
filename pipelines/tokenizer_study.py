"""The tokenizer study: how the tokenizer changes training and the model, measured.

    python -m pipelines.tokenizer_study --config configs/tokenizer_study/<name>.yaml [key=value ...]
    make tokenizer-study CONFIG=tiny|full

One config names the variants: our BPE at several vocabulary sizes, at several Kazakh shares of its training text
(at a fixed vocabulary), and reference tokenizers (Qwen3, Llama 3, Gemma 3 from $TULPAR_DATA/tokenizers) used as
they are. For each variant the study runs the existing stages through their own entries (`run_job` with the job's
config class and main, as `python -m jobs.<stage>` does), with the same arguments a recipe passes:

    jobs.tokenizer (ours only) -> jobs.preprocess (the same corpus and config for every variant)
      -> per budget and seed: jobs.pretrain (the same model shape; embedding and head sized to the vocabulary)
         -> jobs.eval (bits-per-byte on FLORES-200 / NTREX, generation speed)

under two budgets: the same training FLOPs and the same training bytes, both equal to what `budget.steps` steps of
the reference variant `budget.reference` cost (so that variant trains the same run under both). It adds the
tokenizer's own figures on the same eval text (tokens per byte, tokens per word, via llm_core.tokenizer_eval),
the share of parameters in embeddings, training bytes/s (the trainer's tokens/s x the data's bytes per token)
and writes a report (report.md, results.json, results.csv, PNG plots) to $TULPAR_HOME/tokenizer_study/<name>/.

MLflow: a parent run (experiment tulpar-tokenizer, tulpar.stage=tokenizer_study) with one child run per variant;
each stage's run is a child of its variant's run. Partial runs resume: a variant whose child run finished with the
same identity (its spec, the budgets, seeds and stage configs) is not redone; the stages of an unfinished variant
are each job's own cache (a finished stage returns its stored result at once).
Where the stages run (`run_stages`): in_process (default) runs them in the study's process, one after another, on
one Ray connection (RAY_ADDRESS's cluster, or one local Ray started for the whole study) and one MLflow store, so
the start-up of Python, its imports and Ray is paid once, not per stage (each pretraining run still starts its
own Ray Train workers); subprocess runs each as its own `python -m jobs.<stage>` job. Both give the same results (the same configs, seeds and caches).
Preemption (`pipelines.preemption`): a stage stopped on SIGTERM after a checkpoint (exit 75) makes the study exit
75 naming it; running the study again resumes (the stage's job resumes from its checkpoint). SIGTERM to the study
is passed on to a subprocess stage; an in-process training stage gets it directly.
Logs: $TULPAR_HOME/tokenizer_study/<name>/logs/<variant>/<stage>[-<budget>-s<seed>].log.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import Field, model_validator

from jobs.evaluation.config import EvalConfig
from jobs.evaluation.text import read_documents, resolve_path
from jobs.platform import tracking
from jobs.platform.configfile import load_config
from jobs.platform.results import ResultError, StageResult, read_result
from jobs.platform.runtime import (
    EXIT_USER_ERROR,
    REPO_ROOT,
    Settings,
    disconnect_ray,
    result_from_output,
    run_job,
)
from jobs.prep.config import PreprocessConfig
from jobs.pretrain import PretrainConfig
from jobs.tokenizer import TokenizerJobConfig
from llm_core.config import ConfigError, StrictModel
from llm_core.io import atomic_write_json, atomic_write_text
from llm_core.tokenizer import SPECIAL_TOKENS, Tokenizer
from llm_core.tokenizer_eval import EvalText, LoadedTokenizer, measure
from pipelines.preemption import EXIT_PREEMPTED, SigtermToStage, StagePreempted, stage_was_preempted
from pipelines.recipes import StageSpec, stage_config_path
from pipelines.tokenizer_study_report import render_markdown, write_plots

STUDY_DIR = REPO_ROOT / "configs" / "tokenizer_study"
REFERENCES = ("qwen3", "llama3", "gemma3")
BUDGETS = ("flops", "bytes")
STAGE_CONFIGS = {
    "tokenizer": TokenizerJobConfig,
    "preprocess": PreprocessConfig,
    "pretrain": PretrainConfig,
    "eval": EvalConfig,
}


class Variant(StrictModel):
    """One tokenizer: ours (`vocab_size`, optionally `kk_share`) or a reference (`reference`)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$", description="short, used in run and model names")
    vocab_size: int | None = Field(None, gt=262, description="our BPE at this vocabulary size")
    kk_share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Kazakh share of the tokenizer's training characters (the rest split evenly between the other "
        "languages; the total is the tokenizer config's); default: the tokenizer config's own budgets",
    )
    reference: Literal["qwen3", "llama3", "gemma3"] | None = Field(
        None, description="a reference tokenizer from $TULPAR_DATA/tokenizers, used as it is"
    )
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="this variant's training seeds (default: the study's); fewer where a run is expensive",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Variant:
        if (self.vocab_size is None) == (self.reference is None):
            raise ValueError(
                f"variant {self.name!r}: give vocab_size (our BPE) or reference (qwen3, llama3, gemma3), not both"
            )
        if self.reference is not None and self.kk_share is not None:
            raise ValueError(
                f"variant {self.name!r}: kk_share applies to our BPE only (drop it or vocab_size)"
            )
        return self

    @property
    def kind(self) -> str:
        return "reference" if self.reference else "bpe"


class Budget(StrictModel):
    """Both budgets equal what `steps` optimizer steps of the reference variant cost: its FLOPs (same-FLOPs
    budget) and its bytes of training text (same-bytes budget)."""

    reference: str = Field(description="the variant whose `steps` steps define both budgets")
    steps: int = Field(gt=0)
    kinds: list[Literal["flops", "bytes"]] = Field(default_factory=lambda: list(BUDGETS), min_length=1)


class StudyConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str = ""
    languages: list[str] = Field(default_factory=lambda: ["kk", "ru", "en"], min_length=1)
    tokenizer: StageSpec = Field(description="configs/tokenizer/<config>.yaml for our BPE variants")
    preprocess: StageSpec
    pretrain: StageSpec
    eval: StageSpec
    variants: list[Variant] = Field(min_length=2)
    budget: Budget
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    run_stages: Literal["in_process", "subprocess"] = Field(
        "in_process",
        description="in_process: each stage's entry runs in the study's process, on one Ray connection "
        "(RAY_ADDRESS's cluster, or one local Ray for the whole study) and one MLflow store; subprocess: each stage "
        "is its own `python -m jobs.<stage>` job (its own imports and Ray start-up: slower, isolated). Either gives "
        "the same results",
    )

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique, repeated: {dup}")
        if self.budget.reference not in names:
            raise ValueError(
                f"budget.reference {self.budget.reference!r} is not a variant: choose one of {names}"
            )
        for where, seeds in [("seeds", self.seeds), *((f"{v.name}.seeds", v.seeds) for v in self.variants)]:
            if seeds is not None and len(set(seeds)) != len(seeds):
                raise ValueError(f"{where} must be distinct, got {seeds}")
        if "kk" not in self.languages and any(v.kk_share is not None for v in self.variants):
            raise ValueError("kk_share needs kk among languages")
        return self


def study_config_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") and p.is_file() else STUDY_DIR / f"{name}.yaml"


def load_study(name: str, overrides: list[str] | None = None) -> StudyConfig:
    path = study_config_path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"unknown tokenizer study {name!r}: choose one of {known} (files in {STUDY_DIR})")
    return load_config(StudyConfig, path, overrides)


def identity(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _Tee(io.TextIOBase):
    """A text stream writing to its current targets (a closed one is skipped: Ray's log monitor may print a late
    worker line while the targets change)."""

    def __init__(self, targets: list[TextIO]):
        self.targets = targets

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        for t in self.targets:
            with contextlib.suppress(ValueError):
                t.write(text)
        return len(text)

    def flush(self) -> None:
        for t in self.targets:
            with contextlib.suppress(ValueError):
                t.flush()

    def isatty(self) -> bool:
        return False


class StageOutput:
    """sys.stdout and sys.stderr while the study runs stages in its process. During a stage both go to the stage's
    log (stdout also to a buffer holding its JSON result line); afterwards they stay on that log until the next
    stage (Ray prints its workers' lines late). They stay the same two stream objects all along, so a handler
    that logging or Ray binds to sys.stderr during one stage never holds a closed file. The study's own progress
    lines go to the console (`console_out`)."""

    def __init__(self) -> None:
        self.saved: tuple[TextIO, TextIO] | None = None
        self.log: TextIO | None = None
        self.out, self.err = _Tee([]), _Tee([])

    @property
    def console_out(self) -> TextIO:
        return self.saved[0] if self.saved else sys.stdout

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self.saved = (sys.stdout, sys.stderr)
        self.out.targets = self.err.targets = [sys.stderr]
        try:
            with contextlib.redirect_stdout(self.out), contextlib.redirect_stderr(self.err):  # type: ignore[type-var]
                yield
        finally:
            self.out.targets = self.err.targets = [self.saved[1]]
            self.close_log()
            self.saved = None

    @contextlib.contextmanager
    def stage(self, log_file: Path, stdout: io.StringIO) -> Iterator[None]:
        self.close_log()
        self.log = log = log_file.open("w", encoding="utf-8")
        self.out.targets, self.err.targets = [log, stdout], [log]
        try:
            yield
        finally:
            self.out.targets = [log]
            log.flush()

    def close_log(self) -> None:
        if self.log is not None:
            log, self.log = self.log, None
            self.out.targets = [t for t in self.out.targets if t is not log]
            self.err.targets = [t for t in self.err.targets if t is not log]
            log.close()


class StageFailed(RuntimeError):
    def __init__(self, stage: str, log: Path, message: str):
        super().__init__(
            f"stage {stage} failed: {message}\n  log: {log}\n  fix the cause and run the study again: finished "
            "variants and stages are not redone"
        )


# ------------------------------------------------------------------ the study


class Study:
    def __init__(self, cfg: StudyConfig, settings: Settings):
        self.cfg, self.settings = cfg, settings
        self.root = settings.home / "tokenizer_study" / cfg.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "state.json"
        self.stage_seconds: dict[str, float] = {}  # wall time of each stage of the variant being run
        self.output = StageOutput()
        self.sigterm = SigtermToStage()
        # what carries on after a preemption; main sets the invocation's own
        self.resume_command = f"python -m pipelines.tokenizer_study --config {cfg.name}"
        self.state: dict[str, Any] = (
            json.loads(self.state_file.read_text()) if self.state_file.is_file() else {"variants": {}}
        )
        self.stage_files = {
            s: stage_config_path(s, getattr(cfg, s).config)
            for s in ("tokenizer", "preprocess", "pretrain", "eval")
        }
        self.tok_cfg, self.pre_cfg, self.pt_cfg, self.eval_cfg = self.validate_stage_configs()

    # -------------------------------------------------------------- validation, before any work
    def validate_stage_configs(
        self,
    ) -> tuple[TokenizerJobConfig, PreprocessConfig, PretrainConfig, EvalConfig]:
        """Every stage config with the study's overrides (and one variant's), so a bad key fails now."""
        c = self.cfg
        tok = load_config(TokenizerJobConfig, self.stage_files["tokenizer"], c.tokenizer.overrides)
        for v in c.variants:
            if v.kind == "bpe":
                load_config(
                    TokenizerJobConfig, self.stage_files["tokenizer"], self.tokenizer_overrides(v, tok)
                )
        pre = load_config(PreprocessConfig, self.stage_files["preprocess"], c.preprocess.overrides)
        missing = sorted(set(c.languages) - set(pre.languages))
        if missing:
            raise ValueError(
                f"languages {missing} are not in the preprocess config's languages {pre.languages}"
            )
        pt = load_config(PretrainConfig, self.stage_files["pretrain"], c.pretrain.overrides)
        if pt.init is not None:
            raise ValueError("the study trains from scratch: the pretrain config must not set init")
        ev = load_config(EvalConfig, self.stage_files["eval"], c.eval.overrides)
        by_name = {t.name: t for t in ev.text}
        for es in by_name.values():
            lacking = sorted(set(c.languages) - set(es.files))
            if lacking:
                raise ValueError(
                    f"eval text set {es.name!r} has no files for {lacking}: add them or drop languages"
                )
        if not by_name:
            raise ValueError("the eval config has no text sets: bits-per-byte needs FLORES-200 / NTREX text")
        if not ev.generation.enabled:
            raise ValueError("the eval config's generation is off: the study measures generation bytes/s")
        return tok, pre, pt, ev

    def tokenizer_overrides(self, v: Variant, tok: TokenizerJobConfig | None = None) -> list[str]:
        out = [*self.cfg.tokenizer.overrides, f"name=tokstudy-{self.cfg.name}-{v.name}"]
        out.append(f"tokenizer.vocab_size={v.vocab_size}")
        if v.kk_share is not None:
            budgets = (tok or self.tok_cfg).data.budgets
            if any(b is None for b in budgets.values()):
                raise ValueError("kk_share needs character budgets in the tokenizer config (not null)")
            total = sum(b for b in budgets.values() if b is not None)
            others = [lang for lang in budgets if lang != "kk"]
            shares = {"kk": v.kk_share, **{lang: (1 - v.kk_share) / len(others) for lang in others}}
            out.append(
                "data.budgets={" + ", ".join(f"{k}: {round(total * s)}" for k, s in shares.items()) + "}"
            )
        return out

    def natural_kk_share(self) -> float | None:
        budgets = self.tok_cfg.data.budgets
        if "kk" not in budgets or any(b is None for b in budgets.values()):
            return None
        return budgets["kk"] / sum(b for b in budgets.values() if b is not None)

    # -------------------------------------------------------------- one job
    def run_stage(
        self, stage: str, variant: str, args: list[str], parent_run_id: str, tag: str = ""
    ) -> tuple[StageResult, Path]:
        logs = self.root / "logs" / variant
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"{stage}{tag}.log"
        argv = ["--config", str(self.stage_files[stage]), *args]
        if self.sigterm.requested:
            raise StagePreempted(f"{stage}{tag}", None, None, self.resume_command)
        started = time.perf_counter()
        if self.cfg.run_stages == "subprocess":
            code, stdout = self.run_subprocess(stage, argv, parent_run_id, log_file)
        else:
            code, stdout = self.run_in_process(stage, argv, parent_run_id, log_file)
        elapsed = time.perf_counter() - started
        raw = result_from_output(stdout)
        if stage_was_preempted(code, raw) or (code != 0 and self.sigterm.requested):
            self.say(f"    {variant:<14} {stage + tag:<22} preempted")
            raise StagePreempted(f"{stage}{tag}", log_file, raw or {}, self.resume_command)
        if code != 0 or raw is None or raw.get("status") != "ok":
            raise StageFailed(stage, log_file, (raw or {}).get("error") or f"exit code {code}")
        try:
            result = read_result(stage, stdout)
        except ResultError as exc:
            raise StageFailed(stage, log_file, str(exc)) from None
        result_file = self.root / "results" / variant / f"{stage}{tag}.json"
        atomic_write_json(result_file, result.model_dump(mode="json"))
        word = "cached" if result.reused else f"{elapsed:.0f}s"
        self.say(f"    {variant:<14} {stage + tag:<22} {word}")
        self.stage_seconds[f"{stage}{tag}"] = elapsed
        return result, result_file

    def run_subprocess(
        self, stage: str, argv: list[str], parent_run_id: str, log_file: Path
    ) -> tuple[int, str]:
        """The stage as its own job: `python -m jobs.<stage>` (its own Ray connection and imports)."""
        env = {**os.environ, "TULPAR_PARENT_RUN_ID": parent_run_id, "PYTHONUNBUFFERED": "1"}
        with log_file.open("w") as log:
            cmd = [sys.executable, "-m", f"jobs.{stage}", *argv]
            child = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
            )
            with self.sigterm.running(child):
                stdout, _ = child.communicate()
            log.write(stdout)
        return child.returncode, stdout

    def run_in_process(
        self, stage: str, argv: list[str], parent_run_id: str, log_file: Path
    ) -> tuple[int, str]:
        """The stage's own entry (`run_job` with the job's config class and main, as `python -m jobs.<stage>`
        calls it) in this process, on the study's Ray connection and MLflow store; its stdout and stderr go to
        its log, its stdout also to the returned text (the JSON result line)."""
        module = importlib.import_module(f"jobs.{stage}")
        saved = os.environ.get("TULPAR_PARENT_RUN_ID")
        os.environ["TULPAR_PARENT_RUN_ID"] = parent_run_id
        stdout = io.StringIO()
        try:
            with self.output.stage(log_file, stdout):
                code = run_job(stage, STAGE_CONFIGS[stage], module.main, argv)
        finally:
            if saved is None:
                os.environ.pop("TULPAR_PARENT_RUN_ID", None)
            else:
                os.environ["TULPAR_PARENT_RUN_ID"] = saved
        return code, stdout.getvalue()

    # -------------------------------------------------------------- tokenizers
    def reference_dir(self, ref: str) -> Path:
        """The reference tokenizer as it is, plus Tulpar's special tokens appended as added tokens where it lacks
        them (Llama 3, Gemma 3): documents end with <|endoftext|> in the token shards. The added tokens take new
        ids after the vocabulary, so every ordinary text encodes to the same ids as with the original."""
        src = self.settings.require_data("tokenizers", ref)
        out = self.root / "reference_tokenizers" / ref
        if (out / "tokenizer.json").is_file():
            return out
        from tokenizers import Tokenizer as HFTokenizer

        tk = HFTokenizer.from_file(str(src / "tokenizer.json"))
        missing = [t for t in SPECIAL_TOKENS if tk.token_to_id(t) is None]
        if missing:
            tk.add_special_tokens(missing)
        Tokenizer(tk).save(out)
        return out

    # -------------------------------------------------------------- eval text
    def eval_text(self) -> tuple[list[EvalText], dict[str, dict[str, dict[str, Any]]]]:
        """The documents jobs.eval scores (same files, unit and max_docs), as EvalText per set for the tokenizer
        figures; and their description (docs, bytes, sha256) for the report."""
        from jobs.evaluation.text import documents_sha256

        texts, described = [], {}
        for spec in self.eval_cfg.text:
            lines, desc = {}, {}
            for lang in self.cfg.languages:
                path = resolve_path(spec.files[lang], self.settings)
                docs = read_documents(path, spec.unit, spec.text_field, spec.max_docs)
                lines[lang] = docs
                desc[lang] = {
                    "file": str(path),
                    "docs": len(docs),
                    "bytes": sum(len(d.encode("utf-8")) for d in docs),
                    "text_sha256": documents_sha256(docs),
                }
            texts.append(EvalText(spec.name, lines, parallel=False))
            described[spec.name] = desc
        return texts, described

    def tokenizer_figures(self, v: Variant, tok_dir: Path, texts: list[EvalText]) -> dict[str, Any]:
        tk = LoadedTokenizer(v.name, Tokenizer.from_dir(tok_dir).tk, str(tok_dir))
        per_lang: dict[str, dict[str, int]] = {}
        for text in texts:
            for lang in self.cfg.languages:
                m = measure(tk, text, lang)
                acc = per_lang.setdefault(lang, {"tokens": 0, "bytes": 0, "words": 0})
                acc["tokens"] += m.tokens
                acc["bytes"] += m.bytes
                acc["words"] += m.words
        model = self.pt_cfg.with_vocabulary(tk.vocab_size).model
        total = model.num_params()
        embedding = total - model.num_params(include_embeddings=False)
        return {
            "kind": v.kind,
            "reference": v.reference,
            "vocab_size": tk.vocab_size,
            "kk_share": v.kk_share
            if v.kind == "bpe" and v.kk_share is not None
            else (self.natural_kk_share() if v.kind == "bpe" else None),
            "tokens_per_byte": {lang: a["tokens"] / a["bytes"] for lang, a in per_lang.items()},
            "fertility": {lang: a["tokens"] / a["words"] for lang, a in per_lang.items()},
            "parameters": total,
            "embedding_parameters": embedding,
            "embedding_share": embedding / total,
        }

    def seeds(self, v: Variant) -> list[int]:
        return v.seeds if v.seeds is not None else self.cfg.seeds

    # -------------------------------------------------------------- budgets
    def tokens_per_step(self) -> int:
        t, workers = self.pt_cfg.train, self.pt_cfg.ray.num_workers
        return t.batch_size * t.seq_len * t.accum_steps(workers) * workers

    def flops_per_token(self, vocab_size: int) -> float:
        return self.pt_cfg.with_vocabulary(vocab_size).model.flops_per_token(self.pt_cfg.train.seq_len)

    def steps_for(self, budget: str, vocab_size: int, bytes_per_token: float, ref: dict[str, float]) -> int:
        """Optimizer steps of this variant that spend the budget: the reference's FLOPs (FLOPs per token scale
        with the vocabulary through the head) or the reference's bytes of text (bytes per token: the tokenizer's
        compression of the training data)."""
        if budget == "flops":
            steps = self.cfg.budget.steps * ref["flops_per_token"] / self.flops_per_token(vocab_size)
        else:
            steps = self.cfg.budget.steps * ref["bytes_per_token"] / bytes_per_token
        return max(1, round(steps))

    # -------------------------------------------------------------- one variant
    def variant_key(self, v: Variant) -> str:
        stage_files = {s: Path(p).read_text(encoding="utf-8") for s, p in self.stage_files.items()}
        c = self.cfg
        return identity(
            {
                "variant": v.model_dump(),
                "budget": c.budget.model_dump(),
                "seeds": self.seeds(v),
                "languages": c.languages,
                "stages": {s: getattr(c, s).model_dump() for s in stage_files},
                "stage_files": stage_files,
            }
        )

    def run_variant(
        self, v: Variant, texts: list[EvalText], ref: dict[str, float] | None, parent: str
    ) -> dict:
        from mlflow.entities import Metric, Param

        tags = {
            "tulpar.stage": "tokenizer_study_variant",
            "tulpar.variant": v.name,
            "mlflow.parentRunId": parent,
        }
        with self.mlflow_run(run_name=f"{self.cfg.name}/{v.name}", tags=tags) as child:
            self.stage_seconds = {}
            params = [Param(k, str(val)) for k, val in v.model_dump().items()]
            self.client.log_batch(child, params=params)
            if v.kind == "bpe":
                tok_args = self.tokenizer_overrides(v)
                _, tok_file = self.run_stage("tokenizer", v.name, tok_args, child)
                pre_inputs = ["--input", f"tokenizer={tok_file}"]
                tok_dir = Path(json.loads(tok_file.read_text())["outputs"]["tokenizer_dir"])
            else:
                tok_dir = self.reference_dir(str(v.reference))
                pre_inputs = [f"tokenizer.path={tok_dir}"]
            pre_args = [
                *pre_inputs,
                *self.cfg.preprocess.overrides,
                f"name=tokstudy-{self.cfg.name}-{v.name}",
            ]
            pre, pre_file = self.run_stage("preprocess", v.name, pre_args, child)
            from llm_core.shards import TokenDataset

            dataset = TokenDataset.open(pre.outputs.dataset_dir)  # type: ignore[attr-defined]
            bytes_per_token = dataset.bytes_per_token("train")
            figures = self.tokenizer_figures(v, tok_dir, texts)
            figures["train_bytes_per_token"] = bytes_per_token
            figures["flops_per_token"] = self.flops_per_token(figures["vocab_size"])
            if ref is None:  # this is the reference variant
                ref = {"flops_per_token": figures["flops_per_token"], "bytes_per_token": bytes_per_token}
            runs = []
            for seed in self.seeds(v):
                for budget in self.cfg.budget.kinds:
                    steps = self.steps_for(budget, figures["vocab_size"], bytes_per_token, ref)
                    runs.append(self.train_and_eval(v, budget, seed, steps, pre_file, figures, child))
            summary = {
                "name": v.name,
                "key": self.variant_key(v),
                "tokenizer": figures,
                "reference_costs": ref,
                "runs": runs,
                "stage_seconds": self.stage_seconds,
                "mlflow_run_id": child,
            }
            metrics = {f"tokens_per_byte/{k}": x for k, x in figures["tokens_per_byte"].items()}
            metrics |= {f"fertility/{k}": x for k, x in figures["fertility"].items()}
            metrics["embedding_share"] = figures["embedding_share"]
            for r in runs:
                for es, per_lang in r["bpb"].items():
                    for lang, x in per_lang.items():
                        metrics[f"bpb/{r['budget']}/s{r['seed']}/{es}/{lang}"] = x
            now = int(time.time() * 1000)
            self.client.log_batch(child, metrics=[Metric(k, x, now, 0) for k, x in metrics.items()])
            self.client.log_dict(child, summary, "variant.json")
        return summary

    def train_and_eval(
        self, v: Variant, budget: str, seed: int, steps: int, dataset_file: Path, figures: dict, parent: str
    ) -> dict:
        tag = f"-{budget}-s{seed}"
        name = f"tokstudy-{self.cfg.name}-{v.name}"
        pt_args = [
            "--input",
            f"dataset={dataset_file}",
            *self.cfg.pretrain.overrides,
            f"name={name}",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.log_every={max(1, min(self.pt_cfg.train.log_every, steps // 4 or 1))}",
            f"train.warmup_steps={min(self.pt_cfg.train.warmup_steps, max(0, steps // 5))}",
            f"train.seed={seed}",
        ]
        pt, pt_file = self.run_stage("pretrain", v.name, pt_args, parent, tag)
        ev, _ = self.run_stage(
            "eval", v.name, ["--input", f"model={pt_file}", *self.cfg.eval.overrides], parent, tag
        )
        results = json.loads(Path(ev.outputs.results).read_text(encoding="utf-8"))  # type: ignore[attr-defined]
        bpb: dict[str, dict[str, float]] = {}
        eval_text: dict[str, dict[str, Any]] = {}
        for t in results["text"]:
            bpb.setdefault(t["set"], {})[t["language"]] = t["bpb"]
            eval_text.setdefault(t["set"], {})[t["language"]] = {
                k: t[k] for k in ("file", "docs", "bytes", "text_sha256")
            }
        m = results["metrics"]
        langs = self.cfg.languages
        tokens_per_s = self.training_tokens_per_s(pt.mlflow_run_id)
        return {
            "budget": budget,
            "seed": seed,
            "steps": steps,
            "training_tokens": steps * self.tokens_per_step(),
            "training_bytes": steps * self.tokens_per_step() * figures["train_bytes_per_token"],
            "training_flops": steps * self.tokens_per_step() * figures["flops_per_token"],
            "model_uri": pt.outputs.model_uri,  # type: ignore[attr-defined]
            "bpb": bpb,
            "eval_text": eval_text,
            "training_tokens_per_s": tokens_per_s,
            "training_bytes_per_s": None
            if tokens_per_s is None
            else tokens_per_s * figures["train_bytes_per_token"],
            "generation_bytes_per_s": {lang: m.get(f"gen/{lang}/bytes_per_s") for lang in langs},
            "generation_tokens_per_s": {lang: m.get(f"gen/{lang}/tokens_per_s") for lang in langs},
            "pretrain_run_id": pt.mlflow_run_id,
            "eval_run_id": ev.mlflow_run_id,
        }

    def training_tokens_per_s(self, run_id: str | None) -> float | None:
        """The median of the trainer's logged tokens/s, leaving out the first window (start-up) when there are
        others."""
        if run_id is None:
            return None
        values = [
            h["tokens_per_s"]
            for h in tracking.metric_history(run_id, ["tokens_per_s"])
            if "tokens_per_s" in h
        ]
        if len(values) > 1:
            values = values[1:]
        return statistics.median(values) if values else None

    # -------------------------------------------------------------- the whole study
    def finished(self, v: Variant) -> dict | None:
        """The stored summary of a variant whose child run finished with the same identity, else None."""
        entry = self.state["variants"].get(v.name)
        if not entry or entry.get("key") != self.variant_key(v):
            return None
        summary_file = Path(entry["summary"])
        if not summary_file.is_file():
            return None
        from mlflow import MlflowClient

        run = tracking.get_run_or_none(MlflowClient(), entry["mlflow_run_id"])
        if run is None:  # the run was deleted or the store replaced: redo the variant
            return None
        return json.loads(summary_file.read_text()) if run.info.status == "FINISHED" else None

    def save_state(self) -> None:
        atomic_write_json(self.state_file, self.state)

    def ordered_variants(self) -> list[Variant]:
        """The budget's reference variant first: the others' steps are derived from its costs."""
        ref = self.cfg.budget.reference
        return sorted(self.cfg.variants, key=lambda v: v.name != ref)

    @contextlib.contextmanager
    def mlflow_run(self, run_id: str | None = None, **create: Any) -> Iterator[str]:
        """A study or variant run, resumed (`run_id`) or created (`create`: run_name, tags), ended FINISHED, or
        FAILED / KILLED when the body raises. Held by id, never as MLflow's active run: the stages start their own
        runs (in this process too) under it through TULPAR_PARENT_RUN_ID."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id, **create).info.run_id
        try:
            yield run_id
        except (KeyboardInterrupt, StagePreempted):
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def say(self, line: str) -> None:
        """A progress line on the study's own stdout (stages' output goes to their logs)."""
        print(line, file=self.output.console_out, flush=True)

    def run(self) -> dict[str, Any]:
        """Every variant (finished ones from their stored summaries), then the report. In-process stages share
        one Ray connection: RAY_ADDRESS's cluster, or a local Ray started here once (and stopped at the end)."""
        from mlflow import MlflowClient

        self.experiment_id = tracking.setup(self.settings, "tulpar-tokenizer")
        tracking.check_server(self.settings)
        self.client = MlflowClient()
        texts, eval_text = self.eval_text()
        # SIGTERM: the running stage checkpoints and stops, no later one starts
        with self.sigterm.installed():
            if self.cfg.run_stages == "subprocess":
                return self.run_variants(texts, eval_text)
            import ray

            from jobs.platform.raycluster import init_ray

            with self.output.installed():
                started_ray = not ray.is_initialized()
                init_ray(self.settings)
                try:
                    return self.run_variants(texts, eval_text)
                finally:
                    if started_ray:
                        ray.shutdown()

    def run_variants(self, texts: list[EvalText], eval_text: dict) -> dict[str, Any]:
        parent_id = self.state.get("parent_run_id")
        if parent_id and tracking.get_run_or_none(self.client, parent_id) is None:
            parent_id = None  # the parent run was deleted or the store replaced: a new parent
        create = {
            "run_name": f"tokenizer-study-{self.cfg.name}",
            "tags": {"tulpar.stage": "tokenizer_study", "tulpar.git_commit": tracking.git_commit()},
        }
        summaries: list[dict] = []
        with self.mlflow_run(parent_id, **({} if parent_id else create)) as parent:
            self.state["parent_run_id"] = parent
            self.save_state()
            self.client.log_dict(parent, self.cfg.model_dump(mode="json"), "study.yaml")
            ref_costs: dict[str, float] | None = None
            for i, v in enumerate(self.ordered_variants(), 1):
                done = self.finished(v)
                label = f"[{i}/{len(self.cfg.variants)}] {v.name}"
                if done is not None:
                    self.say(f"{label}: finished in an earlier run (MLflow run {done['mlflow_run_id']})")
                    summary = done
                else:
                    self.say(f"{label}: {v.kind} {v.reference or f'vocab {v.vocab_size}'}")
                    started = time.perf_counter()
                    summary = self.run_variant(v, texts, ref_costs, parent)
                    summary["seconds"] = time.perf_counter() - started
                    file = self.root / "variants" / f"{v.name}.json"
                    atomic_write_json(file, summary)
                    self.state["variants"][v.name] = {
                        "key": summary["key"],
                        "mlflow_run_id": summary["mlflow_run_id"],
                        "summary": str(file),
                    }
                    self.save_state()
                if ref_costs is None:
                    ref_costs = summary["reference_costs"]
                summaries.append(summary)
            check_same_eval_text(summaries, eval_text)
            order = {v.name: i for i, v in enumerate(self.cfg.variants)}
            summaries.sort(key=lambda s: order[s["name"]])
            outputs = self.write_report(summaries, eval_text, ref_costs or {})
            for path in [
                outputs["report"],
                outputs["results_json"],
                outputs["results_csv"],
                *outputs["plots"].values(),
            ]:
                self.client.log_artifact(parent, path, "report")
        return {**outputs, "mlflow_run_id": parent}

    # -------------------------------------------------------------- report
    def study_facts(self, eval_text: dict, ref_costs: dict[str, float]) -> dict[str, Any]:
        c = self.cfg
        model = self.pt_cfg.with_vocabulary(1024).model
        bpe = [v for v in c.variants if v.kind == "bpe"]
        natural = [v.name for v in bpe if v.kk_share is None]
        explicit = [v for v in bpe if v.kk_share is not None]
        fixed_vocab = explicit[0].vocab_size if explicit else None
        share_sweep = [v.name for v in bpe if fixed_vocab is not None and v.vocab_size == fixed_vocab]
        tps = self.tokens_per_step()
        return {
            "name": c.name,
            "description": c.description,
            "languages": c.languages,
            "eval_sets": [t.name for t in self.eval_cfg.text],
            "budgets": list(c.budget.kinds),
            "seeds": sorted({s for v in c.variants for s in self.seeds(v)}),
            "model": {"name": model.name, "dim": model.dim, "num_layers": model.num_layers},
            "reference": c.budget.reference,
            "reference_steps": c.budget.steps,
            "tokens_per_step": tps,
            "budget_flops": c.budget.steps * tps * ref_costs.get("flops_per_token", float("nan")),
            "budget_bytes": c.budget.steps * tps * ref_costs.get("bytes_per_token", float("nan")),
            "eval_text": eval_text,
            "sweeps": {"vocab_size": natural, "kk_share": share_sweep},
        }

    def write_report(
        self, summaries: list[dict], eval_text: dict, ref_costs: dict[str, float]
    ) -> dict[str, Any]:
        study = self.study_facts(eval_text, ref_costs)
        plots = write_plots(summaries, study, self.root)
        report = self.root / "report.md"
        atomic_write_text(report, render_markdown(study, summaries, plots))
        results_json = self.root / "results.json"
        atomic_write_json(results_json, {"study": study, "variants": summaries})
        results_csv = self.root / "results.csv"
        atomic_write_text(results_csv, results_table(summaries, study))
        return {
            "report": str(report),
            "results_json": str(results_json),
            "results_csv": str(results_csv),
            "plots": plots,
        }


def check_same_eval_text(summaries: list[dict], expected: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Every variant's bpb must come from the documents the study measured its tokenizers on (same sha256);
    anything else would compare models on different text."""
    for s in summaries:
        for r in s["runs"]:
            for es, per_lang in expected.items():
                for lang, want in per_lang.items():
                    got = r["eval_text"].get(es, {}).get(lang)
                    if got is None or got["text_sha256"] != want["text_sha256"]:
                        raise RuntimeError(
                            f"variant {s['name']} ({r['budget']}, seed {r['seed']}) was evaluated on other "
                            f"{es}/{lang} text than the study's ({got} != {want}): re-run it"
                        )


def results_table(summaries: list[dict], study: dict) -> str:
    """One CSV row per variant x budget x seed x eval set x language."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "variant",
            "kind",
            "vocab_size",
            "kk_share",
            "embedding_share",
            "budget",
            "seed",
            "steps",
            "training_bytes",
            "eval_set",
            "language",
            "bpb",
            "tokens_per_byte",
            "fertility",
            "training_bytes_per_s",
            "generation_bytes_per_s",
        ]
    )
    for s in summaries:
        tok = s["tokenizer"]
        for r in s["runs"]:
            for es in study["eval_sets"]:
                for lang in study["languages"]:
                    w.writerow(
                        [
                            s["name"],
                            tok["kind"],
                            tok["vocab_size"],
                            tok["kk_share"],
                            f"{tok['embedding_share']:.6f}",
                            r["budget"],
                            r["seed"],
                            r["steps"],
                            f"{r['training_bytes']:.0f}",
                            es,
                            lang,
                            f"{r['bpb'][es][lang]:.6f}",
                            f"{tok['tokens_per_byte'][lang]:.6f}",
                            f"{tok['fertility'][lang]:.6f}",
                            r["training_bytes_per_s"],
                            r["generation_bytes_per_s"].get(lang),
                        ]
                    )
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.tokenizer_study", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", "-c", default="tiny", help="configs/tokenizer_study/<name>.yaml, or a path"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the study config")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        cfg = load_study(args.config, args.overrides)
        study = Study(cfg, Settings.from_env())
        study.resume_command = shlex.join(
            [sys.executable, "-m", "pipelines.tokenizer_study", *(sys.argv[1:] if argv is None else argv)]
        )
        outputs = study.run()
    except StagePreempted as exc:
        print(f"\n{exc}", file=sys.stderr)
        print(json.dumps({**exc.record(), "stage": "tokenizer_study"}, ensure_ascii=False))
        return EXIT_PREEMPTED
    except StageFailed as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        print(json.dumps({"stage": "tokenizer_study", "status": "error", "error": str(exc)}))
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"stage": "tokenizer_study", "status": "error", "error": str(exc)}))
        return EXIT_USER_ERROR
    seconds = time.perf_counter() - started
    disconnect_ray()  # Ray's late worker lines must not follow the result line
    print(f"\nreport: {outputs['report']}\ntotal: {seconds:.0f}s", flush=True)
    result = {
        "stage": "tokenizer_study",
        "status": "ok",
        "outputs": {k: v for k, v in outputs.items() if k != "mlflow_run_id"},
        "metrics": {"seconds": seconds},
        "mlflow_run_id": outputs["mlflow_run_id"],
    }
    atomic_write_json(study.root / "result.json", result)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

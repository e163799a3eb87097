"""The tokenizer study (pipelines.tokenizer_study): budgets against hand computation, seed statistics and ties,
config errors, reference tokenizers used as they are, and the tiny study end to end (report structure, the same
eval text for every variant, one MLflow child run per variant, resume)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.platform.runtime import Settings
from pipelines.tokenizer_study import Study, StudyConfig, check_same_eval_text, load_study, main
from pipelines.tokenizer_study_report import Stat, compare
from tests.conftest import REPO
from tests.stack import job_env

TINY = REPO / "configs" / "tokenizer_study" / "tiny.yaml"


@pytest.fixture
def tiny_study(tulpar_home) -> Study:
    return Study(load_study("tiny"), Settings.from_env())


# ------------------------------------------------------------------ budgets, statistics, config


def test_budget_steps_match_hand_computation(tiny_study):
    # the study's model (dim 64, 2 layers, 2 heads of 32, 1 kv head, ffn 192, tied embeddings), seq_len 128:
    # non-embedding params per layer = q,o 2*64*64 + k,v 2*64*32 + mlp 3*64*192 + 2 norms*64 = 49,280
    body = 2 * 49_280 + 64
    attention = 12 * 2 * 64 * 128
    flops = {v: 6 * (body + v * 64) + attention for v in (1024, 2048)}  # both are multiples of 64: no padding
    assert tiny_study.flops_per_token(1024) == flops[1024] == 1_181_568
    assert tiny_study.tokens_per_step() == 4 * 128  # batch 4 x seq 128, one worker, no accumulation
    ref = {"flops_per_token": flops[2048], "bytes_per_token": 3.0}
    # same FLOPs: 20 reference steps x 1,574,784 / 1,181,568 FLOPs per token = 26.66 -> 27 steps
    assert tiny_study.steps_for("flops", 1024, 2.5, ref) == round(20 * flops[2048] / flops[1024]) == 27
    # same bytes: 20 x 3.0 / 2.5 bytes per token = 24 steps; the reference itself: 20 under both
    assert tiny_study.steps_for("bytes", 1024, 2.5, ref) == 24
    assert (
        tiny_study.steps_for("flops", 2048, 3.0, ref) == tiny_study.steps_for("bytes", 2048, 3.0, ref) == 20
    )


def test_kk_share_splits_the_tokenizer_configs_characters(tiny_study):
    kk60 = next(v for v in tiny_study.cfg.variants if v.name == "bpe-2k-kk60")
    overrides = tiny_study.tokenizer_overrides(kk60)
    # tiny tokenizer: 200k characters per language = 600k in all; 60% Kazakh, the rest split evenly
    assert "data.budgets={kk: 360000, ru: 120000, en: 120000}" in overrides
    assert "tokenizer.vocab_size=2048" in overrides
    assert tiny_study.natural_kk_share() == pytest.approx(1 / 3)


def test_seed_statistics_and_ties():
    two = Stat([1.0, 1.2])
    assert two.mean == pytest.approx(1.1)
    assert two.spread == pytest.approx(0.2)
    # t(0.975, 1 df) = 12.706; sample sd of (1.0, 1.2) = 0.1414; / sqrt(2)
    assert two.ci95 == pytest.approx(12.706 * 0.2 / 2**0.5 / 2**0.5)
    assert compare(Stat([1.25, 1.3]), two) == "tie"  # 0.175 apart, spread 0.2
    assert compare(Stat([1.5, 1.55]), two) == "higher"  # 0.425 apart
    assert compare(Stat([0.7, 0.75]), two) == "lower"
    one = Stat([1.0])
    assert one.ci95 is None and one.spread is None
    assert compare(one, Stat([5.0])) == "untested", "one seed has no spread: no difference may be called"


def study_dict(**changes) -> dict:
    data = yaml.safe_load(TINY.read_text())
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"variants": [{"name": "a", "vocab_size": 1024}, {"name": "a", "vocab_size": 2048}]}, "unique"),
        ({"budget": {"reference": "nope", "steps": 10}}, "budget.reference 'nope' is not a variant"),
        (
            {
                "variants": [
                    {"name": "a", "vocab_size": 1024, "reference": "qwen3"},
                    {"name": "b", "vocab_size": 8},
                ]
            },
            "give vocab_size",
        ),
        (
            {"variants": [{"name": "q", "reference": "qwen3", "kk_share": 0.5}, {"name": "b"}]},
            "kk_share applies",
        ),
    ],
)
def test_bad_study_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.model_validate(study_dict(**changes))


def test_cli_exits_2_without_a_traceback_on_a_bad_stage_override(tulpar_home, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    data = study_dict()
    data["pretrain"]["overrides"] = ["train.stepz=3"]
    path.write_text(yaml.safe_dump(data))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "Traceback" not in err
    assert not (tulpar_home / "tokenizer_study" / "tiny" / "logs").exists(), "no stage may start"


def test_a_reference_tokenizer_is_used_as_it_is(tiny_study, data_dir):
    from tokenizers import Tokenizer as HFTokenizer

    from llm_core.tokenizer import SPECIAL_TOKENS, Tokenizer

    original = HFTokenizer.from_file(str(data_dir / "tokenizers" / "llama3" / "tokenizer.json"))
    prepared = Tokenizer.from_dir(tiny_study.reference_dir("llama3"))  # raises without Tulpar's specials
    assert prepared.tk.get_vocab_size() == original.get_vocab_size() + len(SPECIAL_TOKENS)
    lines = (
        (data_dir / "eval" / "parallel" / "flores200_devtest" / "kaz_Cyrl.devtest").read_text().splitlines()
    )
    lines = lines[:50] + ["Hello, world! 12345", "Привет, мир!"]
    theirs = [e.ids for e in original.encode_batch(lines, add_special_tokens=False)]
    assert prepared.encode_batch(lines) == theirs
    assert prepared.eos_id >= original.get_vocab_size()


def synthetic_summary(name: str, vocab: int, kk_bpb: list[float]) -> dict:
    runs = [
        {
            "budget": "flops",
            "seed": seed,
            "steps": 10,
            "training_bytes": 1000.0,
            "bpb": {"flores": {"kk": x}},
            "training_bytes_per_s": 100.0 + seed,
            "generation_bytes_per_s": {"kk": 50.0},
            "generation_tokens_per_s": {"kk": 20.0},
        }
        for seed, x in enumerate(kk_bpb)
    ]
    tok = {
        "kind": "bpe",
        "vocab_size": vocab,
        "kk_share": 1 / 3,
        "embedding_share": 0.25,
        "tokens_per_byte": {"kk": 0.3},
        "fertility": {"kk": 2.0},
    }
    return {"name": name, "tokenizer": tok, "runs": runs}


def test_report_calls_ties_within_the_seed_spread_and_gives_intervals(tmp_path):
    from pipelines.tokenizer_study_report import render_markdown, write_plots

    study = {
        "name": "t",
        "languages": ["kk"],
        "eval_sets": ["flores"],
        "budgets": ["flops"],
        "model": {"name": "tiny", "dim": 128, "num_layers": 4},
        "reference": "a",
        "reference_steps": 10,
        "tokens_per_step": 100,
        "budget_flops": 1e9,
        "budget_bytes": 1e4,
        "eval_text": {"flores": {"kk": {"docs": 3, "bytes": 99, "text_sha256": "c" * 64}}},
        "sweeps": {"vocab_size": ["a", "b", "c"], "kk_share": []},
    }
    summaries = [
        synthetic_summary("a", 1024, [2.00, 2.10]),  # best: mean 2.05, spread 0.10
        synthetic_summary("b", 2048, [2.08, 2.12]),  # +0.05: within the spread 0.10 -> tie
        synthetic_summary("c", 4096, [2.40, 2.42]),  # +0.36 -> worse
    ]
    plots = write_plots(summaries, study, tmp_path)
    assert set(plots) == {"bpb vs vocabulary size", "generation bytes/s vs tokens per byte"}
    report = render_markdown(study, summaries, plots)
    assert "- flores kk: **a** 2.050 ± 0.635; b +0.050 (tie), c +0.360 (worse)" in report
    # 95% CI of (2.00, 2.10): 12.706 x 0.0707 / sqrt(2) = 0.635
    assert "| a | 10 | 1,000 | 2.050 ± 0.635 |" in report
    assert "Seeds per variant: 2-2" in report
    # generation: measured 50 bytes/s, 20 tokens/s; at the eval text's 0.3 tokens per byte 20 / 0.3 = 67 bytes/s
    assert "| 50 ± 0 | 20 ± 0 | 67 |" in report


def test_bpb_from_other_eval_text_is_refused():
    text = {"flores": {"kk": {"text_sha256": "a" * 64}}}
    ok = [{"name": "v", "runs": [{"budget": "flops", "seed": 0, "eval_text": text}]}]
    check_same_eval_text(ok, text)
    other = {"flores": {"kk": {"text_sha256": "b" * 64}}}
    bad = [{"name": "v", "runs": [{"budget": "flops", "seed": 0, "eval_text": other}]}]
    with pytest.raises(RuntimeError, match="other flores/kk text"):
        check_same_eval_text(bad, text)


def test_a_stage_in_process_gives_what_its_own_job_gives(tmp_path, monkeypatch, capsys):
    """The tokenizer stage of the 1k variant run by its entry in this process (the default) and as its own
    `python -m jobs.tokenizer` job, each into a fresh TULPAR_HOME: the same tokenizer, byte for byte; the stage's
    output in its log, not on the study's stdout; TULPAR_PARENT_RUN_ID as it was before."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TULPAR_PARENT_RUN_ID", raising=False)
    shas = {}
    for mode in ("in_process", "subprocess"):
        monkeypatch.setenv("TULPAR_HOME", str(tmp_path / mode))
        study = Study(load_study("tiny", [f"run_stages={mode}"]), Settings.from_env())
        v = next(v for v in study.cfg.variants if v.name == "bpe-1k")
        with study.output.installed():
            result, result_file = study.run_stage("tokenizer", v.name, study.tokenizer_overrides(v), "p" * 32)
        assert not result.reused
        assert json.loads(result_file.read_text())["outputs"] == result.outputs.model_dump(mode="json")
        log = (study.root / "logs" / "bpe-1k" / "tokenizer.log").read_text()
        assert "trained tokstudy-tiny-bpe-1k: 1,024 tokens" in log and '"stage": "tokenizer"' in log
        shas[mode] = result.outputs.tokenizer_sha256  # type: ignore[attr-defined]
        assert Path(result.outputs.tokenizer_json).parent.parent == tmp_path / mode / "tokenizers"  # type: ignore[attr-defined]
    assert "TULPAR_PARENT_RUN_ID" not in os.environ
    out = capsys.readouterr().out
    assert "trained tokstudy" not in out and out.count("bpe-1k         tokenizer") == 2
    assert shas["in_process"] == shas["subprocess"]


# ------------------------------------------------------------------ the tiny study end to end


def run_study(home: Path, data_dir: Path) -> subprocess.CompletedProcess:
    env = job_env(home, data_dir)
    cmd = [sys.executable, "-m", "pipelines.tokenizer_study", "--config", "tiny"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def first_docs_sha256(path: Path, n: int) -> str:
    """By hand: the first n non-blank lines, each followed by a NUL byte."""
    lines = [x for x in path.read_text(encoding="utf-8").split("\n") if x.strip()][:n]
    return hashlib.sha256(b"".join(x.removesuffix("\r").encode() + b"\0" for x in lines)).hexdigest()


@pytest.mark.slow
def test_tiny_study_end_to_end_report_same_eval_text_mlflow_and_resume(tmp_path, data_dir):
    home = tmp_path / "home"
    started = time.perf_counter()
    first = run_study(home, data_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_seconds = time.perf_counter() - started
    result = json.loads(first.stdout.strip().splitlines()[-1])
    out = result["outputs"]
    report = Path(out["report"]).read_text()
    names = ["bpe-1k", "bpe-2k", "bpe-2k-kk60"]

    # the report's structure: every section, every variant in every table, the plots it links exist as PNGs
    sections = [
        "## Eval text",
        "## Tokenizers",
        "## Bits per byte: same training FLOPs",
        "## Bits per byte: same training bytes",
        "## Speed",
        "## Plots",
    ]
    positions = [report.index(s) for s in sections]
    assert positions == sorted(positions)
    for a, b in zip(sections, sections[1:] + [None]):
        part = report[report.index(a) : report.index(b) if b else None]
        if a not in ("## Eval text", "## Plots"):
            assert all(f"| {n} |" in part for n in names), (a, part)
    assert "One seed per variant" in report and "one seed: not tested" in report
    assert set(out["plots"]) == {
        "bpb vs vocabulary size",
        "bpb vs Kazakh share",
        "generation bytes/s vs tokens per byte",
    }
    for png in out["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({Path(png).name})" in report

    # every variant's bpb was computed on the same eval text: the documents hashed by hand
    results = json.loads(Path(out["results_json"]).read_text())
    variants = {v["name"]: v for v in results["variants"]}
    assert sorted(variants) == sorted(names)
    flores = data_dir / "eval" / "parallel" / "flores200_devtest"
    ntrex = data_dir / "eval" / "parallel" / "ntrex128"
    by_hand = {
        ("flores200_devtest", "kk"): first_docs_sha256(flores / "kaz_Cyrl.devtest", 20),
        ("flores200_devtest", "en"): first_docs_sha256(flores / "eng_Latn.devtest", 20),
        ("ntrex128", "ru"): first_docs_sha256(ntrex / "ntrex128.rus.txt", 20),
    }
    for v in variants.values():
        assert {r["budget"] for r in v["runs"]} == {"flops", "bytes"}
        for r in v["runs"]:
            for (es, lang), sha in by_hand.items():
                assert r["eval_text"][es][lang]["text_sha256"] == sha, (v["name"], r["budget"], es, lang)
                assert r["eval_text"][es][lang]["docs"] == 20
            assert all(0 < r["bpb"][es][lang] < 20 for es in r["bpb"] for lang in ("kk", "ru", "en"))
            assert all(x > 0 for x in r["generation_bytes_per_s"].values())
            assert r["training_bytes_per_s"] > 0

    # budgets: the reference trains the same run under both; the others spend the reference's FLOPs / bytes
    study = results["study"]
    ref = {r["budget"]: r for r in variants["bpe-2k"]["runs"]}
    assert ref["flops"]["steps"] == ref["bytes"]["steps"] == 20
    assert ref["flops"]["model_uri"] == ref["bytes"]["model_uri"], "one run serves both budgets"
    for v in variants.values():
        step_tokens = study["tokens_per_step"]
        for r in v["runs"]:
            if r["budget"] == "flops":
                per_step = step_tokens * v["tokenizer"]["flops_per_token"]
                assert abs(r["training_flops"] - study["budget_flops"]) <= per_step / 2
            else:
                per_step = step_tokens * v["tokenizer"]["train_bytes_per_token"]
                assert abs(r["training_bytes"] - study["budget_bytes"]) <= per_step / 2
    # the 1k tokenizer compresses less than the 2k one, and Kazakh-heavy training compresses Kazakh more
    tpb = {n: variants[n]["tokenizer"]["tokens_per_byte"] for n in names}
    assert tpb["bpe-1k"]["kk"] > tpb["bpe-2k"]["kk"] > tpb["bpe-2k-kk60"]["kk"]
    assert tpb["bpe-2k-kk60"]["en"] > tpb["bpe-2k"]["en"]

    # MLflow: a parent run with one child per variant, each stage's run under its variant's run
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert sorted(r.data.tags["tulpar.variant"] for r in children) == sorted(names)
    assert all(r.info.status == "FINISHED" for r in children)
    child = next(r for r in children if r.data.tags["tulpar.variant"] == "bpe-1k")
    stages = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{child.info.run_id}'")
    assert sorted(r.data.tags["tulpar.stage"] for r in stages) == sorted(
        ["tokenizer", "preprocess", "pretrain", "pretrain", "eval", "eval"]
    )

    # resume: finished variants are not redone; a variant whose record is lost is redone from the stages' caches
    state_file = home / "tokenizer_study" / "tiny" / "state.json"
    state = json.loads(state_file.read_text())
    del state["variants"]["bpe-1k"]
    state_file.write_text(json.dumps(state))
    started = time.perf_counter()
    second = run_study(home, data_dir)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert time.perf_counter() - started < first_seconds / 2
    assert second.stdout.count("finished in an earlier run") == 2
    redone = [line for line in second.stdout.splitlines() if line.strip().startswith("bpe-1k ")]
    assert len(redone) == 6 and all(line.endswith("cached") for line in redone), second.stdout
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert sorted(r.data.tags["tulpar.variant"] for r in children) == sorted([*names, "bpe-1k"])


def test_a_missing_mlflow_run_reads_as_none_other_failures_propagate(tmp_path):
    """The study's resume redoes a variant only when MLflow says its run does not exist; a store that fails to
    answer is an error, never 'no such run'."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from jobs.platform.tracking import get_run_or_none

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("x"))
    assert get_run_or_none(client, run.info.run_id).info.run_id == run.info.run_id
    assert get_run_or_none(client, "0" * 32) is None

    class Unreachable:
        def get_run(self, run_id):
            raise MlflowException("API request failed", error_code="TEMPORARILY_UNAVAILABLE")

    with pytest.raises(MlflowException, match="API request failed"):
        get_run_or_none(Unreachable(), run.info.run_id)

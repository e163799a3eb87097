"""Distributed pretraining on Ray Train: the job end to end, 1 vs 2 workers, recovery from a killed worker, and
continued pretraining from a model (`init`) with context extension."""

import contextlib
import datetime as dt
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llm_core.shards import build_manifest, dtype_name, write_shard
from llm_core.text import is_validation, sample_language
from llm_core.tokenizer import train_bpe
from tests.conftest import REPO
from tests.stack import job_env

LANGS = ("kk", "ru", "en")


def make_dataset(root: Path, data_dir: Path, chars_per_language: int = 150_000, vocab: int = 1024) -> Path:
    """A small real dataset in the preprocessing output format, built directly from corpus text."""
    texts = {lang: sample_language(data_dir / "corpus" / lang, chars_per_language, 20) for lang in LANGS}
    tok = train_bpe([d for lang in LANGS for d in texts[lang]], vocab)
    tok_dir = tok.save(root / "tokenizer")
    shards = []
    for lang in LANGS:
        for split in ("train", "val"):
            docs = [d for d in texts[lang] if is_validation(d, 0.1) == (split == "val")]
            ids = tok.encode_batch(docs)
            shards.append(
                write_shard(
                    root / "ds",
                    split,
                    lang,
                    0,
                    [(i, len(d.encode())) for i, d in zip(ids, docs)],
                    dtype=dtype_name(tok.vocab_size),
                    eos_id=tok.eos_id,
                    vocab_size=tok.vocab_size,
                )
            )
    manifest = build_manifest(
        name="test",
        created=dt.datetime.now(dt.UTC).isoformat(),
        config={},
        config_sha256="0" * 64,
        input_sha256="0" * 64,
        tokenizer={
            "path": str(tok_dir),
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        languages=list(LANGS),
        shards=shards,
        mixture={"target": {}, "achieved": {}},
    )
    (root / "ds" / "manifest.json").write_text(json.dumps(manifest))
    return root / "ds"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, data_dir) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), data_dir)


def run_pretrain(
    home: Path, dataset: Path, *overrides: str, data_dir: Path, config: str = "configs/pretrain/tiny.yaml"
) -> subprocess.CompletedProcess:
    args, env = pretrain_command(home, dataset, *overrides, data_dir=data_dir, config=config)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def pretrain_command(
    home: Path, dataset: Path, *overrides: str, data_dir: Path, config: str = "configs/pretrain/tiny.yaml"
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a tiny jobs.pretrain run in its own TULPAR_HOME."""
    env = job_env(home, data_dir)
    args = [
        sys.executable,
        "-m",
        "jobs.pretrain",
        "--config",
        config,
        f"data.dataset={dataset}",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.eval_windows=8",
        "sample.max_new_tokens=8",
        *overrides,
    ]
    return args, env


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def console_text(line: str) -> str:
    """A console line without Ray's "(RayTrainWorker pid=123)" prefix and colour codes."""
    return re.sub(r"^\([^)]*\) ", "", re.sub(r"\x1b\[[0-9;]*m", "", line))


def val_losses(history_file: Path) -> dict:
    return json.loads(history_file.read_text())


TINY_RUN = ("train.steps=40", "train.eval_every=20", "train.log_every=10")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, dataset, data_dir) -> tuple[Path, dict]:
    """(TULPAR_HOME, result) of one uninterrupted 40-step run with TINY_RUN: the job test and the preemption
    test's reference."""
    home = tmp_path_factory.mktemp("tiny-run") / "home"
    return home, result_of(run_pretrain(home, dataset, *TINY_RUN, data_dir=data_dir))


@pytest.mark.slow
def test_pretrain_job_trains_exports_registers_and_resumes(tmp_path, tiny_run, dataset, data_dir):
    home, r = tiny_run
    m = r["metrics"]
    for lang in LANGS:
        assert 0 < m[f"best_val_bpb/{lang}"] < 10
    out = r["outputs"]
    run_dir = Path(out["checkpoint_dir"])
    assert (run_dir / "best" / "meta.json").is_file() and (run_dir / "last" / "meta.json").is_file()
    assert json.loads((run_dir / "result.json").read_text()) == r
    assert Path(out["loss_curve"]).read_bytes()[:4] == b"\x89PNG"

    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    from llm_core.checkpoint import load_model_from_checkpoint

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    hist = [x.value for x in client.get_metric_history(r["mlflow_run_id"], "train_loss")]
    assert len(hist) == 4 and hist[-1] < hist[0], f"loss must go down on real kk/ru/en shards: {hist}"
    assert client.get_metric_history(r["mlflow_run_id"], "val_bpb/kk")
    tags = client.get_run(r["mlflow_run_id"]).data.tags
    assert tags["tulpar.dataset_manifest_sha256"] and tags["tulpar.tokenizer_sha256"]
    mv = client.get_model_version_by_alias("tulpar-tiny", "pretrain-latest")
    assert out["model_uri"] == f"models:/tulpar-tiny/{mv.version}"
    local = mlflow.artifacts.download_artifacts(
        f"models:/tulpar-tiny/{mv.version}", dst_path=str(tmp_path / "dl")
    )
    hf = AutoModelForCausalLM.from_pretrained(local).eval()
    ours = load_model_from_checkpoint(run_dir / "best").eval()
    ids = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)

    # the same command again: the job finds its output current (same config, dataset and code) and returns it
    same = TINY_RUN
    r2 = result_of(run_pretrain(home, dataset, *same, data_dir=data_dir))
    assert r2["reused"] is True and r2["outputs"] == r["outputs"] and r2["cache_key"] == r["cache_key"]
    assert len(client.search_model_versions("name='tulpar-tiny'")) == 1, "no new version for a cached run"
    # --rerun redoes the work: it resumes the finished run (no new training steps) and registers a new version
    r3 = run_pretrain(home, dataset, "--rerun", *same, data_dir=data_dir)
    assert "resumed from checkpoint at step 40" in r3.stdout + r3.stderr
    assert "step    10 | train loss" not in r3.stdout + r3.stderr
    assert result_of(r3)["reused"] is False and result_of(r3)["outputs"]["checkpoint_dir"] == str(run_dir)


@pytest.mark.slow
def test_one_vs_two_workers_and_worker_crash_recovery(tmp_path, dataset, data_dir):
    """Same global batch on 1 and 2 Ray workers gives the same loss trajectory; a SIGKILLed worker is restarted
    from the latest checkpoint and the run still ends at the configured step."""
    common = [
        "train.steps=12",
        "train.eval_every=4",
        "train.log_every=2",
        "train.lr=0.001",
        "register_model=false",
    ]
    one = result_of(
        run_pretrain(
            tmp_path / "one", dataset, *common, "train.batch_size=8", "ray.num_workers=1", data_dir=data_dir
        )
    )
    two_proc = run_pretrain(
        tmp_path / "two",
        dataset,
        *common,
        "train.batch_size=4",
        "ray.num_workers=2",
        "ray.fault_injection_kill_at_step=10",
        data_dir=data_dir,
    )
    two = result_of(two_proc)
    import mlflow

    def history(home, run_id):
        mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
        return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}

    h1, h2 = history(tmp_path / "one", one["mlflow_run_id"]), history(tmp_path / "two", two["mlflow_run_id"])
    assert sorted(h1) == [2, 4, 6, 8, 10, 12]
    assert set(h1) <= set(h2)  # the restarted run logs steps again after resuming from step 4 or 8
    for step in h1:  # tolerance: float reduction order differs between 1 and 2 workers
        assert abs(h1[step] - h2[step]) < 1e-4 * abs(h1[step]), (step, h1[step], h2[step])
    assert two["metrics"]["steps"] == 12.0
    marker = Path(two["outputs"]["checkpoint_dir"]) / ".fault-injected"
    assert marker.read_text().startswith("killed at step 10")

    # The console a user reads: each line once, no Ray-internal State API noise, the restart as one clear line
    # naming the rank and the checkpoint, then the resume. (Ray Train registers the step-4 checkpoint at the
    # latest when the step-8 report is accepted, so the kill at step 10 resumes from step 4 or 8.)
    stdout, stderr = (
        [console_text(line) for line in text.splitlines()] for text in (two_proc.stdout, two_proc.stderr)
    )
    died = [i for i, line in enumerate(stderr) if line.startswith("training worker died: ")]
    assert len(died) == 1, stderr
    event = re.fullmatch(
        r"training worker died: rank \d+: .+ -> restart 1 of 1 from checkpoint step-0000(04|08)",
        stderr[died[0]],
    )
    assert event, stderr[died[0]]
    step = int(event.group(1))
    # lines repeat legitimately only across the restart (steps after the checkpoint are trained again)
    for attempt in (stdout + stderr[: died[0]], stderr[died[0] :]):
        repeated = {line for line in attempt if line.strip() and attempt.count(line) > 1}
        assert not repeated, repeated
    console = stdout + stderr
    assert not [line for line in console if "[repeated" in line]  # Ray's cross-process de-duplication
    assert not [line for line in console if "PlacementGroupCleaner" in line or "State API" in line]
    assert not [line for line in console if "Reporting training result" in line]
    assert console.count(f"resumed from checkpoint at step {step} (step-0000{step:02d})") == 1
    assert re.search(r"^step    12 \| train loss .* \| 100% of 12 steps, ETA 0s$", "\n".join(console), re.M)
    assert two_proc.stdout.strip().splitlines()[-1].startswith("{")  # the result stays the last stdout line


def metric_histories(home: Path, run_ids: list[str] | None = None) -> dict[str, dict[int, float]]:
    """name -> {step: value} of the training metrics (train_loss, val_loss/<lang>) of `run_ids` (default: every
    run of `home`: a preempted run and its resumption are two MLflow runs); a step logged twice must agree."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    if run_ids is None:
        run_ids = [
            run.info.run_id
            for exp in client.search_experiments()
            for run in client.search_runs([exp.experiment_id])
        ]
    out: dict[str, dict[int, float]] = {}
    for name in ["train_loss"] + [f"val_loss/{lang}" for lang in LANGS]:
        for run_id in run_ids:
            for m in client.get_metric_history(run_id, name):
                kept = out.setdefault(name, {}).setdefault(m.step, m.value)
                assert kept == m.value, f"{name} at step {m.step} logged twice, differently"
    return out


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_exits_75_and_the_same_command_resumes_bit_identically(
    tmp_path, tiny_run, dataset, data_dir
):
    """The preemption notice a spot node or Kubernetes gives: SIGTERM to the driver. The Ray Train worker
    checkpoints after its current optimizer step, the job exits 75 with one line naming the checkpoint and the
    command that resumes; that command resumes, and the losses equal the uninterrupted run's bit for bit."""
    ref_home, reference = tiny_run
    home = tmp_path / "preempted"
    args, env = pretrain_command(home, dataset, *TINY_RUN, data_dir=data_dir)
    err_path, out_path = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    with open(err_path, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        deadline = dt.datetime.now() + dt.timedelta(seconds=600)
        while not re.search(r"step +10 \| train loss", err_path.read_text()):  # poll until a step is logged
            assert proc.poll() is None, err_path.read_text()[-3000:]
            assert dt.datetime.now() < deadline, "no training step logged within 600 s"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        signalled = dt.datetime.now()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    stopped_in = (dt.datetime.now() - signalled).total_seconds()
    stderr = err_path.read_text()
    assert code == 75, stderr[-3000:]
    lines = re.findall(r"^preempted: .*$", stderr, re.M)
    assert len(lines) == 1, stderr[-3000:]
    line = re.fullmatch(
        r"preempted: stopped on SIGTERM with a checkpoint at step (\d+) in (\S+); resume with: (.+)", lines[0]
    )
    assert line, lines[0]
    step, checkpoint = int(line.group(1)), Path(line.group(2))
    assert 10 <= step < 40, f"stopped at step {step}, though the signal came right after step 10"
    assert checkpoint.name == f"step-{step:06d}"
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == step
    assert line.group(3).endswith(" ".join(args[1:]))  # the same command
    assert json.loads(out_path.read_text().strip().splitlines()[-1])["status"] == "preempted"
    print(f"SIGTERM after step 10 -> exit 75 after {stopped_in:.1f} s, checkpoint at step {step}")

    resumed = run_pretrain(home, dataset, *TINY_RUN, data_dir=data_dir)
    assert f"resumed from checkpoint at step {step} (step-{step:06d})" in resumed.stderr, resumed.stderr[
        -3000:
    ]
    assert result_of(resumed)["metrics"]["steps"] == 40.0
    expected = metric_histories(ref_home, [reference["mlflow_run_id"]])
    assert sorted(expected["train_loss"]) == [10, 20, 30, 40] and sorted(expected["val_loss/kk"]) == [20, 40]
    assert metric_histories(home) == expected  # bit-identical: floats compared exactly
    assert result_of(resumed)["metrics"]["best_val_loss"] == reference["metrics"]["best_val_loss"]


@pytest.mark.slow
def test_diverging_run_stops_with_a_clear_error(tmp_path, dataset, data_dir):
    proc = run_pretrain(
        tmp_path / "home",
        dataset,
        "train.steps=20",
        "train.lr=1000",
        "train.grad_clip=0",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.eval_every=10",
        data_dir=data_dir,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: loss became nan at step" in proc.stderr and "lower the learning rate" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "error"


def test_unexportable_model_is_refused_before_anything_else(tmp_path, data_dir):
    """An MoE without shared experts and without top-k renormalisation has no exact HF (Mixtral) export: the job
    exits 2 at config validation, before it even looks for the (missing) dataset."""
    proc = run_pretrain(
        tmp_path / "home",
        tmp_path / "nope",
        "model.num_experts=4",
        "model.norm_topk_prob=false",
        data_dir=data_dir,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.norm_topk_prob = false with model.num_shared_experts = 0 cannot be exported" in proc.stderr
    assert "make preprocess" not in proc.stderr and not (tmp_path / "home").exists()


def test_missing_dataset_and_vocab_mismatch_are_user_errors(tmp_path, dataset, data_dir):
    proc = run_pretrain(tmp_path / "home", tmp_path / "nope", data_dir=data_dir)
    assert proc.returncode == 2 and "make preprocess" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_pretrain(tmp_path / "home", dataset, "model.vocab_size=512", data_dir=data_dir)
    assert proc.returncode == 2 and "model.vocab_size (512) cannot be set" in proc.stderr
    assert "the dataset's tokenizer" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ continued pretraining (init)

EXTEND = "configs/pretrain/tiny-extend.yaml"


def tiny_init_config(**changes):
    from jobs.platform.configfile import model_config_from_preset

    return model_config_from_preset("tiny", ["vocab_size=1024"]).model_copy(update=changes)


def test_init_fixes_the_architecture_except_the_context():
    from jobs.platform.configfile import load_config
    from jobs.pretrain import PretrainConfig, merged_model_config

    init = tiny_init_config()
    recipe = load_config(PretrainConfig, REPO / EXTEND)
    extended = merged_model_config(init, recipe.model, "models:/tulpar-tiny/1")
    assert extended.rope_scaling.type == "yarn" and extended.rope_scaling.factor == 4.0
    assert extended.model_dump(exclude={"rope_scaling"}) == init.model_dump(exclude={"rope_scaling"})
    # a full preset equal to the init's is accepted as given (no change)
    same = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", ["init=/models/x"])
    assert merged_model_config(init, same.model, "x") == init.model_copy(update={"name": same.model.name})
    longer = load_config(PretrainConfig, REPO / EXTEND, ["model.max_seq_len=2048", "model.rope_scaling=null"])
    assert merged_model_config(init, longer.model, "x").max_seq_len == 2048

    for override, message in [
        ("model.dim=256", r"model\.dim = 256 differs from the init model's 128 \(models:/tulpar-tiny/1\)"),
        ("model.num_kv_heads=4", r"model\.num_kv_heads = 4 differs from the init model's 2"),
        ("model.max_seq_len=256", r"model\.max_seq_len = 256 is below the init model's 512"),
        ("model.rope_scaling.factor=2", r"rope_scaling\.factor \(2\.0\) must equal max_seq_len"),
    ]:
        cfg = load_config(PretrainConfig, REPO / EXTEND, [override])
        with pytest.raises(ValueError, match=message):
            merged_model_config(init, cfg.model, "models:/tulpar-tiny/1")
    # without init, a partial model is incomplete, and the message says so
    with pytest.raises(ValueError, match=r"model\.dim: Field required.*Without init"):
        load_config(PretrainConfig, REPO / EXTEND, ["init=null"])


@pytest.fixture(scope="module")
def foreign_init(tmp_path_factory, data_dir) -> Path:
    """An HF model whose tokenizer is not the `dataset` fixture's (same vocabulary size, different merges)."""
    from tests.factory import train_tiny_hf

    return train_tiny_hf(tmp_path_factory.mktemp("init") / "hf", data_dir, steps=0)


def test_bad_init_exits_2_before_training(tmp_path, dataset, foreign_init, data_dir):
    """Changed dims and a vocabulary that is not the dataset's are user errors naming the key, found before
    anything trains (no MLflow run, no checkpoint)."""
    home = tmp_path / "home"
    proc = run_pretrain(
        home, dataset, f"init={foreign_init}", "model.num_layers=8", data_dir=data_dir, config=EXTEND
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.num_layers = 8 differs from the init model's 4" in proc.stderr

    from llm_core.shards import TokenDataset
    from llm_core.tokenizer import Tokenizer

    ours, theirs = TokenDataset.open(dataset).tokenizer_sha256, Tokenizer.from_dir(foreign_init).sha256
    assert ours != theirs
    proc = run_pretrain(home, dataset, f"init={foreign_init}", data_dir=data_dir, config=EXTEND)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"init {str(foreign_init)!r} has a different vocabulary from the dataset" in proc.stderr
    assert f"tokenizer sha256 {theirs[:12]}" in proc.stderr and f"tokenizer sha256 {ours[:12]}" in proc.stderr
    assert not (home / "mlflow.db").exists() and not (home / "runs").exists()


@pytest.mark.slow
def test_context_extension_continues_from_the_registered_model(tmp_path, dataset, data_dir):
    """tiny-extend.yaml on a registered tiny model: the weights are the init's (first-step loss far below a
    from-scratch run's), the context is longer with YaRN, lineage names the init version, the HF export matches
    transformers beyond the original context, and the stage cache follows the init's version."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    from llm_core.checkpoint import load_model_from_checkpoint

    home = tmp_path / "home"
    scratch_args = ("train.steps=80", "train.eval_every=80", "train.log_every=1")
    scratch = result_of(run_pretrain(home, dataset, *scratch_args, data_dir=data_dir))
    extend_args = ("train.steps=6", "train.seq_len=256", "train.eval_every=6", "train.log_every=1")
    proc = run_pretrain(home, dataset, *extend_args, data_dir=data_dir, config=EXTEND)
    extended = result_of(proc)
    assert (
        "continuing from models:/tulpar-tiny/1: max_seq_len 512 -> 512, rope scaling yarn x4" in proc.stdout
    )

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = mlflow.MlflowClient()

    def losses(run_id):
        return {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}

    first_scratch, first_extended = losses(scratch["mlflow_run_id"])[1], losses(extended["mlflow_run_id"])[1]
    # from scratch: ~ln(1024) = 6.9; the loaded weights start where 80 steps of training left off
    assert first_scratch > 6.5 and first_extended < first_scratch - 1.0, (first_scratch, first_extended)

    out = extended["outputs"]
    assert out["parent_model_uri"] == "models:/tulpar-tiny/1"
    mv = client.get_model_version_by_alias("tulpar-tiny-long", "pretrain-latest")
    assert out["model_uri"] == f"models:/tulpar-tiny-long/{mv.version}"
    assert mv.tags["tulpar.parent_model_uri"] == "models:/tulpar-tiny/1"
    assert (
        client.get_run(extended["mlflow_run_id"]).data.tags["tulpar.parent_model_uri"]
        == "models:/tulpar-tiny/1"
    )
    assert str(client.get_model_version_by_alias("tulpar-tiny", "pretrain-latest").version) == "1"

    local = mlflow.artifacts.download_artifacts(out["model_uri"], dst_path=str(tmp_path / "dl"))
    hf = AutoModelForCausalLM.from_pretrained(local).eval()
    assert hf.config.max_position_embeddings == 512
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["factor"] == 4.0
    ours = load_model_from_checkpoint(Path(out["checkpoint_dir"]) / "best").eval()
    assert ours.cfg.rope_scaling.original_max_seq_len == 128
    ids = torch.randint(0, 1024, (1, 400))  # far beyond the 128 positions RoPE is scaled from
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)

    # the stage cache identity includes the init: the same command is reused, until the alias moves
    again = result_of(run_pretrain(home, dataset, *extend_args, data_dir=data_dir, config=EXTEND))
    assert again["reused"] is True and again["outputs"] == out
    result_of(run_pretrain(home, dataset, "--rerun", *scratch_args, data_dir=data_dir))  # tulpar-tiny v2
    moved = result_of(run_pretrain(home, dataset, *extend_args, data_dir=data_dir, config=EXTEND))
    assert moved["reused"] is False and moved["cache_key"] != extended["cache_key"]
    assert moved["outputs"]["parent_model_uri"] == "models:/tulpar-tiny/2"


def test_pretrain_task_builds_the_extended_model_with_the_init_weights(foreign_init, dataset):
    """What a worker builds from `init`: the init's weights exactly, in the extended model (RoPE tables for the new
    max_seq_len with YaRN scaling); an init of another shape fails the strict load."""
    import torch

    from jobs.training.tasks import PretrainWindowsTask
    from llm_core.config import RopeScaling
    from llm_core.export_hf import load_hf
    from llm_core.model import rope_inv_freq
    from llm_core.trainer import TrainConfig

    start = load_hf(foreign_init)
    extended = start.cfg.model_copy(
        update={
            "max_seq_len": 1024,
            "rope_scaling": RopeScaling(type="yarn", factor=8.0, original_max_seq_len=128),
        }
    )
    task = PretrainWindowsTask(
        model=extended, init=str(foreign_init), train=TrainConfig(), dataset=str(dataset)
    )
    model = task.build_model()
    assert model.training and model.cfg == extended
    ours, theirs = model.state_dict(), start.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
    inv_freq, scale = rope_inv_freq(extended)
    assert model.rope.cos.shape[0] == 1024 and scale > 1.0
    torch.testing.assert_close(model.rope.cos[1000, : inv_freq.numel()], torch.cos(1000 * inv_freq) * scale)

    wider = task.model_copy(update={"model": extended.model_copy(update={"ffn_hidden_dim": 512})})
    with pytest.raises(RuntimeError, match="size mismatch"):
        wider.build_model()


def test_input_init_continues_from_the_version_a_training_result_registered():
    from jobs.platform.configfile import load_config
    from jobs.platform.results import ModelVersionOutputs, StageResult
    from jobs.pretrain import PretrainConfig

    def result(model_uri):
        dirs = {"hf_dir": "/m", "checkpoint_dir": "/c", "best_checkpoint": "/c/best"}
        return StageResult(stage="pretrain", outputs=ModelVersionOutputs(model_uri=model_uri, **dirs))

    cfg = load_config(PretrainConfig, REPO / EXTEND)
    assert cfg.with_inputs({"init": result("models:/tulpar-tiny/3")}).init == "models:/tulpar-tiny/3"
    unregistered = result(None)
    with pytest.raises(ValueError, match="registered no model version"):
        cfg.with_inputs({"init": unregistered})


def test_a_dataset_name_resolves_where_preprocess_writes_it(tmp_path, monkeypatch):
    """jobs.preprocess writes <name> to $TULPAR_STORAGE/datasets/<name>: pretraining finds it there by name, on a
    shared volume (the compose stack) or in S3 (a cluster), not only when TULPAR_STORAGE is TULPAR_HOME."""
    from jobs.platform.runtime import Settings
    from jobs.pretrain import resolve_dataset
    from llm_core.data import DataError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TULPAR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TULPAR_STORAGE", str(tmp_path / "shared"))
    (tmp_path / "shared/datasets/tiny").mkdir(parents=True)
    (tmp_path / "shared/datasets/tiny/manifest.json").write_text("{}")
    assert resolve_dataset("tiny", Settings.from_env()) == str(tmp_path / "shared/datasets/tiny")
    with pytest.raises(DataError, match="shared/datasets/other/manifest.json"):
        resolve_dataset("other", Settings.from_env())
    monkeypatch.setenv("TULPAR_STORAGE", "s3://tulpar/storage")
    assert resolve_dataset("tiny", Settings.from_env()) == "s3://tulpar/storage/datasets/tiny"

"""Fixed-seed loss fingerprints of tiny pretraining, SFT and DPO, to show that a refactor changes no numerics.

    python benchmarks/loss_hashes.py --tokenizer DIR [--repo CHECKOUT] [--home DIR] [--json-out FILE] [--keep]

Runs, in a fresh TULPAR_HOME (a temporary directory unless --home names an empty one), the tiny preprocessing with
the given tokenizer directory and then `jobs.pretrain`, `jobs.sft` and `jobs.dpo` with small fixed-seed overrides,
each as its own process exactly as a user would, in this checkout or in `--repo` (another checkout, e.g. a
`git worktree` of the commit before a refactor; older checkouts whose preprocessing trained its own tokenizer and
whose presets stated a vocabulary get `tokenizer.train=null` and `model.vocab_size=<the tokenizer's>`, so both
sides train on the same shards with the same model). SFT starts from `@pretrain-latest` and DPO from `@sft-latest`, as their
configs say. For each training stage it reads every logged per-step `train_loss` and every validation metric
(`val_*`) back from MLflow (`MlflowClient.get_metric_history`), prints one sha256 per stage over that JSON and one
over the end-of-training samples the stage logged (samples.txt), then the loss lists. Two checkouts whose hashes
agree trained bit-identical models on this machine (numerics can differ between machines and thread counts, so
compare hashes produced on the same one). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PREPROCESS = ["--config", "configs/preprocess/tiny.yaml"]
STAGES: dict[str, list[str]] = {
    "pretrain": [
        "--config",
        "configs/pretrain/tiny.yaml",
        "train.steps=30",
        "train.eval_every=15",
        "train.log_every=1",
        "train.seq_len=64",
        "train.eval_windows=8",
        "sample.max_new_tokens=8",
    ],
    "sft": [
        "--config",
        "configs/sft/tiny.yaml",
        "init=models:/tulpar-tiny@pretrain-latest",
        "train.steps=8",
        "train.eval_every=4",
        "train.log_every=1",
        "train.seq_len=128",
        "train.batch_size=4",
        "data.max_records_per_file=24",
        "sample.max_new_tokens=8",
    ],
    "dpo": [
        "--config",
        "configs/dpo/tiny.yaml",
        "init=models:/tulpar-tiny@sft-latest",
        "train.steps=6",
        "train.eval_every=3",
        "train.log_every=1",
        "train.seq_len=128",
        "train.batch_size=4",
        "data.max_records_per_file=24",
        "data.val_fraction=0.2",
        "sample.max_new_tokens=8",
    ],
}


def run_stage(module: str, args: list[str], env: dict[str, str], log_dir: Path, repo: Path = REPO) -> None:
    """Run `python -m <module> <args>` in the repository; its output goes to <log_dir>/<stage>.log."""
    log_path = log_dir / f"{module.rsplit('.', 1)[-1]}.log"
    print(f"running {module} (log: {log_path})", file=sys.stderr, flush=True)
    with log_path.open("w") as log:
        code = subprocess.call(
            [sys.executable, "-m", module, *args], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        sys.exit(f"{module} exited {code}; last lines of {log_path}:\n{tail}")


def stage_run(tracking_uri: str, stage: str):
    """The stage's only MLflow run in the experiment tulpar-train."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("tulpar-train")
    if experiment is None:
        sys.exit(f"no MLflow experiment tulpar-train in {tracking_uri}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`tulpar.stage` = '{stage}'")
    if len(runs) != 1:
        sys.exit(f"expected one {stage} run in {tracking_uri}, found {len(runs)}")
    return runs[0]


def stage_losses(tracking_uri: str, run) -> dict[str, list[list[float]]]:
    """{metric: [[step, value], ...]} for train_loss and every val_* metric of the run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = run.info.run_id
    keys = sorted(k for k in run.data.metrics if k == "train_loss" or k.startswith("val_"))
    if "train_loss" not in keys:
        sys.exit(f"the run {run_id} logged no train_loss")
    history = {}
    for key in keys:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        history[key] = [[step, value] for step, value in points]
    return history


def stage_samples(tracking_uri: str, run) -> str:
    """The end-of-training samples the stage logged (samples.txt), generated from the best checkpoint."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/samples.txt")


def fingerprint(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="a tokenizer directory, the same for both sides"
    )
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="the checkout whose jobs run (default: this one)"
    )
    parser.add_argument("--home", type=Path, help="TULPAR_HOME to use (must not exist or be empty)")
    parser.add_argument("--json-out", type=Path, help="also write {stage: {sha256, losses}} to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary TULPAR_HOME")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="tulpar-loss-hashes-"))
    if home.exists() and any(home.iterdir()):
        sys.exit(f"--home {home} is not empty: the runs must start from nothing to be comparable")
    home.mkdir(parents=True, exist_ok=True)
    home = home.resolve()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "TULPAR_STORAGE")
    }
    env["TULPAR_HOME"] = str(home)
    env.setdefault("TULPAR_DATA", str(REPO.parent / "shared" / "data"))
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"

    repo = args.repo.resolve()
    tokenizer = args.tokenizer.resolve()
    preprocess = [*PREPROCESS, f"tokenizer.path={tokenizer}"]
    stages = {k: list(v) for k, v in STAGES.items()}
    if "train:" in (repo / "configs" / "preprocess" / "tiny.yaml").read_text():  # before one tokenizer path
        preprocess.append("tokenizer.train=null")
        vocab = json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
        added = json.loads((tokenizer / "tokenizer.json").read_text()).get("added_tokens", [])
        size = len(set(vocab.values()) | {t["id"] for t in added})
        stages["pretrain"].insert(2, f"model.vocab_size={size}")
    run_stage("jobs.preprocess", preprocess, env, home, repo)
    results = {}
    for stage, stage_args in stages.items():
        run_stage(f"jobs.{stage}", stage_args, env, home, repo)
        run = stage_run(tracking_uri, stage)
        history = stage_losses(tracking_uri, run)
        samples = stage_samples(tracking_uri, run)
        results[stage] = {
            "sha256": fingerprint(history),
            "losses": history,
            "samples_sha256": fingerprint(samples),
            "samples": samples,
        }

    for stage, res in results.items():
        print(f"{stage:8s} losses {res['sha256']}  samples {res['samples_sha256']}")
    for stage, res in results.items():
        for key, points in res["losses"].items():
            print(f"{stage} {key}: " + " ".join(f"{v:.6f}" for _, v in points))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.home is None and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    elif args.home is None:
        print(f"TULPAR_HOME kept at {home}", file=sys.stderr)


if __name__ == "__main__":
    main()

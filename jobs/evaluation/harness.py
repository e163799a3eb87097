"""lm-evaluation-harness compatibility: the suite's text sets and multiple-choice suites as local lm_eval tasks,
and `lm_eval run --model hf` on the model's HF export.

Text sets become `loglikelihood_rolling` tasks (metrics word_perplexity, byte_perplexity, bits_per_byte). With
`prefix_token_id=<|endoftext|>` and `max_length=<scoring window>` lm_eval scores exactly what `jobs.eval` scores
with disjoint windows (stride = window), so its bits_per_byte equals ours. Multiple-choice suites become
`multiple_choice` tasks with our rendered prompts (few-shot examples included) and continuations; lm_eval conditions
them on the prompt alone (no document-start token), so accuracies can differ slightly from ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from llm_core.io import atomic_write_text


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def task_name(suite: str, *parts: str) -> str:
    return "_".join(["tulpar", suite, *parts]).replace("-", "_").replace(".", "_").lower()


def _yaml(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


def _write_task(tasks_dir: Path, name: str, records: list[dict], **fields: Any) -> str:
    """An lm-eval task over a local JSONL test split: <name>.jsonl (the records) and <name>.yaml."""
    data = tasks_dir / f"{name}.jsonl"
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }
    atomic_write_text(tasks_dir / f"{name}.yaml", _yaml(task))
    return name


def write_text_task(tasks_dir: Path, name: str, docs: list[str]) -> str:
    return _write_task(
        tasks_dir,
        name,
        [{"text": d} for d in docs],
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="text",
        metric_list=[
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
    )


def write_mc_task(tasks_dir: Path, name: str, prompts: list[tuple[str, list[str], int]]) -> str:
    """prompts: (context, continuations, gold index) per item; continuations carry their own leading space."""
    return _write_task(
        tasks_dir,
        name,
        [{"query": q, "choices": c, "gold": g} for q, c, g in prompts],
        output_type="multiple_choice",
        doc_to_text="query",
        doc_to_choice="choices",
        doc_to_target="gold",
        target_delimiter="",
        metric_list=[
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    )


def lm_eval_command(
    hf_dir: Path,
    tasks: list[str],
    *,
    include_path: Path | None,
    output_path: Path,
    prefix_token_id: int | None,
    max_length: int | None,
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
    dtype: str = "float32",
) -> list[str]:
    """The `lm_eval run --model hf ...` command line for an HF export (run with the venv's Python)."""
    model_args = [f"pretrained={hf_dir}", f"dtype={dtype}"]
    if prefix_token_id is not None:
        model_args.append(f"prefix_token_id={prefix_token_id}")
    if max_length is not None:
        model_args.append(f"max_length={max_length}")
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        ",".join(model_args),
        "--tasks",
        ",".join(tasks),
        "--device",
        device,
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(output_path),
    ]
    if include_path is not None:
        cmd += ["--include_path", str(include_path)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def run_lm_eval(cmd: list[str], output_path: Path, *, offline: bool, timeout_s: int) -> dict:
    """Run lm_eval and return its results JSON ({"results": {task: {metric,filter: value}}, ...})."""
    if shutil.which(sys.executable) is None or not lm_eval_available():
        raise ValueError(
            "lm_eval.enabled is true but lm-evaluation-harness is not installed: pip install 'lm-eval[hf]==0.4.13' "
            "(the `dev` extra) or set lm_eval.enabled=false"
        )
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    if offline:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    found = sorted(output_path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"lm_eval wrote no results_*.json under {output_path}:\n{proc.stdout[-2000:]}")
    return json.loads(found[-1].read_text(encoding="utf-8"))


def flat_results(results: dict) -> dict[str, float]:
    """lm_eval's {"results": {task: {"acc,none": 0.5, ...}}} as lm_eval/<task>/<metric> floats."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, int | float):
                continue
            out[f"lm_eval/{task}/{key.split(',')[0]}"] = float(value)
    return out

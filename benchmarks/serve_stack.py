"""Serving speed against vLLM's own server, side by side in one run, with vLLM's benchmark client.

    python benchmarks/serve_stack.py --tokenizer $TULPAR_HOME/tokenizers/tiny \\
        --models tiny=/tmp/tiny-hf,minimind-26m,gpt-130m --concurrency 1,16,64 [--serve-arg k=v ...]

For each model, three servers on loopback, each serving the same HF directory with the same engine arguments
(float32, `enforce_eager`, VLLM_CPU_KVCACHE_SPACE=1, max_model_len = the model's max_position_embeddings):

  (a) vLLM's own OpenAI server, `python -m vllm.entrypoints.openai.api_server` (the `vllm` command does not start
      under vllm-cpu: "No package metadata was found for vllm");
  (b) our app, `python -m services.llm_serve --model <dir>` (Ray Serve LLM + vLLM) on a private local Ray;
  (c) (b) behind the gateway, `python -m services.gateway` with an API key (rate limits out of the way).

(a) runs alone; then (b) starts and (c) is started in front of it, and the levels alternate (b), (c), so both see
the same machine state. The client is vLLM's own (`vllm.benchmarks.serve`, a separate process): streaming
`/v1/completions`, random prompts of `--input-len` tokens from the model's tokenizer (seed 0: the same prompts for
every server), exactly `--output-len` tokens out (`ignore_eos`), temperature 0, `--max-concurrency` C, with
`--num-warmups` untimed requests first. Reported per (model, server, C): output tokens/s, TTFT p50/p99 and
inter-token latency (ITL) p50/p99, and how many greedy outputs equal (a)'s. A model given as a preset name
(configs/model/<preset>.yaml) is random-initialised with the tokenizer's vocabulary and exported to a temporary HF
directory: speed depends on the shape, not the weights.

Goals (issue 20): (b) >= 0.9x (a) in tokens/s with TTFT p50 <= 1.1x (a); (c) within 5% of (b). Appends a dated
section to docs/benchmarks.md unless --no-append.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import append_section, cpu_model  # benchmarks/machine.py, beside this script
from serve_load import (
    REPO,
    ServeProcess,
    ServerProcess,
    command_line,
    fmt_load,
    free_port,
    gateway_process,
    loadavg,
)

sys.path.insert(0, str(REPO))

# vLLM's benchmark client, run as `python -c BENCH_CLIENT <its arguments>`
BENCH_CLIENT = (
    "import sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "p = FlexibleArgumentParser()\n"
    "add_cli_args(p)\n"
    "main(p.parse_args(sys.argv[1:]))\n"
)


def vllm_server(model_dir: Path, name: str, max_len: int, workdir: Path) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", name, "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_len),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    url = f"http://127.0.0.1:{port}/v1"
    return ServerProcess(cmd, url, workdir / "a-vllm.log", env, name="vLLM's server")


def gateway_server(upstream: str, workdir: Path) -> tuple[ServerProcess, str]:
    """The gateway in front of `upstream` with one API key (returned), rate limits out of the way."""
    from services.gateway.keys import new_key

    _, key = new_key()
    limits = ["rate_limits.requests_per_minute=1e9", "rate_limits.tokens_per_minute=1e12"]
    return gateway_process(upstream, workdir / "c-gateway.log", limits, api_key=key), key


def prepare_model(spec: str, tokenizer: Path | None, workdir: Path) -> tuple[str, Path]:
    """(label, HF directory): `label=dir`, a directory, or a preset name (random weights, the tokenizer's vocab)."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, Path(path)
    if Path(spec).is_dir():
        return Path(spec).name, Path(spec)
    preset = REPO / "configs" / "model" / f"{spec}.yaml"
    if not preset.is_file():
        raise SystemExit(f"error: --models {spec!r} is neither a directory nor a preset in configs/model/")
    if tokenizer is None:
        raise SystemExit(f"error: --models {spec}: a preset needs --tokenizer (a tokenizer directory)")
    import torch

    from jobs.platform.configfile import model_config_from_preset
    from llm_core.export_hf import export_hf
    from llm_core.model import Transformer
    from llm_core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer)
    torch.manual_seed(0)
    model = Transformer(model_config_from_preset(spec, [f"vocab_size={tok.vocab_size}"]))
    out = export_hf(model.eval(), workdir / f"{spec}-hf", tokenizer=tok)
    return f"{spec} (random, {model.num_params() / 1e6:.1f}M)", out


def bench(url: str, name: str, tokenizer: Path, c: int, args, out: Path, api_key: str | None = None) -> dict:
    """vLLM's benchmark client against `url` at concurrency `c`; its result dict (with generated_texts)."""
    base = url.removesuffix("/v1")
    prompts = args.num_prompts or max(16, 3 * c)
    cmd = [
        sys.executable, "-c", BENCH_CLIENT, "--backend", "openai", "--base-url", base, "--endpoint",
        "/v1/completions", "--model", name, "--tokenizer", str(tokenizer), "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", "0", "--num-prompts", str(prompts), "--max-concurrency", str(c),
        "--num-warmups", str(min(c, 8)), "--ignore-eos", "--temperature", "0", "--seed", "0",
        "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
        "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop("OPENAI_API_KEY", None)
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"vllm bench against {url} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    result = json.loads(out.read_text(encoding="utf-8"))
    if result.get("failed"):
        raise RuntimeError(
            f"vllm bench against {url}: {result['failed']} requests failed:\n{done.stdout[-2000:]}"
        )
    return result


def same(texts: list[str], ref: list[str] | None) -> str:
    if ref is None:
        return "-"
    return f"{sum(a == b for a, b in zip(texts, ref, strict=True))}/{len(ref)}"


def row(model: str, server: str, c: int, r: dict, ref: dict | None, b: dict | None) -> dict:
    return {
        "model": model,
        "server": server,
        "concurrency": c,
        "tok_s": r["output_throughput"],
        "ttft_p50": r["median_ttft_ms"],
        "ttft_p99": r["p99_ttft_ms"],
        "itl_p50": r["median_itl_ms"],
        "itl_p99": r["p99_itl_ms"],
        "vs_a": None if ref is None else r["output_throughput"] / ref["output_throughput"],
        "ttft_vs_a": None if ref is None else r["median_ttft_ms"] / max(ref["median_ttft_ms"], 1e-9),
        "vs_b": None if b is None else r["output_throughput"] / b["output_throughput"],
        "greedy_equal_a": same(r["generated_texts"], None if ref is None else ref["generated_texts"]),
        "prompts": r["completed"],
    }


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt) + "x"

    lines = [
        "| model | server | C | prompts | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | tok/s vs (a) | "
        "TTFT p50 vs (a) | tok/s vs (b) | greedy = (a) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['server']} | {r['concurrency']} | {r['prompts']} | {r['tok_s']:,.0f} | "
            f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['itl_p50']:.1f} / {r['itl_p99']:.1f} | "
            f"{f(r['vs_a'], '.2f')} | {f(r['ttft_vs_a'], '.2f')} | {f(r['vs_b'], '.3f')} | {r['greedy_equal_a']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", required=True, help="comma-separated: label=HF dir, an HF dir, or a preset name"
    )
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory for preset models")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--num-prompts", type=int, default=0, help="per level; default max(16, 3 x C)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--servers", default="a,b,c", help="which of a (vLLM), b (our app), c (gateway) to run")
    p.add_argument("--serve-arg", action="append", default=[], help="override for services.llm_serve (k=v)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.servers = set(args.servers.split(","))
    if not args.servers <= {"a", "b", "c"} or ("c" in args.servers and "b" not in args.servers):
        p.error("--servers: a subset of a,b,c; c needs b")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="serve-stack-"))
    load_start = loadavg()
    rows: list[dict] = []
    for spec in args.models.split(","):
        label, model_dir = prepare_model(spec, args.tokenizer, work)
        hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        max_len = int(hf["max_position_embeddings"])
        name = "bench-model"
        results: dict[tuple[str, int], dict] = {}
        if "a" in args.servers:
            with vllm_server(model_dir, name, max_len, work) as a:
                for c in args.levels:
                    results["a", c] = bench(a.url, name, model_dir, c, args, work / f"a-{c}.json")
                    print(f"{label} (a) C={c}: {results['a', c]['output_throughput']:.0f} tok/s", flush=True)
        if "b" in args.servers:
            app = ServeProcess(str(model_dir), [f"models.0.served_name={name}", *args.serve_arg], 900)
            with app, contextlib.ExitStack() as stack:
                gw_key = None
                if "c" in args.servers:
                    gw, gw_key = gateway_server(app.url, work)
                    stack.enter_context(gw)
                for c in args.levels:
                    results["b", c] = bench(app.url, name, model_dir, c, args, work / f"b-{c}.json")
                    print(f"{label} (b) C={c}: {results['b', c]['output_throughput']:.0f} tok/s", flush=True)
                    if gw_key:
                        results["c", c] = bench(
                            gw.url, name, model_dir, c, args, work / f"c-{c}.json", gw_key
                        )
                        print(
                            f"{label} (c) C={c}: {results['c', c]['output_throughput']:.0f} tok/s", flush=True
                        )
        names = {"a": "(a) vLLM server", "b": "(b) Ray Serve app", "c": "(c) app + gateway"}
        for c in args.levels:
            for s in ("a", "b", "c"):
                if (s, c) in results:
                    rows.append(
                        row(label, names[s], c, results[s, c], results.get(("a", c)) if s != "a" else None,
                            results.get(("b", c)) if s == "c" else None)
                    )  # fmt: skip
    load_end = loadavg()
    text = table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if not args.no_append:
        section = (
            f"\n## {dt.datetime.now():%Y-%m-%d %H:%M:%S} serving stack vs vLLM's own server "
            f"(vllm.benchmarks.serve, {args.input_len} in / {args.output_len} out)\n\n"
            f"- machine: {cpu_model()}, {os.cpu_count()} cores; load average {fmt_load(load_start)} at start, "
            f"{fmt_load(load_end)} at end\n- command: `{command_line()}`\n"
            "- client: vLLM's `vllm.benchmarks.serve` (streaming /v1/completions, random prompts seed 0, "
            "ignore_eos, temperature 0); goals: (b) >= 0.9x (a) tok/s, TTFT p50 <= 1.1x (a); (c) >= 0.95x (b)\n\n"
            f"{text}\n"
        )
        print(f"appended to {append_section(section)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

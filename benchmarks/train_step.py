"""Training-step throughput of llm_core's Transformer vs Hugging Face LlamaForCausalLM on the CPU.

One run measures, side by side and interleaved (every timed round runs each variant once, in rotating order,
so machine noise hits all of them alike):
  1. the CPU's matmul peak FLOP/s in fp32 and bf16 (torch.matmul at the model's layer shapes, best of repeats,
     measured before and after the training steps; the larger value is used);
  2. tokens/s of full training steps (forward + backward + AdamW step + zero_grad) of llm_core's Transformer
     and of LlamaForCausalLM built from the SAME config, same weights, same batch, in fp32 and under
     torch.autocast("cpu", dtype=torch.bfloat16);
  3. achieved FLOP/s (cfg.flops_per_token(seq_len), the same formula for both models) as a fraction of the
     matmul peak in the dtype used, and the ratio to HF fp32 and to HF in the same dtype;
  4. loss agreement: a small llm_core model trained from one init on the same fixed batches for --loss-steps
     steps in fp32 and in bf16 autocast; reports the relative difference of the final and mean loss.
Results are printed and appended as a dated section to docs/benchmarks.md (skip with --no-append).
--compile adds llm_core wrapped in torch.compile (a failed or too slow compile is reported, not fatal).
On a machine busy with other work, wall-clock steps are slowed unevenly; `--threads 1 --clock cpu` times
this process's CPU time instead, which approximates one idle core for both the matmul peak and the steps.

    python benchmarks/train_step.py                      # gpt-130m shape, 4 layers, seq 256, batch 4
    python benchmarks/train_step.py --compile --dtypes bf16
    python benchmarks/train_step.py --threads 1 --clock cpu   # on a shared, busy machine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from machine import BENCHMARKS_DOC, append_section  # noqa: E402  (benchmarks/machine.py, beside this script)

from jobs.platform.configfile import model_config_from_preset  # noqa: E402
from llm_core.config import ModelConfig  # noqa: E402
from llm_core.model import Transformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def now() -> float:
    """The timing clock: wall time, or with --clock cpu this process's CPU time (see --help)."""
    return _clock()


DOC = BENCHMARKS_DOC
DOC_HEADER = (
    "# Benchmarks\n\n"
    "Training-step throughput of llm_core vs Hugging Face on CPU, appended by `benchmarks/train_step.py`.\n"
    "FLOPs per token are `ModelConfig.flops_per_token(seq_len)` (6 x matmul params + attention) for both\n"
    'implementations; "% of matmul peak" divides by the best torch.matmul FLOP/s measured in the same run\n'
    "and dtype. Timings are wall clock unless a section says `timing clock: cpu` (this process's CPU time,\n"
    "for a machine busy with other work; with `--threads 1` it approximates one idle core).\n"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-130m", help="model preset in configs/model/ (dense only)")
    p.add_argument(
        "--layers", type=int, default=4, help="num_layers override (default 4 so it runs on 2 cores)"
    )
    p.add_argument("--override", action="append", default=[], help="extra preset override key=value")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=32768,
        help="vocabulary of the models (presets take theirs from a tokenizer; 32768 = the recipe's 32k tokenizer)",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps per variant")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default="fused", help="AdamW implementation")
    p.add_argument("--compile", action="store_true", help="also time llm_core wrapped in torch.compile")
    p.add_argument("--compile-timeout", type=float, default=240.0, help="seconds allowed for compile warmup")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face model")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one step of each eager variant (torch.profiler): where the time goes",
    )
    p.add_argument("--peak-repeats", type=int, default=5, help="repeats per matmul shape (best is kept)")
    p.add_argument(
        "--loss-steps", type=int, default=100, help="steps of the bf16-vs-fp32 loss check (0 = skip)"
    )
    p.add_argument("--loss-preset", default="tiny", help="preset of the (small) loss-check model")
    p.add_argument("--loss-seq-len", type=int, default=128)
    p.add_argument("--loss-batch", type=int, default=8)
    p.add_argument("--loss-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (the real throughput). cpu: CPU time of this process, for a machine busy with "
        "other work; with --threads 1 it approximates one idle core (matmul peak timed the same way)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-append", action="store_true", help=f"do not append to {DOC.relative_to(REPO_ROOT)}")
    args = p.parse_args(argv)
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtype_list if d not in DTYPES]
    if bad or not args.dtype_list:
        p.error(f"--dtypes: unknown {bad}; choose from {', '.join(DTYPES)}")
    return args


# ---------------------------------------------------------------------------------------------- machine


def cpu_info() -> dict[str, str]:
    model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", platform.processor()):
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    bf16_units = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_fp16") if f in flags]
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "bf16_hw": ", ".join(bf16_units) or "none (bf16 emulated)",
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- matmul peak


def matmul_peak(cfg: ModelConfig, tokens: int, dtypes: list[str], repeats: int) -> dict[str, float]:
    """Best FLOP/s of torch.matmul over the model's layer shapes (tokens x in) @ (in x out), per dtype."""
    D, F_, kv = cfg.dim, cfg.ffn_hidden_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [(tokens, D, F_), (tokens, F_, D), (tokens, D, D), (tokens, D, kv)]
    gen = torch.Generator().manual_seed(0)
    mats = {
        (dt, s): (
            torch.randn(s[0], s[1], generator=gen).to(DTYPES[dt]),
            torch.randn(s[1], s[2], generator=gen).to(DTYPES[dt]),
        )
        for dt in dtypes
        for s in shapes
    }
    best = dict.fromkeys(dtypes, 0.0)
    for _ in range(repeats):  # interleave dtypes and shapes across repeats
        for dt in dtypes:
            for s in shapes:
                a, b = mats[(dt, s)]
                torch.matmul(a, b)  # warm caches / oneDNN primitive
                n = 3
                t0 = now()
                for _ in range(n):
                    torch.matmul(a, b)
                dt_s = (now() - t0) / n
                best[dt] = max(best[dt], 2.0 * s[0] * s[1] * s[2] / dt_s)
    return best


# ------------------------------------------------------------------------------------------------ models


def hf_llama(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.is_moe or cfg.rope_scaling is not None:
        raise SystemExit("the HF comparison supports dense presets without rope_scaling; pass --no-hf")
    hcfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        attention_dropout=cfg.dropout,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return LlamaForCausalLM(hcfg)


def copy_weights_to_hf(model: Transformer, hf) -> None:
    """Load llm_core's weights into the HF model (names as in a Llama export), so both compute the same thing."""
    rename = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.": "self_attn."}
    sd = {}
    for name, t in model.state_dict().items():
        if name.startswith("layers."):
            for a, b in rename.items():
                name = name.replace(a, b)
        sd[name if name.startswith("lm_head") else "model." + name] = t
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to HF failed: missing {missing}, unexpected {unexpected}")


class Variant:
    """One (implementation, dtype) pair: a training-step callable plus its timings."""

    def __init__(self, impl: str, dtype: str, step_fn):
        self.impl, self.dtype, self.step_fn = impl, dtype, step_fn
        self.times: list[float] = []
        self.phases: list[tuple[float, float, float]] = []  # forward, backward, optimizer seconds
        self.error: str | None = None
        self.note = ""

    def run(self, timed: bool) -> None:
        if self.error:
            return
        try:
            t0 = now()
            phases = self.step_fn()
            dt = now() - t0
        except Exception as exc:  # e.g. an op without bf16 support: report it, keep benchmarking the rest
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return
        if timed:
            self.times.append(dt)
            self.phases.append(phases)


def make_step(model, opt, dtype: str, input_ids, targets, hf: bool):
    def step() -> tuple[float, float, float]:
        t0 = now()
        with autocast(dtype):
            if hf:  # HF shifts labels itself: labels = input_ids gives the same targets as llm_core's
                loss = model(input_ids=input_ids, labels=input_ids).loss
            else:
                loss = model(input_ids, targets).loss
        t1 = now()
        loss.backward()
        t2 = now()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = now()
        return t1 - t0, t2 - t1, t3 - t2

    return step


def make_optimizer(model, kind: str):
    kw = {"fused": True} if kind == "fused" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, **kw)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise _Timeout after `seconds` (SIGALRM, main thread only). Yields a dict whose "fired" says whether
    it did, since torch.compile wraps exceptions raised inside it in its own types."""
    state = {"fired": False}
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield state
        return

    def handler(signum, frame):
        state["fired"] = True
        raise _Timeout(f"exceeded {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def compile_first_step(v: Variant, timeout: float) -> None:
    """Run the first (compiling) step of a torch.compile variant; record failure or the time limit in v.error."""
    t0 = time.perf_counter()
    state = {"fired": False}
    try:
        with time_limit(timeout) as state:
            v.step_fn()
        v.note = f"compile {time.perf_counter() - t0:.0f} s (first step, forward + backward)"
    except Exception as exc:  # any compile failure (or the time limit) is reported, never fatal
        if state["fired"]:
            v.error = f"compile did not finish within --compile-timeout {timeout:g} s"
        else:
            msg = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:200]
            v.error = f"compile failed after {time.perf_counter() - t0:.0f} s: {type(exc).__name__}: {msg}"
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- loss check


# aten op -> what it is, for the profile's breakdown (self time of the op on the calling thread)
OP_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "vocabulary head loss": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
                             "aten::nll_loss_backward", "aten::logsumexp", "aten::exp", "aten::gather"),
    "casts and copies": ("aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"),
    "optimizer": ("aten::_fused_adamw_", "aten::_foreach_", "aten::zero_", "aten::fill_"),
    "embedding": ("aten::embedding_dense_backward", "aten::index_select", "aten::embedding",
                  "aten::index_add_", "aten::index_put_", "aten::embedding_backward"),
}  # fmt: skip


def op_kind(name: str) -> str:
    for kind, names in OP_KINDS.items():
        if any(name == n or (n.endswith("_") and name.startswith(n)) for n in names):
            return kind
    return "other elementwise / norms / autograd"


def profile_step(step_fn) -> tuple[float, list[tuple[str, float]], list[tuple[str, float]]]:
    """One profiled step (after an unprofiled one): (step wall s, [(kind, self s)], top [(op, self s)])."""
    from torch.profiler import ProfilerActivity, profile

    step_fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step_fn()
        wall = time.perf_counter() - t0
    per_op: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
            per_op[e.key] = per_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    kinds: dict[str, float] = {}
    for name, t in per_op.items():
        kind = op_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return wall, sorted(kinds.items(), key=lambda kv: -kv[1]), top


def markov_batches(vocab: int, steps: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """Fixed token batches from a random sparse order-1 Markov chain: learnable, so the loss actually falls."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)  # 4 likely successors per token
    probs = torch.tensor([0.55, 0.25, 0.12, 0.08])
    out = []
    for _ in range(steps):
        x = torch.empty(batch, seq_len + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(seq_len):
            pick = torch.multinomial(probs, batch, replacement=True, generator=g)
            x[:, t + 1] = succ[x[:, t], pick]
        out.append(x)
    return out


def loss_check(args) -> dict:
    cfg = model_config_from_preset(args.loss_preset, [f"vocab_size={args.vocab_size}"])
    seq = min(args.loss_seq_len, cfg.max_seq_len)
    batches = markov_batches(cfg.vocab_size, args.loss_steps, args.loss_batch, seq, args.seed + 1)
    torch.manual_seed(args.seed)
    init = Transformer(cfg).state_dict()
    losses: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for dtype in ("fp32", "bf16"):
        model = Transformer(cfg)
        model.load_state_dict(init)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.loss_lr, weight_decay=0.1, fused=True)
        losses[dtype] = []
        for x in batches:
            with autocast(dtype):
                loss = model(x[:, :-1], x[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[dtype].append(loss.item())
    tail = max(1, min(10, args.loss_steps // 10))

    def rel(a: float, b: float) -> float:
        return abs(a - b) / abs(b)

    f32, b16 = losses["fp32"], losses["bf16"]
    res = {
        "preset": cfg.name,
        "steps": args.loss_steps,
        "batch": args.loss_batch,
        "seq_len": seq,
        "tail": tail,
        "first": (f32[0], b16[0]),
        "final": (f32[-1], b16[-1]),
        "final_avg": (statistics.fmean(f32[-tail:]), statistics.fmean(b16[-tail:])),
        "mean": (statistics.fmean(f32), statistics.fmean(b16)),
        "seconds": time.perf_counter() - t0,
    }
    res["rel_final"] = rel(res["final"][1], res["final"][0])
    res["rel_final_avg"] = rel(res["final_avg"][1], res["final_avg"][0])
    res["rel_mean"] = rel(res["mean"][1], res["mean"][0])
    res["max_step_rel"] = max(rel(b, a) for a, b in zip(f32, b16, strict=True))
    return res


# ------------------------------------------------------------------------------------------------ report


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    global _clock
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _clock = CLOCKS[args.clock]
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]
    )
    if argv is not None:
        command = "python benchmarks/train_step.py " + " ".join(shlex.quote(a) for a in argv)
    started = datetime.now()
    machine = cpu_info()
    load_start = os.getloadavg()
    overrides = [f"num_layers={args.layers}"] if args.layers else []
    cfg = model_config_from_preset(args.preset, [f"vocab_size={args.vocab_size}", *overrides, *args.override])
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} > max_seq_len {cfg.max_seq_len} of preset {args.preset}")
    tokens = args.batch * args.seq_len
    fpt = cfg.flops_per_token(args.seq_len)
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{machine['threads']} threads, ISA {machine['capability']}, bf16 hw: {machine['bf16_hw']}"
    )
    print(f"command: {command}")
    print(f"load average (1/5/15 min) at start: {' '.join(f'{x:.2f}' for x in load_start)}")
    cfg_desc = (
        f"{cfg.name}: dim {cfg.dim}, layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, "
        f"head_dim {cfg.head_dim}, ffn {cfg.ffn_hidden_dim}, vocab {cfg.vocab_size}, "
        f"tie_embeddings {cfg.tie_embeddings}, rope_theta {cfg.rope_theta:g}; {cfg.num_params() / 1e6:.1f}M params; "
        f"batch {args.batch} x seq {args.seq_len} = {tokens} tokens/step; "
        f"{fpt / 1e6:.1f} MFLOP/token (flops_per_token); AdamW ({args.optimizer}); timing clock: {args.clock}"
    )
    print(f"config: {cfg_desc}")

    # 1. matmul peak (again after the steps; the larger is used)
    peak = matmul_peak(cfg, tokens, args.dtype_list, args.peak_repeats)
    print("matmul peak (before): " + ", ".join(f"{d} {v / 1e12:.3f} TFLOP/s" for d, v in peak.items()))

    # 2. models: same init, same weights
    torch.manual_seed(args.seed)
    model = Transformer(cfg).train()
    impls: list[tuple[str, torch.nn.Module, bool]] = [("llm_core", model, False)]
    if not args.no_hf:
        hf = hf_llama(cfg).train()
        copy_weights_to_hf(model, hf)
        impls.append(("hf", hf, True))
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    input_ids = data[:, :-1].contiguous()
    targets = input_ids.roll(-1, dims=1)
    targets[:, -1] = -100  # HF's internal shift drops the last position: same targets, same loss

    # sanity: both implementations compute the same loss from the same weights
    with torch.no_grad():
        l_core = model(input_ids, targets).loss.item()
        if not args.no_hf:
            l_hf = hf(input_ids=input_ids, labels=input_ids).loss.item()
            print(
                f"fp32 initial loss: llm_core {l_core:.6f}, hf {l_hf:.6f} (|diff| {abs(l_core - l_hf):.2e})"
            )

    variants: list[Variant] = []
    for dtype in args.dtype_list:
        for name, m, is_hf in impls:
            opt = make_optimizer(m, args.optimizer)
            variants.append(Variant(name, dtype, make_step(m, opt, dtype, input_ids, targets, is_hf)))

    compile_notes: list[str] = []
    if args.compile:
        cmodel = Transformer(cfg).train()
        cmodel.load_state_dict(model.state_dict())
        compiled = torch.compile(cmodel)
        for dtype in args.dtype_list:
            v = Variant(
                "llm_core+compile",
                dtype,
                make_step(compiled, make_optimizer(cmodel, args.optimizer), dtype, input_ids, targets, False),
            )
            if any("compile-timeout" in n for n in compile_notes):  # don't spend the time limit twice
                v.error = "skipped: an earlier compile hit --compile-timeout"
            else:
                compile_first_step(v, args.compile_timeout)
            compile_notes.append(f"{dtype}: {v.error or v.note}")
            print(f"torch.compile {dtype}: {v.error or v.note}", flush=True)
            variants.append(v)

    # interleaved rounds: warmup, then timed; the order rotates every round
    t_bench = time.perf_counter()
    for r in range(args.warmup + args.steps):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            v.run(timed=r >= args.warmup)
        print(
            f"\r  round {r + 1}/{args.warmup + args.steps} ({time.perf_counter() - t_bench:.0f} s)",
            end="",
            flush=True,
        )
    print()
    peak_after = matmul_peak(cfg, tokens, args.dtype_list, args.peak_repeats)
    print("matmul peak (after):  " + ", ".join(f"{d} {v / 1e12:.3f} TFLOP/s" for d, v in peak_after.items()))
    peak = {d: max(peak[d], peak_after[d]) for d in peak}

    # 3. report
    def tps(v: Variant) -> float | None:
        return tokens / statistics.median(v.times) if v.times else None

    by = {(v.impl, v.dtype): v for v in variants}
    hf32 = tps(by[("hf", "fp32")]) if ("hf", "fp32") in by else None
    rows, breakdown = [], []
    for v in variants:
        t = tps(v)
        if t is None:
            rows.append([v.impl, v.dtype, "failed (see below)", "-", "-", "-", "-", "-"])
            continue
        ach = t * fpt
        same = tps(by[("hf", v.dtype)]) if ("hf", v.dtype) in by else None
        rows.append(
            [
                v.impl,
                v.dtype if v.dtype == "fp32" else "bf16 autocast",
                f"{t:,.0f}",
                f"{ach / 1e12:.3f}",
                f"{100 * ach / peak[v.dtype]:.1f}%",
                f"{t / hf32:.2f}x" if hf32 else "-",
                f"{t / same:.2f}x" if same else "-",
                f"{tokens / min(v.times):,.0f} ({100 * tokens / min(v.times) * fpt / peak[v.dtype]:.0f}%)",
            ]
        )
        fw, bw, op = (statistics.median(p[i] for p in v.phases) * 1e3 for i in range(3))
        spread = (max(v.times) - min(v.times)) / statistics.median(v.times)
        breakdown.append(
            f"{v.impl} {v.dtype}: step {statistics.median(v.times) * 1e3:.0f} ms (fwd {fw:.0f}, "
            f"bwd {bw:.0f}, AdamW {op:.0f}; spread {100 * spread:.0f}%; fwd+bwd alone "
            f"{100 * tokens * fpt / ((fw + bw) / 1e3) / peak[v.dtype]:.0f}% of peak)"
        )
    header = [
        "impl",
        "dtype",
        "tokens/s",
        "achieved TFLOP/s",
        "% of matmul peak",
        "ratio vs HF fp32",
        "ratio vs HF same dtype",
        "best step: tokens/s (% of peak)",
    ]
    tab = table(rows, header)
    print()
    print(tab)
    print()
    print("matmul peak used: " + ", ".join(f"{d} {v / 1e12:.3f} TFLOP/s" for d, v in peak.items()))
    for line in breakdown:
        print("  " + line)
    for v in variants:
        if v.error:
            print(f"  {v.impl} {v.dtype}: ERROR {v.error}")

    # 3b. profile: where one step's time goes, by kind of op
    profiles: list[str] = []
    if args.profile:
        for v in variants:
            if v.error or "compile" in v.impl:
                continue
            wall, kinds, top = profile_step(v.step_fn)
            ops = sum(t for _, t in kinds)
            lines = [
                f"profile {v.impl} {v.dtype}: one step {wall * 1e3:.0f} ms under the profiler, aten self time "
                f"{ops * 1e3:.0f} ms: " + ", ".join(f"{k} {100 * t / ops:.1f}%" for k, t in kinds),
                "  top ops: " + ", ".join(f"{n.removeprefix('aten::')} {t * 1e3:.0f} ms" for n, t in top),
            ]
            profiles += lines
            print("\n".join(lines))

    # 4. loss agreement
    lc = None
    if args.loss_steps > 0:
        lc = loss_check(args)
        lc_text = (
            f"loss check ({lc['preset']}, {lc['steps']} steps, batch {lc['batch']} x seq {lc['seq_len']}, same init "
            f"and batches, {lc['seconds']:.0f} s): fp32 vs bf16 autocast: first {lc['first'][0]:.4f} / "
            f"{lc['first'][1]:.4f}, final {lc['final'][0]:.4f} / {lc['final'][1]:.4f} "
            f"(rel diff {100 * lc['rel_final']:.3f}%), mean of last {lc['tail']} {lc['final_avg'][0]:.4f} / "
            f"{lc['final_avg'][1]:.4f} ({100 * lc['rel_final_avg']:.3f}%), mean over all steps "
            f"{lc['mean'][0]:.4f} / {lc['mean'][1]:.4f} ({100 * lc['rel_mean']:.3f}%), max per-step "
            f"{100 * lc['max_step_rel']:.3f}%; within 1%: "
            f"{'yes' if max(lc['rel_final'], lc['rel_mean']) < 0.01 else 'NO'}"
        )
        print(lc_text)

    # 5. goals
    goals = []
    core = {d: tps(by[("llm_core", d)]) for d in args.dtype_list}
    hf_same = {d: tps(by[("hf", d)]) if ("hf", d) in by else None for d in args.dtype_list}
    if args.compile:
        for d in args.dtype_list:
            t = tps(by[("llm_core+compile", d)])
            if t and core[d]:
                verdict = "helps" if t > 1.02 * core[d] else "does not help"
                goals.append(f"torch.compile {verdict} in {d}: {t / core[d]:.2f}x llm_core eager")
    for label in ["llm_core", "llm_core+compile"] if args.compile else ["llm_core"]:
        for d in args.dtype_list:
            t = tps(by[(label, d)])
            if not t:
                continue
            vs = [
                f"{t / hf32:.2f}x HF fp32" if hf32 else "",
                f"{t / hf_same[d]:.2f}x HF {d}" if hf_same[d] and d != "fp32" else "",
            ]
            vs = ", ".join(x for x in vs if x)
            goals.append(
                f"{label} {d}: {vs + '; ' if vs else ''}{100 * t * fpt / peak[d]:.1f}% of the {d} matmul peak "
                "(goals: >= 1.3x HF, >= 60% of peak)"
            )
    for line in goals:
        print("goal: " + line)
    load_end = os.getloadavg()
    print(f"load average (1/5/15 min) at end: {' '.join(f'{x:.2f}' for x in load_end)}")

    if not args.no_append:
        parts = [
            f"\n## {started:%Y-%m-%d %H:%M:%S} train_step: {cfg.name}, batch {args.batch} x seq {args.seq_len}\n",
            f"- machine: {machine['cpu']}, {machine['cores']} cores, ISA {machine['capability']}, bf16 hw: "
            f"{machine['bf16_hw']}; torch {machine['torch']}, {machine['threads']} threads",
            f"- command: `{command}`",
            f"- config: {cfg_desc}",
            "- matmul peak (best torch.matmul at layer shapes): "
            + ", ".join(f"{d} {v / 1e12:.3f} TFLOP/s" for d, v in peak.items()),
            f"- timed: median of {args.steps} steps (best step in the last column) after {args.warmup} warmup, "
            f"variants interleaved; 1-min load "
            f"average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end (other work on the machine)",
        ]
        parts += [f"- torch.compile {n}" for n in compile_notes]
        parts += ["", tab, ""]
        parts += [f"- {line}" for line in breakdown]
        parts += [f"- {line.strip()}" for line in profiles]
        if lc:
            parts.append(f"- {lc_text}")
        parts += [f"- {line}" for line in goals]
        append_section("\n".join(parts) + "\n", header=DOC_HEADER)
        print(f"appended to {DOC.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Talk to a model from the terminal: completions for prompts, or an interactive chat.

    python -m jobs.generate --model models:/tulpar-kk@production --prompt "Қазақстанның астанасы" [--prompt ...]
    python -m jobs.generate --model runs/pretrain-tiny/best --prompts-file prompts.txt --temperature 0
    python -m jobs.generate --model ~/models/kk-sft --chat --system "Сіз көмекшісіз."

`--model` takes what `jobs.eval` takes: `models:/<name>/<version>`, `models:/<name>@<alias>`, an HF-format directory
or an llm_core checkpoint directory (its tokenizer is found beside it or where its training run got it). Sampling
is llm_core's (`llm_core.generate`, the reference the served model is tested against): `--temperature 0` is
greedy, and greedy output equals what `services.llm_serve` returns for the same model and prompt.

Prompts are raw text completions (as `/v1/completions`); `--template chat` renders each prompt as one user turn
of the chat template (with `--system`), as `/v1/chat/completions` does. `--chat` reads turns from the terminal and
streams each answer; `/reset` starts over, `/exit` (or end of input) quits. Completions go to stdout, one per
prompt (`--output jsonl`: one JSON object per prompt, for completions that hold newlines); timing (tokens,
seconds, tokens/s) goes to stderr. User errors print `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from llm_core.device import DEVICE_HELP, resolve_device
from llm_core.generate import SamplingParams, generate_stream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="models:/name/N, models:/name@alias, HF dir or checkpoint dir"
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="a text file, one prompt per line (blank lines skipped)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat with the chat template")
    p.add_argument("--template", choices=["raw", "chat"], default="raw", help="how --prompt text is fed")
    p.add_argument("--system", help="system message (chat and --template chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats; 1: off")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32"
    )
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument(
        "--keep-special-tokens", action="store_true", help="print special tokens (e.g. <|im_end|>)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (--prompts-file)")
    p.add_argument(
        "--output",
        choices=["text", "jsonl"],
        default="text",
        help="text: each completion then a newline; jsonl: one {prompt, completion, tokens} object per line",
    )
    return p.parse_args(argv)


def sampling(args: argparse.Namespace, stop_ids: list[int]) -> SamplingParams:
    """SamplingParams from the flags, with errors that name the flag and its range."""
    checks = (
        (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens} must be >= 1"),
        (args.temperature >= 0, f"--temperature {args.temperature} must be >= 0 (0 is greedy)"),
        (args.top_k >= 0, f"--top-k {args.top_k} must be >= 0 (0 turns it off)"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p} must be in (0, 1] (1 turns it off)"),
        (
            args.repetition_penalty > 0,
            f"--repetition-penalty {args.repetition_penalty} must be > 0 (1 is off)",
        ),
        (args.batch_size >= 1, f"--batch-size {args.batch_size} must be >= 1"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_token_ids=[] if args.ignore_eos else stop_ids,
        seed=args.seed,
    )


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--prompts-file {str(args.prompts_file)!r} cannot be read ({exc})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if args.chat and prompts:
        raise ValueError(
            "--chat reads its turns from the terminal: drop --prompt/--prompts-file, or drop --chat"
        )
    if not args.chat and not prompts:
        raise ValueError(
            "nothing to generate: pass --prompt TEXT (repeatable), --prompts-file FILE, or --chat"
        )
    return prompts


class Decoder:
    """Incremental detokenization: the text of the ids so far, released only up to the last complete character
    (a token can end inside a multi-byte UTF-8 sequence; it is shown once the next token completes it)."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        stable = len(text.rstrip("\ufffd"))
        new, self.shown = text[self.shown : stable], max(self.shown, stable)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        new, self.shown = text[self.shown :], len(text)
        return new


class Session:
    """A loaded model and tokenizer with the sampling settings."""

    def __init__(self, args: argparse.Namespace):
        from jobs.evaluation.config import ModelSpec
        from jobs.evaluation.models import load_model
        from jobs.platform.runtime import Settings

        device = resolve_device(args.device)
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        spec = ModelSpec(source=args.model, tokenizer=args.tokenizer, device=str(device), dtype=dtype)
        t0 = time.perf_counter()
        loaded = load_model(spec, Settings.from_env())
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        tok = self.tokenizer
        stops = {tok.eos_id, tok.im_end_id, tok.tk.token_to_id("<|endoftext|>")}
        self.params = sampling(args, sorted(i for i in stops if i is not None))
        self.skip_special = not args.keep_special_tokens
        self.args = args
        print(
            f"[{loaded.label}: {self.model.num_params() / 1e6:.1f}M parameters, {dtype} on {device}, loaded in "
            f"{time.perf_counter() - t0:.1f} s]",
            file=sys.stderr,
        )

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.args.template == "chat":
            system = [{"role": "system", "content": self.args.system}] if self.args.system else []
            return self.chat_ids([*system, {"role": "user", "content": prompt}])
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens: give it some text")
        return ids

    def stream(self, ids: list[int]) -> Iterator[int]:
        for step in generate_stream(self.model, [ids], self.params, pad_id=self.tokenizer.pad_id or 0):
            if step[0] is None:
                return
            yield step[0]

    def complete_batch(self, prompts: list[list[int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for step in generate_stream(self.model, prompts, self.params, pad_id=self.tokenizer.pad_id or 0):
            for i, t in enumerate(step):
                if t is not None:
                    out[i].append(t)
        return out


def report(n_tokens: int, seconds: float) -> None:
    rate = n_tokens / seconds if seconds > 0 else float("inf")
    print(f"[{n_tokens} tokens in {seconds:.2f} s: {rate:.1f} tokens/s]", file=sys.stderr, flush=True)


def run_prompts(session: Session, prompts: list[str]) -> None:
    encoded = [session.prompt_ids(p) for p in prompts]
    jsonl = session.args.output == "jsonl"
    if len(encoded) == 1 and not jsonl:  # one prompt: stream it as it is generated
        decoder, t0, n = Decoder(session.tokenizer, session.skip_special), time.perf_counter(), 0
        for token in session.stream(encoded[0]):
            n += 1
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        report(n, time.perf_counter() - t0)
        return
    size = session.args.batch_size
    for s in range(0, len(encoded), size):
        t0 = time.perf_counter()
        outs = session.complete_batch(encoded[s : s + size])
        for prompt, ids in zip(prompts[s : s + size], outs):
            text = session.tokenizer.decode(ids, skip_special_tokens=session.skip_special)
            if jsonl:
                text = json.dumps(
                    {"prompt": prompt, "completion": text, "tokens": len(ids)}, ensure_ascii=False
                )
            print(text, flush=True)
        report(sum(map(len, outs)), time.perf_counter() - t0)


def run_chat(session: Session, stdin=None) -> None:
    stdin = stdin or sys.stdin
    system = [{"role": "system", "content": session.args.system}] if session.args.system else []
    history: list[dict] = []
    limit = session.model.cfg.max_seq_len - session.params.max_new_tokens
    print("[chat: /reset starts over, /exit quits]", file=sys.stderr, flush=True)
    while True:
        sys.stdout.write("you> ")
        sys.stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            sys.stdout.write("\n")
            return
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr, flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = session.chat_ids(system + history)
        while len(ids) > limit and len(history) > 1:  # forget the oldest turns, keep the system message
            history = history[2:] if len(history) > 2 else history[1:]
            ids = session.chat_ids(system + history)
            print("[oldest turns dropped to fit the context]", file=sys.stderr, flush=True)
        if len(ids) > limit:
            history.pop()
            print(
                f"[that message is too long: {len(ids)} tokens, at most {limit} fit with --max-new-tokens "
                f"{session.params.max_new_tokens}]",
                file=sys.stderr,
                flush=True,
            )
            continue
        sys.stdout.write("model> ")
        decoder, t0, n = Decoder(session.tokenizer, True), time.perf_counter(), 0
        for token in session.stream(ids):
            n += 1
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": session.tokenizer.decode(decoder.ids)})
        report(n, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    from jobs.platform.runtime import run_cli

    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    def body() -> None:
        args = parse_args(argv)
        prompts = read_prompts(args)
        sampling(args, [])  # flag errors before the model loads
        session = Session(args)
        if args.chat:
            run_chat(session)
        else:
            run_prompts(session, prompts)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

"""Small real models for tests that need one (serving, evaluation): trained in-process in seconds."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from jobs.platform.configfile import model_config_from_preset
from llm_core.data import RandomWindows, concat_documents
from llm_core.export_hf import export_hf
from llm_core.model import Transformer
from llm_core.text import sample_language
from llm_core.tokenizer import train_bpe
from llm_core.trainer import TrainConfig, Trainer


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one intra-op thread, then restore the count: a float sum's order follows the thread count, so a
    model trained here is the same weights whichever test asks and however many threads the process had."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_corpus(data_dir: Path, vocab: int = 1024):
    """(tokenizer, token stream) of a little kk/ru/en text: what `train_tiny_hf` trains on."""
    docs = [
        d for lang in ("kk", "ru", "en") for d in sample_language(data_dir / "corpus" / lang, 100_000, 20)
    ]
    tok = train_bpe(docs, vocab)
    return tok, concat_documents(tok.iter_documents(docs), vocab)


def train_tiny_hf(
    out_dir: Path,
    data_dir: Path,
    *,
    steps: int = 150,
    vocab: int = 1024,
    seed: int = 0,
    max_seq_len: int | None = None,
) -> Path:
    """Train the `tiny` preset (vocab shrunk; max_seq_len too if given) on 64-token windows of a little kk/ru/en
    text and export it in HF format to `out_dir`. Training is deterministic (seeded, one thread), so a session
    trains each combination of arguments once and hands every caller its own copy of that export."""
    key = (str(data_dir), steps, vocab, seed, max_seq_len)
    if key not in _TRAINED:
        root = tempfile.mkdtemp(prefix="tulpar-tiny-hf-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        cache = Path(root) / "hf"
        _train_tiny_hf(cache, data_dir, steps=steps, vocab=vocab, seed=seed, max_seq_len=max_seq_len)
        _TRAINED[key] = cache
    shutil.copytree(_TRAINED[key], out_dir, dirs_exist_ok=True)
    return out_dir


_TRAINED: dict[tuple, Path] = {}  # train_tiny_hf's arguments -> the export trained for them in this session


def _train_tiny_hf(
    out_dir: Path, data_dir: Path, *, steps: int, vocab: int, seed: int, max_seq_len: int | None
) -> None:
    tok, tokens = tiny_corpus(data_dir, vocab)
    torch.manual_seed(seed)
    overrides = [f"vocab_size={vocab}"] + ([f"max_seq_len={max_seq_len}"] if max_seq_len else [])
    cfg = model_config_from_preset("tiny", overrides)
    model = Transformer(cfg)
    if steps:
        tcfg = TrainConfig(steps=steps, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=10, eval_every=10**6)
        trainer = Trainer(model, tcfg)
        sampler = RandomWindows(np.asarray(tokens), 64, 16, seed=seed)
        with one_thread():
            for _ in range(steps):
                trainer.train_step(sampler.next_step())
    export_hf(model.eval(), out_dir, tokenizer=tok)


def sft_tiny_hf(
    base_dir: Path, out_dir: Path, data_dir: Path, *, steps: int = 150, per_file: int = 200, seed: int = 0
) -> Path:
    """Fine-tune an HF directory (e.g. `train_tiny_hf`'s) on the kk/ru/en SFT data through the chat template,
    in-process, and export it: the tiny SFT model the RL tests start from."""
    from llm_core.chat_data import (
        RowSampler,
        Stats,
        encode_examples,
        pack_rows,
        read_jsonl,
        record_to_messages,
    )
    from llm_core.export_hf import load_hf
    from llm_core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(base_dir)
    files = sorted((data_dir / "sft").glob("*.jsonl"))
    by_file: dict[str, int] = {}
    convs = []
    for where, rec in read_jsonl(files):
        name = where.split(":")[0]
        by_file[name] = by_file.get(name, 0) + 1
        if by_file[name] <= per_file:
            convs.append((where, record_to_messages(rec, where)))
    examples = encode_examples(convs, tok, 129, "truncate", Stats())
    rows = pack_rows(examples, 128, tok.pad_id)
    torch.manual_seed(seed)
    model = load_hf(base_dir)
    tcfg = TrainConfig(steps=steps, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=10, eval_every=10**6)
    trainer = Trainer(model, tcfg)
    sampler = RowSampler(rows, 16, seed=seed)
    with one_thread():
        for _ in range(steps):
            trainer.train_step(sampler.next_step())
    export_hf(model.eval(), out_dir, tokenizer=tok)
    return out_dir

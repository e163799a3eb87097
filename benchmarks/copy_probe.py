"""Can a model copy from far back? The induction probe behind the passkey results of docs/evaluation.md.

    .venv/bin/python benchmarks/copy_probe.py --dataset $TULPAR_HOME/datasets/tiny \\
        $TULPAR_HOME/models/tulpar-tiny/1 $TULPAR_HOME/models/tulpar-tiny-long/4

For each model (an HF export directory) and each (window length, distance): `--windows` windows of the dataset's
validation tokens (one language), in each a span of `--span` tokens put in a random order (so no memorised
continuation of the corpus predicts it) and written a second time `distance` tokens further on. Reported: copy
accuracy, the share of the second occurrence's tokens 2..span the model predicts greedily, and the same on the
first occurrence (where nothing earlier tells it: the chance line). `--source random` writes token ids drawn
uniformly from the vocabulary instead (what `data.recall`'s rows hold, but here inside text). A model that retrieves by looking back (an
induction head) scores far above the chance line; passkey retrieval needs exactly that.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from llm_core.export_hf import load_hf  # noqa: E402
from llm_core.shards import TokenDataset  # noqa: E402
from llm_core.tokenizer import Tokenizer  # noqa: E402


def copy_accuracy(
    model,
    tokens: np.ndarray,
    length: int,
    distance: int,
    span: int,
    windows: int,
    seed: int,
    source: str = "shuffled",
    vocab: np.ndarray | None = None,
):
    """(accuracy at the copy, accuracy at the first occurrence) over `windows` probe windows of `length` tokens.
    source "shuffled": the span is the window's own text in a random order; "random": ids drawn from `vocab`."""
    if 10 + distance + span > length:
        raise ValueError(
            f"a span of {span} at distance {distance} does not fit {length} tokens: lower --distances"
        )
    rng = np.random.default_rng(seed)
    at_copy, at_first = [], []
    for _ in range(windows):
        start = int(rng.integers(0, len(tokens) - length - 1))
        w = tokens[start : start + length + 1].astype(np.int64).copy()
        first, copy = 10, 10 + distance
        if source == "random":
            w[first : first + span] = rng.choice(vocab, span)
        else:
            w[first : first + span] = rng.permutation(w[first : first + span])
        w[copy : copy + span] = w[first : first + span]
        x, y = torch.from_numpy(w[None, :-1]), torch.from_numpy(w[None, 1:])
        with torch.no_grad():
            pred = model(x).logits[0].argmax(-1)
        for pos, out in ((copy, at_copy), (first, at_first)):
            idx = torch.arange(pos, pos + span - 1)  # targets: the span's tokens 2..span
            out.append((pred[idx] == y[0, idx]).float().mean().item())
    return float(np.mean(at_copy)), float(np.mean(at_first))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="HF export directories")
    p.add_argument("--dataset", type=Path, required=True, help="a jobs.preprocess dataset directory")
    p.add_argument("--language", default="en")
    p.add_argument("--cases", default="128:60,480:400", help="length:distance pairs")
    p.add_argument("--span", type=int, default=20)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--source",
        choices=["shuffled", "random"],
        default="shuffled",
        help="the span: the window's own text in a random order, or token ids drawn uniformly from the vocabulary "
        "(special tokens excluded), as data.recall's rows are, but here inside text",
    )
    args = p.parse_args()
    stream = TokenDataset.open(args.dataset).tokens("val", args.language)
    tokens = np.asarray(stream[0 : len(stream)])
    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
    print("| model | " + " | ".join(f"copy acc @{n} (d {d}) / chance" for n, d in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for path in args.models:
        model = load_hf(path, dtype="float32")
        tokenizer = Tokenizer.from_dir(path)
        specials = sorted(tokenizer.tk.token_to_id(t) for t in tokenizer.special_tokens)
        vocab = np.setdiff1d(np.arange(model.cfg.require_vocab_size()), specials)
        cells = [
            copy_accuracy(model, tokens, n, d, args.span, args.windows, args.seed, args.source, vocab)
            for n, d in cases
        ]
        print(f"| {path} | " + " | ".join(f"{c:.3f} / {f:.3f}" for c, f in cells) + " |")


if __name__ == "__main__":
    main()

"""How our tokenizers fare in llama.cpp (issue 16, docs/gguf.md): lines that tokenize differently, and tokens.

    python benchmarks/gguf_tokenizers.py DIR [DIR ...]    # tokenizer dirs, e.g. $TULPAR_HOME/tokenizers/tiny

For each tokenizer and each FLORES-200 devtest language (kk, ru, en: 1,012 lines each) it encodes every line with
our tokenizer and with the tokenizer llama.cpp would build from the same vocabulary and merges under each named
pre-tokenizer we can emulate (`llm_core.export_gguf.llama_cpp_tokenizer`: llama-bpe, qwen2, gpt-2 — their regex,
no normalizer, their ignore_merges), and counts the lines whose ids differ. The closest name is the one with
the fewest. It also prints the FLORES token count per language under our own tokenizer. Prints markdown tables.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from llm_core.export_gguf import LLAMA_CPP_PRE_TOKENIZERS, llama_cpp_differences, llama_cpp_tokenizer  # noqa: E402
from llm_core.tokenizer import Tokenizer  # noqa: E402

FLORES = {"kk": "kaz_Cyrl.devtest", "ru": "rus_Cyrl.devtest", "en": "eng_Latn.devtest"}


def flores_lines(data: Path) -> dict[str, list[str]]:
    root = data / "eval" / "parallel" / "flores200_devtest"
    return {lang: (root / f).read_text(encoding="utf-8").splitlines() for lang, f in FLORES.items()}


def main(dirs: list[str]) -> None:
    data = Path(os.environ.get("TULPAR_DATA", REPO_ROOT.parent / "shared" / "data"))
    lines = flores_lines(data)
    mismatch_rows, token_rows = [], []
    for d in dirs:
        tok = Tokenizer.from_dir(d)
        name = Path(d).name
        ours = {lang: tok.encode_batch(texts) for lang, texts in lines.items()}
        token_rows.append(
            f"| {name} | " + " | ".join(f"{sum(map(len, ours[lang])):,}" for lang in FLORES) + " |"
        )
        for pre in LLAMA_CPP_PRE_TOKENIZERS:
            emulated = llama_cpp_tokenizer(tok, pre)
            cells = []
            for lang, texts in lines.items():
                theirs = [e.ids for e in emulated.encode_batch(texts, add_special_tokens=False)]
                differ = sum(a != b for a, b in zip(ours[lang], theirs))
                cells.append(f"{differ} / {len(texts)}")
            mismatch_rows.append(f"| {name} | {pre} | " + " | ".join(cells) + " |")
        diffs = llama_cpp_differences(tok)
        print(f"{name}: export check: {'passes' if not diffs else '; '.join(diffs)}", file=sys.stderr)
    print("| tokenizer | llama.cpp pre-tokenizer | kk lines differing | ru | en |")
    print("|---|---|---|---|---|")
    print("\n".join(mismatch_rows))
    print()
    print("| tokenizer | FLORES kk tokens | ru | en |")
    print("|---|---|---|---|")
    print("\n".join(token_rows))


if __name__ == "__main__":
    main(sys.argv[1:])

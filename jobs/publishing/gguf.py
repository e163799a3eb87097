"""GGUF writing for the command-line tools that offer it (jobs.export_gguf, jobs.publish --gguf,
jobs.merge_adapter --gguf): one tokenizer refusal, one way of surfacing the exporter's warnings."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


def refuse_tokenizer_mismatch(tokenizer, what: str) -> None:
    """Before anything is written: a ValueError when llama.cpp would tokenize `tokenizer` differently."""
    from llm_core.export_gguf import llama_cpp_differences

    differences = llama_cpp_differences(tokenizer)
    if differences:
        raise ValueError(
            f"llama.cpp would tokenize {what} differently ({'; '.join(differences)}): pass "
            "--allow-tokenizer-mismatch to export the GGUF anyway, train with pre_tokenizer: llama-bpe "
            "(docs/gguf.md), or drop --gguf"
        )


def write_gguf(model, tokenizer, path: Path, *, dtype: str, name: str, allow_tokenizer_mismatch: bool):
    """`llm_core.export_gguf.export_gguf`, with its warnings (what llama.cpp will tokenize differently when the
    mismatch is allowed) printed on stderr as `warning: ...`; returns its GgufExport."""
    from llm_core.export_gguf import export_gguf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_gguf(
            model, tokenizer, path, dtype=dtype, name=name, allow_tokenizer_mismatch=allow_tokenizer_mismatch
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return result

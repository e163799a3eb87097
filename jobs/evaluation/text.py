"""Bits-per-byte and perplexity per language on held-out text.

For one language of one text set, with documents d_1..d_n (non-blank lines by default):

    NLL  = sum over documents, over every token t of the document, of -ln P(t | <|endoftext|>, earlier tokens)
    bpb  = NLL / (sum of the documents' UTF-8 bytes) / ln 2
    ppl  = exp(NLL / number of scored tokens)                     (token-level: depends on the tokenizer)

Each document is conditioned on `<|endoftext|>` (how documents start in pretraining streams) and scored on its own
tokens only: the separator, line breaks and a final end-of-text are neither scored nor counted as bytes. Documents
longer than the scoring window are scored in windows (llm_core.scoring: disjoint by default, sliding with a
stride), every token exactly once. bpb divides by bytes of text, not tokens, so models with different tokenizers
compare fairly; ppl does not. `text_sha256` identifies the documents scored (their UTF-8 text, each followed by a
NUL byte), so results of different models can be checked to come from the same text.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.evaluation.config import TextSetSpec
from jobs.evaluation.lm import LMEvaluator
from jobs.platform.runtime import REPO_ROOT, Settings
from llm_core.tokenizer_eval import read_lines


@dataclass
class TextResult:
    set: str
    language: str
    file: str
    docs: int
    bytes: int
    text_sha256: str
    tokens: int
    nll: float  # nats, summed
    bpb: float
    ppl: float

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_path(path: str, settings: Settings) -> Path:
    """Absolute paths as given; relative ones under TULPAR_DATA, else the working directory, else the repository
    (configs/eval/tiny.yaml names the fixtures in configs/eval/fixtures). A path found nowhere is reported under TULPAR_DATA."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for candidate in (settings.data / p, p, REPO_ROOT / p):
        if candidate.exists():
            return candidate.resolve()
    return settings.data / p


def read_documents(path: Path, unit: str, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """The documents of one eval file; a missing, non-UTF-8 or empty file is a ValueError naming it."""
    if not path.is_file():
        raise ValueError(
            f"eval text file {path} does not exist: fix the path (relative paths are under TULPAR_DATA)"
        )
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i} is not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise ValueError(f"{path}:{i} has no string field {text_field!r}: set text_field")
            docs.append(rec[text_field])
    else:
        lines = read_lines(path)
        if unit == "line":
            docs = [line for line in lines if line.strip()]
        elif unit == "paragraph":
            docs, cur = [], []
            for line in [*lines, ""]:
                if line.strip():
                    cur.append(line)
                elif cur:
                    docs.append("\n".join(cur))
                    cur = []
        else:
            docs = ["\n".join(lines)] if any(line.strip() for line in lines) else []
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"eval text file {path} is empty (no non-blank {unit}s): give a file with text")
    return docs[:max_docs] if max_docs else docs


def documents_sha256(docs: list[str]) -> str:
    """sha256 of the documents' UTF-8 text, each followed by a NUL byte (so a document boundary counts)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8") + b"\0")
    return h.hexdigest()


def evaluate_text_set(spec: TextSetSpec, ev: LMEvaluator, settings: Settings) -> list[TextResult]:
    out = []
    for lang, file in spec.files.items():
        path = resolve_path(file, settings)
        docs = read_documents(path, spec.unit, spec.text_field, spec.max_docs)
        scores = ev.score_documents(docs)
        nll = -sum(s.logprob for s in scores)
        n_tokens = sum(s.tokens for s in scores)
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        out.append(
            TextResult(
                set=spec.name,
                language=lang,
                file=str(path),
                docs=len(docs),
                bytes=n_bytes,
                text_sha256=documents_sha256(docs),
                tokens=n_tokens,
                nll=nll,
                bpb=nll / n_bytes / math.log(2),
                ppl=math.exp(min(nll / max(n_tokens, 1), 700.0)),
            )
        )
    return out


def text_metrics(results: list[TextResult]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    by_set: dict[str, list[TextResult]] = {}
    for r in results:
        metrics[f"bpb/{r.set}/{r.language}"] = r.bpb
        metrics[f"ppl/{r.set}/{r.language}"] = r.ppl
        by_set.setdefault(r.set, []).append(r)
    for name, rs in by_set.items():  # unweighted mean over languages
        metrics[f"bpb/{name}/avg"] = sum(r.bpb for r in rs) / len(rs)
        metrics[f"ppl/{name}/avg"] = sum(r.ppl for r in rs) / len(rs)
    return metrics

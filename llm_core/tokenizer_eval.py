"""Tokenizer efficiency on parallel text: loading any tokenizer, reading aligned eval files, and the metrics.

A tokenizer is anything HF `tokenizers` can run: a `tokenizer.json`, a Hugging Face model directory, or a hub
id (downloaded through `transformers`, so only when online). Everything is counted without special tokens
(`add_special_tokens=False`), one line of the eval file at a time, which is how the reference figures in
`TULPAR_DATA/SOURCES.md` were made (FLORES-200 devtest: Qwen3 kk 83,173, ...).

Metrics per tokenizer x language (`TokenizerMetrics`):

- `tokens`: total tokens over all lines;
- `fertility`: tokens per word, words being whitespace-separated strings (`str.split()`);
- `chars_per_token`, `bytes_per_token`: characters / UTF-8 bytes of the text per token;
- `parity`: tokens of this language / tokens of the pivot language (English) on the same lines (parallel text
  only; 1.0 means "as cheap as English");
- `byte_fallback_share`: share of tokens that stand for one raw byte of a multi-byte character: SentencePiece
  byte-fallback tokens (`<0xD2>`) or a lone non-ASCII byte of a byte-level BPE;
- `split_3plus_share`: share of words whose characters are covered by 3 or more tokens (a token spanning
  several words counts once for each);
- `roundtrip_rate`: share of lines with decode(encode(line)) == line (special tokens kept in decode);
- `vocab_used`, `vocab_used_share`: distinct token ids used on this text, and that over the vocabulary size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ------------------------------------------------------------------ tokenizers


@dataclass
class LoadedTokenizer:
    """A tokenizer to measure: the HF `tokenizers` object, its display name and where it came from."""

    name: str
    tk: HFTokenizer
    source: str
    _token_bytes: list[bytes | None] | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_bytes(self) -> list[bytes | None]:
        """UTF-8 bytes each token id stands for (None for ids with no token), computed once."""
        if self._token_bytes is None:
            self._token_bytes = token_bytes_table(self.tk)
        return self._token_bytes


def _bytes_to_unicode() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table used by ByteLevel pre-tokenizers."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _components(node: dict | None, key: str) -> list[dict]:
    """A normalizer/pre-tokenizer/decoder JSON node flattened (Sequence nodes expanded)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(key, []) for c in _components(child, key)]
    return [node]


def token_bytes_table(tk: HFTokenizer) -> list[bytes | None]:
    """The bytes of every token id: byte-level BPEs (GPT-2 alphabet) are mapped back to bytes; SentencePiece
    style vocabularies read `<0xNN>` as that byte and `▁` as a space; added tokens are their UTF-8 content."""
    pre = json.loads(tk.pre_tokenizer.__getstate__()) if tk.pre_tokenizer is not None else None
    dec = json.loads(tk.decoder.__getstate__()) if tk.decoder is not None else None
    byte_level = any(c.get("type") == "ByteLevel" for c in _components(pre, "pretokenizers")) or any(
        c.get("type") == "ByteLevel" for c in _components(dec, "decoders")
    )
    inverse = _bytes_to_unicode() if byte_level else {}
    size = tk.get_vocab_size(with_added_tokens=True)
    table: list[bytes | None] = [None] * size
    added = {i: t.content for i, t in tk.get_added_tokens_decoder().items()}
    for token, i in tk.get_vocab(with_added_tokens=True).items():
        if i >= size:
            continue
        if i in added:
            table[i] = added[i].encode("utf-8")
        elif byte_level and all(ch in inverse for ch in token):
            table[i] = bytes(inverse[ch] for ch in token)
        elif m := _BYTE_FALLBACK.match(token):
            table[i] = bytes([int(m.group(1), 16)])
        else:
            table[i] = token.replace("▁", " ").removeprefix("##").encode("utf-8")
    return table


def _read_tokenizer_json(file: Path, name: str) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a plain Exception for any bad content
        try:  # say whether the file is broken JSON or JSON that is not a tokenizer
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as bad:
            raise ValueError(
                f"tokenizer {name!r}: {file} is not valid JSON ({bad}): re-download or re-train it"
            ) from None
        raise ValueError(
            f"tokenizer {name!r}: {file} is not a tokenizer HF `tokenizers` can load ({exc}): "
            "re-download or re-train it"
        ) from None


def _from_transformers(name: str, where: str, revision: str | None = None) -> HFTokenizer:
    """A fast tokenizer through `transformers.AutoTokenizer` (a model dir without tokenizer.json, or a hub id)."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(where, revision=revision)
    except Exception as exc:  # OSError offline / unknown repo, ValueError for unsupported files, ...
        raise ValueError(
            f"tokenizer {name!r}: could not load {where!r} with transformers.AutoTokenizer ({exc}). For a hub "
            "id you must be online (or have it in the HF cache); otherwise pass a tokenizer.json or model dir"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer {name!r}: {where!r} loads only as a slow (Python) tokenizer: convert it to a "
            "tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir))"
        )
    return backend


def load_tokenizer(
    name: str,
    path: str | Path | None = None,
    hub_id: str | None = None,
    *,
    revision: str | None = None,
    search_dirs: Sequence[Path] = (),
) -> LoadedTokenizer:
    """Load a tokenizer from a tokenizer.json, a directory (HF model dir or a Tulpar tokenizer dir) or a hub id.

    A relative `path` is looked up as given, then under each of `search_dirs` (e.g. $TULPAR_HOME/tokenizers,
    $TULPAR_DATA/tokenizers). Missing or unreadable files raise ValueError naming the file.
    """
    if (path is None) == (hub_id is None):
        raise ValueError(f"tokenizer {name!r}: give exactly one of path or hub_id")
    if hub_id is not None:
        return LoadedTokenizer(name, _from_transformers(name, hub_id, revision), f"hub:{hub_id}")
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [p, *(Path(d) / p for d in search_dirs)]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        looked = ", ".join(str(c) for c in candidates)
        raise ValueError(
            f"tokenizer {name!r}: {str(path)!r} not found (looked at {looked}): train it (make tokenizer), "
            "fix the path, or set TULPAR_DATA / TULPAR_HOME"
        )
    if found.is_dir():
        file = found / "tokenizer.json"
        if file.is_file():
            return LoadedTokenizer(name, _read_tokenizer_json(file, name), str(file.resolve()))
        if not any((found / f).is_file() for f in ("tokenizer_config.json", "tokenizer.model", "vocab.json")):
            raise ValueError(
                f"tokenizer {name!r}: directory {found} has no tokenizer.json (nor tokenizer_config.json, "
                "tokenizer.model or vocab.json): point at a tokenizer.json or a Hugging Face model directory"
            )
        return LoadedTokenizer(name, _from_transformers(name, str(found)), str(found.resolve()))
    return LoadedTokenizer(name, _read_tokenizer_json(found, name), str(found.resolve()))


# ------------------------------------------------------------------ eval text


@dataclass
class EvalText:
    """Lines of text per language. `parallel`: line i of every language is the same content (FLORES, NTREX),
    which is what makes parity meaningful."""

    name: str
    lines: dict[str, list[str]]
    parallel: bool = True
    files: dict[str, str] = field(default_factory=dict)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split on "\\n" only (no other Unicode line breaks), without the final
    empty string after a trailing newline, and without "\\r"."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"eval file {path} is not UTF-8 ({exc.reason} at byte {exc.start}): fix it"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def load_parallel(name: str, files: dict[str, Path]) -> EvalText:
    """Read one aligned file per language; missing files and different line counts are ValueErrors."""
    missing = {lang: p for lang, p in files.items() if not Path(p).is_file()}
    if missing:
        lang, p = next(iter(missing.items()))
        raise ValueError(
            f"eval set {name!r} has no file for language {lang!r}: {p} does not exist. Add the file, set the "
            f"eval set's files.{lang}, or drop {lang!r} from languages"
        )
    lines = {lang: read_lines(Path(p)) for lang, p in files.items()}
    counts = {lang: len(v) for lang, v in lines.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{files[lang]}: {n} lines" for lang, n in counts.items())
        raise ValueError(
            f"eval set {name!r} is not aligned: parallel files must have the same number of lines ({detail}). "
            "Use the matching files of one release"
        )
    if not any(counts.values()):
        raise ValueError(f"eval set {name!r}: files {sorted(map(str, files.values()))} are empty")
    return EvalText(name, lines, parallel=True, files={k: str(v) for k, v in files.items()})


# ------------------------------------------------------------------ metrics


@dataclass
class TokenizerMetrics:
    eval_set: str
    tokenizer: str
    language: str
    lines: int
    words: int
    chars: int
    bytes: int
    tokens: int
    fertility: float
    chars_per_token: float
    bytes_per_token: float
    parity: float | None
    byte_fallback_share: float
    split_3plus_share: float
    roundtrip_rate: float
    vocab_used: int
    vocab_used_share: float
    vocab_size: int

    def to_dict(self) -> dict:
        return asdict(self)


_WORD = re.compile(r"\S+")


def _is_partial_byte(b: bytes | None) -> bool:
    """One byte that is not a whole character: a lone byte >= 0x80 (UTF-8 lead or continuation byte)."""
    return b is not None and len(b) == 1 and b[0] >= 0x80


def count_tokens(tok: LoadedTokenizer, lines: Sequence[str]) -> int:
    """Total tokens over the lines, no special tokens."""
    return sum(len(e.ids) for e in tok.tk.encode_batch(list(lines), add_special_tokens=False))


def measure(tok: LoadedTokenizer, text: EvalText, language: str, batch_size: int = 256) -> TokenizerMetrics:
    """Every metric of one tokenizer on one language of an eval text (parity is filled in by `add_parity`)."""
    lines = text.lines[language]
    table = tok.token_bytes()
    tokens = words = chars = n_bytes = fallback = split3 = roundtrip = 0
    used: set[int] = set()
    for start in range(0, len(lines), batch_size):
        batch = lines[start : start + batch_size]
        encs = tok.tk.encode_batch(batch, add_special_tokens=False)
        decoded = tok.tk.decode_batch([e.ids for e in encs], skip_special_tokens=False)
        for line, enc, back in zip(batch, encs, decoded):
            ids = enc.ids
            tokens += len(ids)
            chars += len(line)
            n_bytes += len(line.encode("utf-8"))
            roundtrip += back == line
            used.update(ids)
            fallback += sum(1 for i in ids if i < len(table) and _is_partial_byte(table[i]))
            # words covered by >= 3 tokens: sweep token character spans against word spans
            spans = [(m.start(), m.end()) for m in _WORD.finditer(line)]
            words += len(spans)
            offsets = enc.offsets
            t = 0
            for ws, we in spans:
                while t < len(offsets) and offsets[t][1] <= ws:
                    t += 1
                k, n = t, 0
                while k < len(offsets) and offsets[k][0] < we:
                    if offsets[k][1] > offsets[k][0]:  # zero-width tokens cover nothing
                        n += 1
                    k += 1
                split3 += n >= 3
    return TokenizerMetrics(
        eval_set=text.name,
        tokenizer=tok.name,
        language=language,
        lines=len(lines),
        words=words,
        chars=chars,
        bytes=n_bytes,
        tokens=tokens,
        fertility=tokens / words if words else float("nan"),
        chars_per_token=chars / tokens if tokens else float("nan"),
        bytes_per_token=n_bytes / tokens if tokens else float("nan"),
        parity=None,
        byte_fallback_share=fallback / tokens if tokens else 0.0,
        split_3plus_share=split3 / words if words else 0.0,
        roundtrip_rate=roundtrip / len(lines) if lines else 1.0,
        vocab_used=len(used),
        vocab_used_share=len(used) / tok.vocab_size,
        vocab_size=tok.vocab_size,
    )


def add_parity(rows: list[TokenizerMetrics], pivot: str) -> None:
    """Set `parity` = tokens / tokens of the pivot language, per eval set and tokenizer (parallel sets only;
    the caller passes only rows of parallel sets)."""
    pivot_tokens = {(r.eval_set, r.tokenizer): r.tokens for r in rows if r.language == pivot}
    for r in rows:
        base = pivot_tokens.get((r.eval_set, r.tokenizer))
        r.parity = r.tokens / base if base else None

"""Multiple-choice suites scored by log-likelihood, zero- or few-shot.

Each item becomes a prompt (few-shot examples, then the item) and one continuation per choice; the model's answer is
the choice with the highest log P(continuation | prompt) (`acc`), or the highest log-likelihood per character of
the continuation (`acc_norm`, as lm-evaluation-harness computes it). `random` is the expected accuracy of guessing
uniformly: the mean of 1 / number of choices.

Formats (column presets, each overridable with `fields`):

| format   | passage        | question | choices                         | answer                      |
|----------|----------------|----------|---------------------------------|-----------------------------|
| generic  |                | question | choices (a list)                | answer (auto)               |
| belebele | flores_passage | question | mc_answer1..mc_answer4          | correct_answer_num (1-based)|
| mmlu     |                | question | choices (a list)                | answer (0-based or letter)  |
| mmlu_csv |                | column 0 | columns 1-4 (no header row)     | column 5 (letter)           |
| ceval    |                | question | A, B, C, D                      | answer (letter)             |
| cmmlu    |                | Question | A, B, C, D                      | Answer (letter)             |
| kazmmlu  |                | Question | Option A..Option E (blank ones dropped) | Answer Key (letter) |

Files: .jsonl, .json (a list of records), .csv/.tsv (header row, except mmlu_csv), .parquet; or a Hugging Face Hub
dataset (`hub:`), downloaded with huggingface_hub when online.
"""

from __future__ import annotations

import ast
import csv
import fnmatch
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from jobs.evaluation.config import HubSpec, MCSuiteSpec
from jobs.evaluation.lm import LMEvaluator
from jobs.evaluation.text import resolve_path
from jobs.platform.runtime import Settings

log = logging.getLogger("tulpar.eval")

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

FORMATS: dict[str, dict[str, Any]] = {
    "generic": {"question": "question", "choices": "choices", "answer": "answer", "answer_format": "auto"},
    "belebele": {
        "passage": "flores_passage",
        "question": "question",
        "choices": [f"mc_answer{i}" for i in range(1, 5)],
        "answer": "correct_answer_num",
        "answer_format": "index1",
    },
    "mmlu": {"question": "question", "choices": "choices", "answer": "answer", "answer_format": "auto"},
    "mmlu_csv": {"question": "0", "choices": ["1", "2", "3", "4"], "answer": "5", "answer_format": "letter"},
    "ceval": {"question": "question", "choices": list("ABCD"), "answer": "answer", "answer_format": "letter"},
    "cmmlu": {"question": "Question", "choices": list("ABCD"), "answer": "Answer", "answer_format": "letter"},
    "kazmmlu": {
        "question": "Question",
        "choices": [f"Option {c}" for c in "ABCDE"],
        "answer": "Answer Key",
        "answer_format": "letter",
        "drop_empty_choices": True,
    },
}

# (passage, question, answer) labels of the prompt, per language
LABELS = {
    "kk": ("Мәтін", "Сұрақ", "Жауап"),
    "ru": ("Текст", "Вопрос", "Ответ"),
    "en": ("Passage", "Question", "Answer"),
}


class UnavailableError(ValueError):
    """A suite's hub data could not be downloaded (offline, missing repository, no access)."""


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int
    passage: str | None = None
    source: str = ""  # file:row, for error messages and predictions


@dataclass
class MCResult:
    suite: str
    language: str
    format: str
    num_fewshot: int
    n: int
    acc: float
    acc_norm: float
    random: float
    source: str
    predictions: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "predictions"}


# ------------------------------------------------------------------ reading records


def read_records(path: Path, *, header: bool = True) -> list[dict[str, Any]]:
    """Records of a .jsonl/.json/.csv/.tsv/.parquet file; CSV without a header gets columns "0", "1", ..."""
    if not path.is_file():
        raise ValueError(f"multiple-choice file {path} does not exist: fix the suite's path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{i} is not valid JSON ({exc.msg})") from None
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise ValueError(f"{path} must hold a list of records (or {{'data': [...]}})")
        elif suffix in (".csv", ".tsv"):
            delim = "\t" if suffix == ".tsv" else ","
            with path.open(encoding="utf-8-sig", newline="") as f:
                if header:
                    rows = [dict(r) for r in csv.DictReader(f, delimiter=delim)]
                else:
                    rows = [{str(i): v for i, v in enumerate(r)} for r in csv.reader(f, delimiter=delim) if r]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise ValueError(
                f"multiple-choice file {path}: unsupported type {suffix!r} (use {DATA_EXTENSIONS})"
            )
    except UnicodeDecodeError as exc:
        raise ValueError(f"multiple-choice file {path} is not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"multiple-choice file {path} is not valid JSON ({exc.msg})") from None
    if any(not isinstance(r, dict) for r in rows):
        raise ValueError(f"multiple-choice file {path}: every record must be an object with named fields")
    return rows


def resolved_fields(spec: MCSuiteSpec) -> dict[str, Any]:
    preset = dict(FORMATS[spec.format])
    preset.update({k: v for k, v in spec.fields.model_dump().items() if v is not None})
    return preset


def _parse_answer(value: Any, choices: list[str], fmt: str, where: str, column: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: the answer column {column!r} is empty")
    raw = value.strip() if isinstance(value, str) else value
    if fmt == "auto":
        if isinstance(raw, bool):
            fmt = "text"
        elif isinstance(raw, int | float) or (isinstance(raw, str) and raw.isdigit()):
            fmt = "index0"
        elif isinstance(raw, str) and len(raw) == 1 and raw.upper() in LETTERS:
            fmt = "letter"
        else:
            fmt = "text"
    try:
        if fmt in ("index0", "index1"):
            idx = int(float(raw)) - (1 if fmt == "index1" else 0)
        elif fmt == "letter":
            letter = str(raw).strip().strip("().").upper()
            if len(letter) != 1 or letter not in LETTERS:
                raise ValueError
            idx = LETTERS.index(letter)
        else:
            idx = choices.index(str(raw))
    except ValueError:
        raise ValueError(
            f"{where}: answer {value!r} is not a valid {fmt} answer for {len(choices)} choices "
            "(set fields.answer_format: index0, index1, letter or text)"
        ) from None
    if not 0 <= idx < len(choices):
        raise ValueError(f"{where}: answer {value!r} points outside the {len(choices)} choices")
    return idx


def _choices_of(record: dict, spec: Any, where: str, drop_empty: bool) -> list[str]:
    if isinstance(spec, list):
        missing = [c for c in spec if c not in record]
        if missing and not drop_empty:
            raise ValueError(
                f"{where}: missing choice columns {missing} (has {sorted(record)}): set fields.choices"
            )
        values = [record.get(c) for c in spec]
    else:
        if spec not in record:
            raise ValueError(
                f"{where}: no choices column {spec!r} (has {sorted(record)}): set fields.choices"
            )
        values = record[spec]
        if isinstance(values, str):  # a list stored as text (CSV)
            try:
                values = json.loads(values)
            except json.JSONDecodeError:
                try:
                    values = ast.literal_eval(values)
                except (ValueError, SyntaxError):
                    raise ValueError(f"{where}: choices {values[:80]!r} are not a list") from None
        if not isinstance(values, list | tuple):
            raise ValueError(f"{where}: choices must be a list, got {type(values).__name__}")
    choices = ["" if v is None else str(v).strip() for v in values]
    if drop_empty:
        choices = [c for c in choices if c]
    elif any(not c for c in choices):
        raise ValueError(f"{where}: a choice is empty (choices: {choices})")
    return choices


def parse_items(records: list[dict], spec: MCSuiteSpec, source: str) -> list[MCItem]:
    """Records -> MCItems; missing columns, bad answers and uneven choice counts are ValueErrors naming source."""
    if not records:
        raise ValueError(f"multiple-choice suite {spec.name!r}: {source} has no items: give a non-empty file")
    f = resolved_fields(spec)
    drop_empty = bool(f.get("drop_empty_choices"))
    items = []
    for i, rec in enumerate(records, 1):
        where = f"{source} item {i}"
        for key in ("question", "answer"):
            if f[key] not in rec:
                raise ValueError(
                    f"{where}: no {key} column {f[key]!r} (columns: {sorted(rec)}): set fields.{key} or choose "
                    f"the right format (now {spec.format!r})"
                )
        choices = _choices_of(rec, f["choices"], where, drop_empty)
        if len(choices) < 2:
            raise ValueError(f"{where}: needs at least 2 choices, has {len(choices)}")
        answer = _parse_answer(rec[f["answer"]], choices, f["answer_format"], where, f["answer"])
        passage = None
        if f.get("passage"):
            if f["passage"] not in rec:
                raise ValueError(f"{where}: no passage column {f['passage']!r} (columns: {sorted(rec)})")
            passage = str(rec[f["passage"]])
        items.append(MCItem(str(rec[f["question"]]).strip(), choices, answer, passage, f"{source}:{i}"))
    variable = spec.allow_variable_choices if spec.allow_variable_choices is not None else drop_empty
    counts = sorted({len(it.choices) for it in items})
    if len(counts) > 1 and not variable:
        first = items[0]
        odd = next(it for it in items if len(it.choices) != len(first.choices))
        raise ValueError(
            f"multiple-choice suite {spec.name!r}: choices of different counts in {source}: {first.source} has "
            f"{len(first.choices)}, {odd.source} has {len(odd.choices)}. Fix the data, or set "
            "allow_variable_choices: true"
        )
    return items


# ------------------------------------------------------------------ the hub


def select_hub_files(files: list[str], subsets: list[str], split: str) -> list[str]:
    """The data files of one split of the given subsets in a dataset repository's file list.

    A subset matches a directory name or a file-name stem (shell patterns allowed); a file belongs to `split` when
    a directory is named after it or its stem starts with it (`test-00000-of-00001`, `test`). When the matching
    files name no split at all (one file per subset, e.g. Belebele), all of them are taken."""
    data = [f for f in files if f.lower().endswith(DATA_EXTENSIONS) and not f.startswith(".")]

    def parts(f: str) -> list[str]:
        p = PurePosixPath(f)
        return [*p.parent.parts, p.name.split(".")[0]]

    if subsets:
        data = [f for f in data if any(fnmatch.fnmatchcase(x, s) for x in parts(f) for s in subsets)]

    def in_split(f: str, s: str) -> bool:
        p = PurePosixPath(f)
        stem = p.name.split(".")[0]
        return (
            s in p.parent.parts or stem == s or stem.startswith((f"{s}-", f"{s}_")) or stem.endswith(f"_{s}")
        )

    chosen = [f for f in data if in_split(f, split)]
    if chosen:
        return sorted(chosen)
    splits = ("train", "validation", "val", "dev", "test")
    return sorted(f for f in data if not any(in_split(f, s) for s in splits))


def hub_records(hub: HubSpec, split: str) -> tuple[list[dict], str]:
    """Download and read the records of one split of a hub dataset (huggingface_hub; needs internet)."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    source = f"hf://datasets/{hub.repo_id}"
    revisions = [hub.revision] if hub.revision else [None, "refs/convert/parquet"]
    chosen, revision = [], None
    for revision in revisions:
        files = api.list_repo_files(hub.repo_id, repo_type="dataset", revision=revision)
        chosen = select_hub_files(files, hub.subsets, split)
        if chosen:
            break
    if not chosen:
        raise ValueError(
            f"{source}: no data files for subsets {hub.subsets or 'all'} and split {split!r}: check hub.subsets "
            "and hub.split"
        )
    rows: list[dict] = []
    for f in chosen:
        local = hf_hub_download(hub.repo_id, f, repo_type="dataset", revision=revision)
        rows.extend(read_records(Path(local)))
    return rows, f"{source} ({', '.join(chosen[:3])}{', ...' if len(chosen) > 3 else ''})"


_hub_unreachable: list[str] = []  # the first connection error, so later suites do not wait for it again


def _download(spec: MCSuiteSpec, split: str) -> tuple[list[dict], str]:
    assert spec.hub is not None
    if _hub_unreachable:
        raise UnavailableError(
            f"multiple-choice suite {spec.name!r}: the Hugging Face Hub is unreachable ({_hub_unreachable[0]}): "
            "set path to a local copy, or skip_unavailable: true"
        )
    try:
        return hub_records(spec.hub, split)
    except ValueError:
        raise
    except Exception as exc:  # network, authentication, missing repository
        if "Connect" in type(exc).__name__ or "Offline" in type(exc).__name__:
            _hub_unreachable.append(type(exc).__name__)
        raise UnavailableError(
            f"multiple-choice suite {spec.name!r}: cannot load split {split!r} of hf://datasets/{spec.hub.repo_id} "
            f"({type(exc).__name__}: {str(exc)[:200]}): check the repository and the network (offline machines "
            "need a local copy: set path), or set skip_unavailable: true"
        ) from None


def load_suite(spec: MCSuiteSpec, settings: Settings) -> tuple[list[MCItem], list[MCItem], str]:
    """(items, few-shot pool, source description). The pool is empty when few-shot examples come from the items."""
    header = spec.format != "mmlu_csv"
    fewshot: list[MCItem] = []
    if spec.path is not None:
        path = resolve_path(spec.path, settings)
        source = str(path)
        items = parse_items(read_records(path, header=header), spec, source)
    else:
        assert spec.hub is not None
        records, source = _download(spec, spec.hub.split)
        items = parse_items(records, spec, source)
        if spec.num_fewshot and spec.hub.fewshot_split:
            shot_records, shot_source = _download(spec, spec.hub.fewshot_split)
            fewshot = parse_items(shot_records, spec, shot_source)
    if spec.num_fewshot and spec.fewshot_path:
        path = resolve_path(spec.fewshot_path, settings)
        fewshot = parse_items(read_records(path, header=header), spec, str(path))
    if spec.max_items:
        items = items[: spec.max_items]
    return items, fewshot, source


# ------------------------------------------------------------------ prompts and scoring


def render(item: MCItem, spec: MCSuiteSpec) -> tuple[str, list[str]]:
    """(prompt for the item, continuation per choice) without few-shot examples."""
    p_label, q_label, a_label = LABELS.get(spec.language, LABELS["en"])
    lines = []
    if item.passage:
        lines.append(f"{p_label}: {item.passage.strip()}")
    lines.append(f"{q_label}: {item.question}")
    if spec.style == "letters":
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
        conts = [f" {LETTERS[i]}" for i in range(len(item.choices))]
    else:
        conts = [f" {c}" for c in item.choices]
    lines.append(f"{a_label}:")
    return "\n".join(lines), conts


def build_prompt(item: MCItem, index: int, items: list[MCItem], pool: list[MCItem], spec: MCSuiteSpec):
    """The item's full context (few-shot examples with their answers, then the item) and its continuations."""
    context, conts = render(item, spec)
    if spec.num_fewshot:
        candidates = pool if pool else [it for j, it in enumerate(items) if j != index]
        rng = random.Random(f"{spec.seed}:{index}")
        shots = rng.sample(candidates, min(spec.num_fewshot, len(candidates)))
        blocks = []
        for shot in shots:
            text, shot_conts = render(shot, spec)
            blocks.append(text + shot_conts[shot.answer])
        context = "\n\n".join([*blocks, context])
    return context, conts


def score_items(
    items: list[MCItem],
    pool: list[MCItem],
    spec: MCSuiteSpec,
    loglikelihood,
    *,
    source: str = "",
) -> MCResult:
    """Score a suite with `loglikelihood(pairs: list[(context, continuation)]) -> list[objects with .logprob]`."""
    pairs, owners = [], []
    prompts = []
    for i, item in enumerate(items):
        context, conts = build_prompt(item, i, items, pool, spec)
        prompts.append((context, conts))
        for j, c in enumerate(conts):
            pairs.append((context, c))
            owners.append((i, j))
    scores = loglikelihood(pairs)
    lls: list[list[float]] = [[0.0] * len(it.choices) for it in items]
    for (i, j), s in zip(owners, scores):
        lls[i][j] = float(s.logprob)
    correct = correct_norm = 0
    preds = []
    for i, item in enumerate(items):
        conts = prompts[i][1]
        pred = max(range(len(conts)), key=lambda j: lls[i][j])
        norm = [lls[i][j] / max(len(conts[j]), 1) for j in range(len(conts))]
        pred_norm = max(range(len(conts)), key=lambda j: norm[j])
        correct += pred == item.answer
        correct_norm += pred_norm == item.answer
        preds.append(
            {
                "source": item.source,
                "answer": item.answer,
                "pred": pred,
                "pred_norm": pred_norm,
                "loglikelihoods": [round(x, 4) for x in lls[i]],
            }
        )
    n = len(items)
    return MCResult(
        suite=spec.name,
        language=spec.language,
        format=spec.format,
        num_fewshot=spec.num_fewshot,
        n=n,
        acc=correct / n,
        acc_norm=correct_norm / n,
        random=sum(1 / len(it.choices) for it in items) / n,
        source=source,
        predictions=preds,
    )


def evaluate_suite(spec: MCSuiteSpec, ev: LMEvaluator, settings: Settings) -> MCResult | None:
    try:
        items, pool, source = load_suite(spec, settings)
    except UnavailableError as exc:
        if spec.skip_unavailable:
            log.warning("skipping multiple-choice suite %s: %s", spec.name, exc)
            return None
        raise
    return score_items(items, pool, spec, ev.loglikelihood, source=source)


def mc_metrics(results: list[MCResult]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k in ("acc", "acc_norm", "random", "n"):
            out[f"mc/{r.suite}/{k}"] = float(getattr(r, k))
    return out

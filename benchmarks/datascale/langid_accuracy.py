"""Language-ID accuracy per language on FLORES-200 devtest sentences: the lingua setup of fb78a74 vs a config's.

Every sentence goes through the preprocessing stage `jobs.prep.stages.langid_docs` as a document of a source
with `language: auto` and output languages kk, ru, en, i.e. the routing decision `jobs.prep.langid.decide`
makes. A kk/ru/en sentence is right when it is kept as its own language; a sentence of any other language is
right when it is not kept as kk, ru or en (dropped as language_other, language_uncertain or script_mismatch).

FLORES files are read from each `--flores-dir` (default $TULPAR_DATA/eval/parallel/flores200_devtest): every
`<code>_<Script>.devtest` there is used; kaz_Cyrl, rus_Cyrl and eng_Latn are kk, ru and en, every other file is
an "other" language. The setups compared are named by `--setup NAME=key=value,key=value` (LangIdConfig fields);
always compared: `lingua-fb78a74` (the lingua setup of commit fb78a74) and the `langid` section of `--config`
(default configs/preprocess/kk-ru-en.yaml, fastText + lingua).

    python -m benchmarks.datascale.langid_accuracy
    python -m benchmarks.datascale.langid_accuracy --flores-dir /path/to/more/devtest --no-append
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pyarrow as pa  # noqa: E402

from benchmarks.machine import append_section, cpu_model  # noqa: E402
from jobs.platform.runtime import Settings  # noqa: E402
from jobs.prep import stages  # noqa: E402
from jobs.prep.config import PreprocessConfig  # noqa: E402

OUTPUT_LANGUAGES = ["kk", "ru", "en"]
FLORES_CODES = {"kaz_Cyrl": "kk", "rus_Cyrl": "ru", "eng_Latn": "en"}
# LangIdConfig as it was at commit fb78a74: lingua, high-accuracy mode, these candidates, 600-character samples
BASELINE = {
    "method": "lingua",
    "candidates": ["kk", "ru", "en", "uk", "be", "fr", "de"],
    "min_confidence": 0.6,
    "max_chars": 600,
    "min_letters": 20,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks.datascale.langid_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--flores-dir", action="append", default=[], help="directory of *.devtest files (repeatable)"
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        help="NAME=JSON object of LangIdConfig fields, e.g. 'low={\"lingua_low_accuracy\": true}' (repeatable)",
    )
    p.add_argument(
        "--config", default="configs/preprocess/kk-ru-en.yaml", help="preprocess config whose langid to test"
    )
    p.add_argument("--limit", type=int, default=None, help="first N sentences per language")
    p.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    return p.parse_args(argv)


def load_flores(dirs: list[Path], limit: int | None) -> dict[str, tuple[str, list[str]]]:
    """code -> (expected: kk/ru/en or "other", sentences)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for d in dirs:
        if not d.is_dir():
            raise ValueError(
                f"--flores-dir {d} is not a directory: pass a folder of FLORES-200 *.devtest files"
            )
        for f in sorted(d.glob("*.devtest")):
            code = f.name.removesuffix(".devtest")
            lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            out.setdefault(code, (FLORES_CODES.get(code, "other"), lines[:limit]))
    missing = [c for c in FLORES_CODES if c not in out]
    if missing:
        raise ValueError(f"FLORES-200 devtest files {missing} not found in {[str(d) for d in dirs]}")
    return dict(sorted(out.items(), key=lambda kv: (kv[1][0] == "other", kv[0])))


def preprocess_config(langid: dict) -> PreprocessConfig:
    return PreprocessConfig.model_validate(
        {
            "name": "langid-accuracy",
            "languages": OUTPUT_LANGUAGES,
            "sources": [{"path": "flores", "language": "auto"}],
            "tokenizer": {"path": "unused"},
            "langid": langid,
        }
    )


def decisions(sentences: list[str], cfg: PreprocessConfig) -> tuple[list[str], list[str]]:
    """(final language, drop reason) per sentence, from the langid stage."""
    n = len(sentences)
    t = pa.table(
        {
            "lang": pa.array(["auto"] * n, pa.string()),
            "text": pa.array(sentences, pa.large_string()),
            "reason": pa.array([""] * n, pa.string()),
        }
    )
    out = stages.langid_docs(t, cfg)
    return out.column("lang").to_pylist(), out.column("reason").to_pylist()


def run(args: argparse.Namespace) -> str:
    settings = Settings.from_env()
    dirs = [Path(d) for d in args.flores_dir] or [settings.data / "eval" / "parallel" / "flores200_devtest"]
    data = load_flores(dirs, args.limit)
    from jobs.platform.configfile import load_config

    setups = {
        "lingua-fb78a74": BASELINE,
        Path(args.config).stem: load_config(PreprocessConfig, args.config).langid.model_dump(),
    }
    for s in args.setup:
        name, _, blob = s.partition("=")
        setups[name] = json.loads(blob)
    configs = {name: preprocess_config(over) for name, over in setups.items()}
    acc: dict[str, dict[str, float]] = {name: {} for name in configs}
    wrong: dict[str, dict[str, str]] = {name: {} for name in configs}
    speed: dict[str, float] = {}
    for name, cfg in configs.items():
        decisions(["warm up the detector with this sentence"], cfg)
        cpu = 0.0
        n_total = 0
        for code, (expected, sentences) in data.items():
            c0 = time.process_time()
            langs, reasons = decisions(sentences, cfg)
            cpu += time.process_time() - c0
            n_total += len(sentences)
            if expected == "other":
                ok = [bool(r) or lang not in OUTPUT_LANGUAGES for lang, r in zip(langs, reasons)]
            else:
                ok = [lang == expected and not r for lang, r in zip(langs, reasons)]
            acc[name][code] = sum(ok) / len(ok)
            errs: dict[str, int] = {}
            for good, lang, r in zip(ok, langs, reasons):
                if not good:
                    key = r or f"kept as {lang}"
                    errs[key] = errs.get(key, 0) + 1
            wrong[name][code] = ", ".join(f"{k} {v}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1]))
        speed[name] = n_total / cpu
        print(f"{name}: " + " ".join(f"{c} {a:.3f}" for c, a in acc[name].items()), flush=True)

    names = list(configs)
    header = "| FLORES-200 devtest | expected | " + " | ".join(names) + " | errors (" + names[-1] + ") |"
    rows = [header, "|---|---|" + "---:|" * len(names) + "---|"]
    for code, (expected, sentences) in data.items():
        cells = []
        for name in names:
            a = acc[name][code]
            worse = name != names[0] and a < acc[names[0]][code]
            cells.append(f"{a:.3f}{' (worse)' if worse else ''}")
        rows.append(
            f"| {code} ({len(sentences)}) | {expected} | "
            + " | ".join(cells)
            + f" | {wrong[names[-1]][code]} |"
        )
    rows.append("| sentences per CPU second | | " + " | ".join(f"{speed[n]:,.0f}" for n in names) + " | |")
    cmd = "python -m benchmarks.datascale.langid_accuracy " + shlex.join(
        sys.argv[1:] if args.argv is None else args.argv
    )
    section = "\n".join(
        [
            f"\n## Language-ID accuracy on FLORES-200 devtest ({datetime.now():%Y-%m-%d %H:%M})\n",
            f"- command: `{cmd.strip()}`; FLORES from {', '.join(str(d) for d in dirs)}",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}",
            "- each sentence is a document of an `auto` source routed by the langid stage (outputs kk, ru, en); "
            "right = kept as its own language (kk, ru, en) or not kept as kk/ru/en (other languages)",
            *[
                f"- setup `{n}`: {json.dumps(setups[n]) if setups[n] else 'LangIdConfig defaults'}"
                for n in names
            ],
            "",
            *rows,
            "",
        ]
    )
    print(section, flush=True)
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = argv
    section = run(args)
    if not args.no_append:
        print(f"appended to {append_section(section)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

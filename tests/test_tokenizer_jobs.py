"""Tokenizer training and comparison: exact reference counts, hand-computed metrics, bad inputs, the jobs end to
end, and the training options of llm_core.tokenizer (superwords, balanced sampling)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from jobs.platform.runtime import Settings, run_job
from jobs.reporting.tokenizers import EvalSetSpec, TokenizerRef
from jobs.tokenizer_report import ReportConfig
from llm_core.text import detect_txt_mode, iter_documents
from llm_core.tokenizer import SPECIAL_TOKENS as SPECIAL
from llm_core.tokenizer import DocumentSource, sample_balanced, train_bpe
from llm_core.tokenizer_eval import (
    EvalText,
    LoadedTokenizer,
    _bytes_to_unicode,
    add_parity,
    count_tokens,
    load_parallel,
    load_tokenizer,
    measure,
)
from tests.conftest import REPO

# TULPAR_DATA/SOURCES.md and issue 4: FLORES-200 devtest, 1012 lines, no special tokens.
FLORES_REFERENCE = {
    "qwen3": {"kk": 83_173, "ru": 48_471, "en": 27_621},
    "llama3": {"kk": 83_839, "ru": 43_916, "en": 27_171},
    "gemma3": {"kk": 55_263, "ru": 37_023, "en": 27_114},
}


def settings_for(data_dir: Path, home: Path) -> Settings:
    return Settings(data_dir, home, str(home), f"sqlite:///{home / 'mlflow.db'}", None)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the acceptance figures


def test_reference_tokenizers_reproduce_flores_totals_exactly(data_dir, tmp_path):
    settings = settings_for(data_dir, tmp_path)
    flores = EvalSetSpec.model_validate("flores200_devtest").load(settings, ["kk", "ru", "en"])
    assert {len(v) for v in flores.lines.values()} == {1012}
    got = {}
    for name in FLORES_REFERENCE:
        tok = TokenizerRef.model_validate(name).load(settings)  # found under TULPAR_DATA/tokenizers
        got[name] = {lang: count_tokens(tok, lines) for lang, lines in flores.lines.items()}
    assert got == FLORES_REFERENCE
    # the full metric path counts the same tokens
    gemma = TokenizerRef.model_validate("gemma3").load(settings)
    m = measure(gemma, flores, "kk")
    assert m.tokens == 55_263 and m.roundtrip_rate == 1.0 and m.lines == 1012


# ------------------------------------------------------------------ metrics on a hand-made case


def byte_level_toy() -> LoadedTokenizer:
    """Byte-level BPE: the 256 byte symbols plus merges a+b -> ab and Ġ+ab -> Ġab."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["ab"] = len(vocab)
    vocab["Ġab"] = len(vocab)
    tk = HFTokenizer(models.BPE(vocab, [("a", "b"), ("Ġ", "ab")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return LoadedTokenizer("toy", tk, "hand-made")


def test_metrics_computed_by_hand():
    toy = byte_level_toy()
    text = EvalText("hand", {"en": ["ab ab", "abc d"], "kk": ["әә", "abcab"]})
    rows = [measure(toy, text, "en"), measure(toy, text, "kk")]
    add_parity(rows, "en")
    en, kk = rows
    # en: "ab ab" -> ab Ġab (2); "abc d" -> ab c Ġ d (4). 4 words, 10 chars, 10 bytes.
    assert (en.tokens, en.words, en.chars, en.bytes) == (6, 4, 10, 10)
    assert en.fertility == pytest.approx(6 / 4)
    assert en.chars_per_token == pytest.approx(10 / 6) and en.bytes_per_token == pytest.approx(10 / 6)
    assert en.parity == pytest.approx(1.0)
    assert en.byte_fallback_share == 0.0
    assert en.split_3plus_share == 0.0  # abc: 2 tokens; d: 1 (the space token covers no letter of it)
    assert en.vocab_used == 5 and en.vocab_used_share == pytest.approx(5 / 258) and en.vocab_size == 258
    assert en.roundtrip_rate == 1.0
    # kk: "әә" is 4 bytes (D3 99 D3 99) -> 4 lone-byte tokens; "abcab" -> ab c ab. 2 words, 7 chars, 9 bytes.
    assert (kk.tokens, kk.words, kk.chars, kk.bytes) == (7, 2, 7, 9)
    assert kk.fertility == pytest.approx(3.5)
    assert kk.bytes_per_token == pytest.approx(9 / 7) and kk.chars_per_token == pytest.approx(1.0)
    assert kk.parity == pytest.approx(7 / 6)
    assert kk.byte_fallback_share == pytest.approx(4 / 7)
    assert kk.split_3plus_share == 1.0  # both words need >= 3 tokens
    assert kk.vocab_used == 4  # bytes D3 and 99, ab, c
    assert kk.roundtrip_rate == 1.0


def test_byte_fallback_tokens_of_a_sentencepiece_style_bpe():
    vocab = {"<unk>": 0, "<0xD3>": 1, "<0x99>": 2, "▁": 3, "a": 4, "▁a": 5}
    tk = HFTokenizer(models.BPE(vocab, [("▁", "a")], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = LoadedTokenizer("sp", tk, "hand-made")
    m = measure(tok, EvalText("hand", {"kk": ["ә a"]}, parallel=False), "kk")
    assert tk.encode("ә a").tokens == ["<0xD3>", "<0x99>", "▁a"]
    assert m.tokens == 3 and m.byte_fallback_share == pytest.approx(2 / 3) and m.roundtrip_rate == 1.0


def test_roundtrip_rate_counts_lines_that_do_not_come_back():
    tok = train_bpe(["Ақ киік, ақ бөкен; café, кафе"] * 20, 300, normalization="nfc")
    loaded = LoadedTokenizer("nfc", tok.tk, "trained")
    text = EvalText("rt", {"en": ["cafe\u0301", "café"]}, parallel=False)  # first line is not NFC
    assert measure(loaded, text, "en").roundtrip_rate == 0.5


# ------------------------------------------------------------------ bad input


def test_missing_and_corrupt_tokenizer_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="nowhere/tokenizer.json.*not found"):
        load_tokenizer("x", tmp_path / "nowhere" / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{bad}.*not valid JSON"):
        load_tokenizer("bad", bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"version": "1.0", "model": {"type": "Nope"}}', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{wrong}.*not a tokenizer"):
        load_tokenizer("wrong", wrong)
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="emptydir has no tokenizer.json"):
        load_tokenizer("d", empty_dir)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: after an earlier test imported it, only the constant
    # makes this process offline (else the hub is tried over the network, with retries: ~45 s here)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"(?s)tulpar-test/does-not-exist.*online"):
        load_tokenizer("hub", hub_id="tulpar-test/does-not-exist")


def test_language_without_eval_file_names_it(data_dir, tmp_path):
    settings = settings_for(data_dir, tmp_path)
    with pytest.raises(ValueError, match="no eval file for language 'xx'"):
        EvalSetSpec.model_validate("flores200_devtest").load(settings, ["kk", "xx"])
    # a preset language whose file is absent: the error names the path
    with pytest.raises(ValueError, match=r"language 'uz'.*uzn_Latn\.devtest does not exist"):
        EvalSetSpec.model_validate("flores200_devtest").load(settings, ["kk", "uz"])


def test_misaligned_parallel_files_name_both_files(tmp_path):
    (tmp_path / "a.kk").write_text("бір\nекі\nүш\n", encoding="utf-8")
    (tmp_path / "a.en").write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not aligned.*a\.kk: 3 lines.*a\.en: 2 lines"):
        load_parallel("toy", {"kk": tmp_path / "a.kk", "en": tmp_path / "a.en"})
    # "\u2028" inside a line is not a line break; a trailing newline adds no line
    (tmp_path / "b.kk").write_text("бір\u2028екі\nүш\n", encoding="utf-8")
    (tmp_path / "b.en").write_text("one two\nthree", encoding="utf-8")
    text = load_parallel("toy", {"kk": tmp_path / "b.kk", "en": tmp_path / "b.en"})
    assert [len(v) for v in text.lines.values()] == [2, 2]


def test_report_cli_bad_tokenizer_exits_2_naming_the_file(tmp_path, data_dir):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        "name: bad\ntokenizers:\n  - {name: ghost, path: /no/such/tokenizer.json}\neval_sets: [flores200_devtest]\n",
        encoding="utf-8",
    )
    env = {**os.environ, "TULPAR_HOME": str(tmp_path / "home"), "TULPAR_DATA": str(data_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(
        [sys.executable, "-m", "jobs.tokenizer_report", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "/no/such/tokenizer.json" in r.stderr and "Traceback" not in r.stderr
    assert last_json(r.stdout)["status"] == "error"


def test_config_errors():
    with pytest.raises(ValueError, match="unknown eval set 'wmt'"):
        EvalSetSpec.model_validate("wmt")
    with pytest.raises(ValueError, match="unique"):
        ReportConfig(name="x", tokenizers=["qwen3", "qwen3"])
    with pytest.raises(ValueError, match="exactly one of path or hub_id"):
        TokenizerRef(name="x")


# ------------------------------------------------------------------ training options


def test_superword_stage_learns_multiword_tokens_and_round_trips():
    words = [
        "in",
        "the",
        "middle",
        "of",
        "the",
        "night",
        "at",
        "the",
        "end",
        "of",
        "the",
        "day",
        "we",
        "said",
        "it's",
        "over",
    ]
    text = [" ".join(words[j % len(words) :] + words[: j % len(words)]) + f" {j}" for j in range(300)]
    tok = train_bpe(text, 360, pre_tokenizer="gpt2", digits="group3", superword_fraction=0.3)
    assert tok.vocab_size == 360
    pieces = [tok.tk.id_to_token(i) for i in tok.encode("in the middle of the night")]
    assert any(p.count("Ġ") >= 1 and not p.startswith("Ġ") or p.count("Ġ") >= 2 for p in pieces), pieces
    for line in text[:5] + ["12345 Қазақ тілі, ағылшын — 2024!", "  two  spaces\nnew line"]:
        assert tok.decode(tok.encode(line)) == line
    with pytest.raises(ValueError, match="superword merges need pre_tokenizer='gpt2'"):
        train_bpe(text, 400, pre_tokenizer="llama3", superword_fraction=0.2)


def test_phrase_superwords_take_punctuation_but_never_cross_a_sentence_end():
    sentences = [
        "Yes, and then we went home.",
        "Well, of course, and then we left!",
        "He said, of course, that we went home.",
        "Она сказала, что мы пошли домой.",
        "Ол айтты, біз үйге бардық.",
        "Then, of course, and then we went home?",
    ]
    text = [" ".join(sentences[j % 6 :] + sentences[: j % 6]) for j in range(300)]
    phrases = train_bpe(text, 420, pre_tokenizer="gpt2", digits="group3", superword_fraction=0.4)
    words = train_bpe(
        text, 420, pre_tokenizer="gpt2", digits="group3", superword_fraction=0.4, superword_span="words"
    )

    byte_of = _bytes_to_unicode()  # byte-level character -> byte

    def surfaces(tok):  # the text of every token; a cut multi-byte letter reads as \ufffd, kept as a letter
        raw = (bytes(byte_of[c] for c in tok.tk.id_to_token(i)) for i in range(len(SPECIAL), tok.vocab_size))
        return [r.decode("utf-8", errors="replace").replace("\ufffd", "x") for r in raw]

    # a sentence-final mark followed by more text inside one token would span two sentences
    crossing = re.compile(r"[.!?…][^\s\w]*\s*\w")
    assert not [t for t in surfaces(phrases) if crossing.search(t)]
    assert any(re.search(r"\w,\s\w", t) for t in surfaces(phrases))  # ", and", "course, and" ...
    assert any(re.search(r"\w[.!?]$", t) for t in surfaces(phrases))  # "home." ends a chunk
    assert not [t for t in surfaces(words) if re.search(r"[^\w\s'].*\s|\s.*[^\w\s']", t)]
    for line in text[:3] + ["U.S. — 12,5%?! «Да.» Ok...", "  two  spaces\nnew line"]:
        assert phrases.decode(phrases.encode(line)) == line
    assert len(phrases.encode(text[0])) < len(words.encode(text[0]))
    with pytest.raises(ValueError, match="superword_span"):
        train_bpe(text, 420, pre_tokenizer="gpt2", superword_fraction=0.2, superword_span="sentences")


def test_hard_wrapped_books_are_read_as_paragraphs(tmp_path):
    para = (
        "The prince was silent and looked indifferent. But, with the womanly and courtierlike quickness "
        "and tact habitual to her, Anna Pavlovna wished to rebuke him. "
    ) * 3
    wrapped = textwrap.fill(para.strip(), width=72)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join([wrapped] * 30) + "\n", encoding="utf-8")
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(f"Sentence number {i} is short." for i in range(100)) + "\n")
    assert detect_txt_mode(book) == "paragraph" and detect_txt_mode(sentences) == "line"
    docs = list(iter_documents(book, txt_mode="auto"))
    assert docs == [para.strip()] * 30  # wraps joined by spaces: one paragraph, as written
    assert list(iter_documents(book, txt_mode="blank_line"))[0] == wrapped
    assert len(list(iter_documents(sentences, txt_mode="auto"))) == 100
    with pytest.raises(ValueError, match="txt_mode 'pages'"):
        list(iter_documents(book, txt_mode="pages"))


def test_chat_sources_join_the_sample_by_language(tmp_path, data_dir):
    from jobs.tokenizer import TrainData, chat_sources
    from llm_core.data import DataError

    sft = tmp_path / "sft.jsonl"
    rows = [
        {"lang": "en", "instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"lang": "ru", "instruction": "Назовите цвет.", "input": "Любой", "output": "Синий."},
        {"lang": "de", "instruction": "Nenne eine Farbe.", "input": "", "output": "Blau."},
    ]
    sft.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    dpo = tmp_path / "dpo.jsonl"
    pair = {
        "lang": "en",
        "prompt": "\n\nHuman: hi\n\nAssistant:",
        "chosen": " Hello!",
        "rejected": " Go away.",
    }
    dpo.write_text(json.dumps(pair) + "\n")
    settings = settings_for(data_dir, tmp_path)
    cfg = TrainData(budgets={"en": 100, "ru": 100}, chat_sources=[str(sft), str(dpo)])
    sources = chat_sources(cfg, settings)
    docs = {lang: [d for s in srcs for d in s.open()] for lang, srcs in sources.items()}
    assert docs == {
        "en": ["Name a colour.\n\nBlue.", "hi\n\nHello!\n\nGo away."],
        "ru": ["Назовите цвет.\n\nЛюбой\n\nСиний."],
    }  # the German record is skipped: de is not in the budgets
    assert sources["ru"][0].size == len(docs["ru"][0].encode("utf-8"))
    bad = tmp_path / "nolang.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(DataError, match=r"nolang.jsonl:2: no 'lang' field"):
        chat_sources(TrainData(budgets={"en": 100}, chat_sources=[str(bad)]), settings)
    with pytest.raises(ValueError, match="missing.jsonl"):
        chat_sources(TrainData(budgets={"en": 100}, chat_sources=["sft/missing.jsonl"]), settings)


def test_digit_modes():
    text = ["year 2024 and 1234567 items"] * 50
    group3 = train_bpe(text, 300, pre_tokenizer="gpt2", digits="group3")
    single = train_bpe(text, 300, pre_tokenizer="llama3", digits="individual")
    assert max(len(group3.tk.id_to_token(i).strip("Ġ")) for i in group3.encode("1234567")) <= 3
    assert [single.tk.id_to_token(i) for i in single.encode("2024")] == ["2", "0", "2", "4"]


def test_balanced_sample_budgets_upsampling_and_holdout():
    def source(name, docs):
        return DocumentSource(name, sum(len(d.encode()) for d in docs), lambda: iter(docs))

    big = [f"большой документ номер {i}" * 3 for i in range(400)]
    small = [f"кіші құжат {i}" for i in range(20)]
    sample = sample_balanced(
        {"ru": [source("big", big)], "kk": [source("small", small)]},
        {"ru": 2_000, "kk": 1_000},
        upsample=True,
        max_repeat=3.0,
        holdout_fraction=0.2,
    )
    assert 2_000 <= sample.chars("ru") < 2_000 + 100
    kk_unique = sum(len(d) for d in set(sample.train["kk"]))
    assert sample.chars("kk") == pytest.approx(min(1_000, 3 * kk_unique), abs=20)  # repeated, capped
    held = set(sample.heldout["kk"]) | set(sample.heldout["ru"])
    assert held and not held & set(sample.documents())  # held-out documents are never trained on
    # temperature: 0 gives equal shares, 1 natural (size) shares
    a = source("a", ["x" * 10] * 1000)
    b = source("b", ["y" * 10] * 1000)
    b = DocumentSource("b", a.size // 4, b.open)
    eq = sample_balanced({"en": [a, b]}, {"en": 1000}, temperature=0.0)
    nat = sample_balanced({"en": [a, b]}, {"en": 1000}, temperature=1.0)
    assert [s.sampled_chars for s in eq.stats] == [500, 500]
    assert [s.sampled_chars for s in nat.stats] == [800, 200]


# ------------------------------------------------------------------ the jobs end to end


def run_tokenizer_job(env: pytest.MonkeyPatch, home: Path, data_dir: Path, *argv: str) -> tuple[int, str]:
    """jobs.tokenizer through the job CLI contract in this process, in a fresh TULPAR_HOME: (exit code, stdout)."""
    from jobs.tokenizer import TokenizerJobConfig
    from jobs.tokenizer import main as tokenizer_main

    env.setenv("TULPAR_HOME", str(home))
    env.setenv("TULPAR_DATA", str(data_dir))
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = run_job("tokenizer", TokenizerJobConfig, tokenizer_main, list(argv))
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, data_dir):
    """jobs.tokenizer on configs/tokenizer/tiny.yaml in a fresh TULPAR_HOME (a few seconds)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as env:
        rc, out = run_tokenizer_job(
            env,
            home,
            data_dir,
            "--config",
            str(REPO / "configs/tokenizer/tiny.yaml"),
            "show_progress=false",
            "sweep.vocab_sizes=[1024,4096]",
        )
        assert rc == 0, out[-3000:]
        yield home, last_json(out)


def test_tokenizer_job_writes_tokenizer_report_and_mlflow_run(trained_tiny):
    home, result = trained_tiny
    assert result["stage"] == "tokenizer" and result["status"] == "ok"
    out = Path(result["outputs"]["tokenizer_dir"])
    assert out == home / "tokenizers" / "tiny"
    assert json.loads((out / "result.json").read_text()) == result
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "config.yaml",
        "sample.json",
        "baseline/tokenizer.json",
    ):
        assert (out / f).is_file(), f
    for f in ("report.md", "metrics.csv", "report.json", "flores200_devtest.png", "ntrex128.png"):
        assert (out / "report" / f).is_file(), f
    assert (out / "report" / "flores200_devtest.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report" / "report.md").read_text()
    assert "naive-baseline" in md and "tokens/word" in md and "parity" in md
    assert result["metrics"]["flores200_devtest/ours/kk/tokens"] > 0

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.tags["tulpar.stage"] == "tokenizer"
    assert run.data.tags["tulpar.tokenizer_sha256"] == result["outputs"]["tokenizer_sha256"]
    assert mlflow.get_experiment(run.info.experiment_id).name == "tulpar-tokenizer"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "tokenizer")}
    assert "tokenizer/tokenizer.json" in artifacts and "tokenizer/tokenizer_config.json" in artifacts
    assert "report/report.md" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}

    # the vocab sweep: a table, a plot, and MLflow curves over vocab size (step)
    sweep = (out / "report" / "sweep.csv").read_text().splitlines()
    assert sweep[0] == "tokenizer,vocab_size,eval_set,language,tokens" and len(sweep) == 1 + 2 * 2 * 2 * 3
    small = {
        (r.split(",")[0], r.split(",")[3]): int(r.split(",")[4])
        for r in sweep[1:]
        if ",1024,flores200_devtest," in r
    }
    assert small[("ours", "kk")] > result["metrics"]["flores200_devtest/ours/kk/tokens"]  # smaller vocab
    assert (out / "report" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    history = client.get_metric_history(run.info.run_id, "sweep/flores200_devtest/ours/kk/tokens")
    assert sorted(m.step for m in history) == [1024, 4096]


@pytest.mark.slow
def test_production_recipe_meets_the_32k_targets_and_ntrex_keeps_the_order(tmp_path, data_dir, monkeypatch):
    """configs/tokenizer/kk-ru-en-32k.yaml as shipped: FLORES-200 devtest targets met, the naive baseline beaten
    in every language on both eval sets, and NTREX-128 ordering ours against every other tokenizer the same way
    as FLORES-200 in every language (~1.5 min)."""
    config = REPO / "configs/tokenizer/kk-ru-en-32k.yaml"
    rc, out = run_tokenizer_job(
        monkeypatch, tmp_path, data_dir, "--config", str(config), "show_progress=false"
    )
    assert rc == 0, out[-3000:]
    report = json.loads((tmp_path / "tokenizers/kk-ru-en-32k/report/report.json").read_text())
    assert all(t["met"] for t in report["targets"].values()), report["targets"]
    assert set(report["targets"]) == {f"flores200_devtest/{lang}" for lang in ("kk", "ru", "en")}
    tokens = {(m["eval_set"], m["tokenizer"], m["language"]): m["tokens"] for m in report["metrics"]}
    others = [t["name"] for t in report["tokenizers"] if t["name"] != "kk-ru-en-32k"]
    assert set(others) == {"naive-baseline", "qwen3", "llama3", "gemma3"}
    for lang in ("kk", "ru", "en"):
        for eval_set in ("flores200_devtest", "ntrex128"):
            ours = tokens[(eval_set, "kk-ru-en-32k", lang)]
            assert ours < tokens[(eval_set, "naive-baseline", lang)], (eval_set, lang)
            assert report["metrics"] and all(
                m["roundtrip_rate"] == 1.0
                for m in report["metrics"]
                if m["tokenizer"] == "kk-ru-en-32k" and m["eval_set"] == eval_set
            )
        for other in others:
            flores = (
                tokens[("flores200_devtest", "kk-ru-en-32k", lang)]
                < tokens[("flores200_devtest", other, lang)]
            )
            ntrex = tokens[("ntrex128", "kk-ru-en-32k", lang)] < tokens[("ntrex128", other, lang)]
            assert flores == ntrex, (lang, other)


def test_trained_tokenizer_round_trips_every_eval_line_and_loads_in_transformers(trained_tiny, data_dir):
    from transformers import AutoTokenizer

    from llm_core.tokenizer import Tokenizer

    home, result = trained_tiny
    out = Path(result["outputs"]["tokenizer_dir"])
    tok = Tokenizer.from_dir(out)
    settings = settings_for(data_dir, home)
    for name in ("flores200_devtest", "ntrex128"):
        text = EvalSetSpec.model_validate(name).load(settings, ["kk", "ru", "en"])
        for lang, lines in text.lines.items():
            bad = [x for x, ids in zip(lines, tok.encode_batch(lines)) if tok.decode(ids) != x]
            assert not bad, f"{name}/{lang}: {len(bad)} lines do not round-trip, e.g. {bad[0]!r}"
    hf = AutoTokenizer.from_pretrained(out)
    sample = "Қазақстан Республикасы 2024 жылы — in the middle of the night."
    assert hf.encode(sample, add_special_tokens=False) == tok.encode(sample)
    messages = [{"role": "user", "content": "Сәлем!"}]
    assert hf.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages)


def test_report_job_compares_trained_baseline_and_reference(trained_tiny, tmp_path, capsys):
    from jobs.tokenizer_report import main as report_main

    home, result = trained_tiny
    cfg = tmp_path / "report.yaml"
    cfg.write_text(
        "name: tiny-vs-qwen\n"
        "tokenizers:\n"
        "  - tiny\n"  # found under $TULPAR_HOME/tokenizers
        "  - {name: baseline, path: tiny/baseline/tokenizer.json}\n"
        "  - qwen3\n"  # found under $TULPAR_DATA/tokenizers
        "eval_sets: [flores200_devtest]\n"
        "targets: {flores200_devtest: {kk: 1000000, en: 10}}\n"
        "subject: tiny\n",
        encoding="utf-8",
    )
    rc = run_job("tokenizer_report", ReportConfig, report_main, ["--config", str(cfg)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    res = last_json(capsys.readouterr().out)
    out_dir = Path(res["outputs"]["report_dir"])
    assert out_dir == home / "reports" / "tokenizers" / "tiny-vs-qwen"
    assert json.loads((out_dir / "result.json").read_text()) == res
    assert res["metrics"]["flores200_devtest/qwen3/kk/tokens"] == 83_173
    assert res["metrics"]["targets_met"] == 1 and res["metrics"]["targets_total"] == 2
    csv_lines = (out_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 * 3 and csv_lines[0].startswith("eval_set,tokenizer,language,")
    assert (out_dir / "flores200_devtest.png").read_bytes()[:4] == b"\x89PNG"

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    run = mlflow.get_run(res["mlflow_run_id"])
    assert run.data.tags["tulpar.stage"] == "tokenizer_report"
    assert run.data.metrics["flores200_devtest/qwen3/en/tokens"] == 27_621


def test_dataset_source_reads_kept_documents(tmp_path, data_dir):
    shards = pytest.importorskip("llm_core.shards")
    from jobs.tokenizer import TrainData, dataset_sources

    tok = train_bpe(["Сәлем әлем! Hello world. Привет мир."] * 10, 300)
    tok.save(tmp_path / "tok")
    docs = {"kk": ["Сәлем әлем!", "Қазақ тілі.", "Сәлем әлем!"], "en": ["Hello world."]}
    infos = [
        shards.write_shard(
            tmp_path / "ds",
            "train",
            lang,
            0,
            [(tok.encode(d), len(d.encode())) for d in ds],
            dtype="uint16",
            eos_id=tok.eos_id,
        )
        for lang, ds in docs.items()
    ]
    manifest = shards.build_manifest(
        name="ds",
        created="2026-01-01T00:00:00+00:00",
        config={},
        config_sha256="c" * 64,
        input_sha256="i" * 64,
        tokenizer={
            "path": str(tmp_path / "tok"),
            "sha256": tok.sha256,
            "vocab_size": 300,
            "eos_id": tok.eos_id,
        },
        languages=["kk", "en"],
        shards=infos,
        mixture={},
    )
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    cfg = TrainData(source="dataset", dataset=str(tmp_path / "ds"), budgets={"kk": None, "en": None})
    sources, sha = dataset_sources(cfg, settings_for(data_dir, tmp_path))
    assert list(sources["kk"][0].open()) == ["Сәлем әлем!", "Қазақ тілі."]  # repeats read once
    assert list(sources["en"][0].open()) == ["Hello world."] and len(sha) == 64
    with pytest.raises(ValueError, match="has no language 'ru'"):
        dataset_sources(cfg.model_copy(update={"budgets": {"ru": None}}), settings_for(data_dir, tmp_path))

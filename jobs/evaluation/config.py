"""The eval config (`configs/eval/<suite>.yaml`): every key documented; unknown keys are errors (StrictModel)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from jobs.platform.results import ModelVersionOutputs, StageResult, model_reference, take_inputs
from jobs.prep.config import LangIdConfig
from jobs.reporting.tokenizers import PRESETS as PARALLEL_PRESETS
from llm_core.config import StrictModel
from llm_core.device import DEVICE_HELP

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(v: str, what: str) -> str:
    if not NAME.match(v):
        raise ValueError(f"{what} {v!r} must be letters, digits, '_', '-' or '.' (it becomes an MLflow key)")
    return v


class ModelSpec(StrictModel):
    """What to evaluate. `source` is usually set on the command line with --model."""

    source: str | None = Field(
        None,
        description="models:/<name>/<version>, models:/<name>@<alias>, an HF-format directory, or an llm_core "
        "checkpoint directory (best/, last/, or a run directory holding them)",
    )
    tokenizer: str | None = Field(
        None,
        description="tokenizer directory; default: the model's own (HF dir) or the one it was trained with",
    )
    device: str = Field("auto", description=DEVICE_HELP)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ScoringSpec(StrictModel):
    """How texts and answers are scored (llm_core.scoring)."""

    window: int | None = Field(
        None, gt=1, description="input tokens per forward pass; default the model's max_seq_len"
    )
    stride: int | None = Field(
        None,
        gt=0,
        description="tokens newly scored per window; default = window (disjoint windows, as lm-evaluation-"
        "harness's rolling log-likelihood); smaller = sliding window with >= window - stride tokens of context",
    )
    batch_tokens: int = Field(4096, gt=0, description="padded tokens per forward pass")

    @model_validator(mode="after")
    def _check(self) -> ScoringSpec:
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"scoring.stride {self.stride} must be <= scoring.window {self.window}")
        return self


class TextSetSpec(StrictModel):
    """Held-out text for bits-per-byte and perplexity: one file per language. In the config's `text:` list a
    plain string (or {preset: ..., max_docs: ...}) names a shipped parallel set, flores200_devtest or ntrex128
    under TULPAR_DATA/eval/parallel, for the config's languages."""

    name: str
    files: dict[str, str] = Field(
        description="language -> file (.txt or .jsonl); relative paths are under TULPAR_DATA, else the working "
        "directory"
    )
    unit: Literal["line", "paragraph", "file"] = Field(
        "line",
        description="what one document is: a non-blank line, a blank-line separated paragraph, or the whole file",
    )
    text_field: str = Field("text", description="the text field of .jsonl records")
    max_docs: int | None = Field(None, gt=0, description="use the first N documents of each file")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "text set name")

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("a text set needs at least one language -> file")
        return v


class FieldSpec(StrictModel):
    """Where a multiple-choice record keeps its parts. `choices` is one list-valued column or several columns."""

    question: str | None = None
    choices: str | list[str] | None = None
    answer: str | None = None
    passage: str | None = None
    answer_format: Literal["auto", "index0", "index1", "letter", "text"] | None = Field(
        None,
        description="auto: an int or digit string is a 0-based index, a single letter A-Z a letter, else the "
        "choice text",
    )
    drop_empty_choices: bool | None = Field(None, description="drop blank options (KazMMLU's optional E)")


class HubSpec(StrictModel):
    """A Hugging Face Hub dataset (downloaded with huggingface_hub: needs internet)."""

    repo_id: str
    subsets: list[str] = Field(
        default_factory=list,
        description="configs/subsets: directory or file-name stems, shell patterns allowed "
        "(e.g. 'kaz_Cyrl', '* in kaz)'); empty = all files",
    )
    split: str = "test"
    fewshot_split: str | None = Field(None, description="split the few-shot examples come from (e.g. dev)")
    revision: str | None = None


class MCSuiteSpec(StrictModel):
    """A multiple-choice suite scored by log-likelihood of each choice."""

    name: str
    language: str = Field("en", description="language of the prompt labels (kk, ru, en)")
    format: Literal["generic", "belebele", "mmlu", "mmlu_csv", "ceval", "cmmlu", "kazmmlu"] = "generic"
    path: str | None = Field(
        None, description="local file (.jsonl/.json/.csv/.tsv/.parquet); relative: TULPAR_DATA, then cwd"
    )
    hub: HubSpec | None = None
    fields: FieldSpec = Field(default_factory=FieldSpec, description="overrides of the format's columns")
    style: Literal["cloze", "letters"] = Field(
        "cloze",
        description="cloze: score each choice's text after 'Answer:'; letters: list A. B. ... and score the "
        "letter (MMLU-style)",
    )
    num_fewshot: int = Field(0, ge=0)
    fewshot_path: str | None = Field(
        None, description="file of few-shot examples; default: other items of the suite"
    )
    max_items: int | None = Field(None, gt=0)
    allow_variable_choices: bool | None = Field(
        None, description="items may have different numbers of choices (default: only for kazmmlu)"
    )
    skip_unavailable: bool = Field(
        False, description="skip the suite (with a warning) when its hub data cannot be downloaded"
    )
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "multiple-choice suite name")

    @model_validator(mode="after")
    def _one_source(self) -> MCSuiteSpec:
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"multiple-choice suite {self.name!r}: set exactly one of path or hub")
        return self


DEFAULT_PROMPTS: dict[str, list[str]] = {
    "kk": [
        "Қазақстанның астанасы қай қала?",
        "Абай Құнанбайұлы кім болған?",
        "Көктемде табиғатта қандай өзгерістер болады?",
        "Денсаулықты сақтау үшін не істеу керек?",
    ],
    "ru": [
        "Какая столица у Казахстана?",
        "Кто такой Лев Толстой?",
        "Что происходит с природой весной?",
        "Что нужно делать, чтобы сохранить здоровье?",
    ],
    "en": [
        "What is the capital of Kazakhstan?",
        "Who was Leo Tolstoy?",
        "What happens in nature in spring?",
        "What should one do to stay healthy?",
    ],
}

DEFAULT_REFUSALS: list[str] = [
    r"\bI(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bI (?:can(?:no|')t|won't|will not) (?:help|answer|provide|do|assist)",
    r"\bas an (?:AI|language model)\b",
    r"\bизвините\b",
    r"\bк сожалению\b",
    r"\b(?:я )?не (?:могу|буду|стану) (?:помочь|ответить|отвечать|выполнить|предоставить)",
    r"\bкак (?:языковая модель|ИИ|искусственный интеллект)\b",
    r"\bкешіріңіз\b",
    r"\bөкінішке (?:орай|қарай)\b",
    r"\b(?:көмектесе|жауап бере|орындай) алмаймын\b",
    r"\bжасанды интеллект ретінде\b",
]


class GenerationSpec(StrictModel):
    """Answers to a fixed prompt set per language: lengths, refusal rate and language consistency."""

    enabled: bool = True
    prompts: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_PROMPTS.items()}
    )
    chat: Literal["auto", "always", "never"] = Field(
        "auto",
        description="wrap prompts in the chat template: auto = unless the model version's stage is pretrain",
    )
    max_new_tokens: int = Field(64, gt=0)
    min_new_tokens: int | None = Field(
        None,
        ge=0,
        description="tokens generated before end-of-text may be chosen; default 0 with the chat template (an "
        "empty answer counts as one) and 16 without (a base model would often end the document at the question)",
    )
    temperature: float = Field(0.0, ge=0, description="0 = greedy (deterministic)")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSALS),
        description="case-insensitive regexes; an answer matching any one is a refusal",
    )
    langid: LangIdConfig = Field(
        default_factory=lambda: LangIdConfig(min_letters=10),
        description="the preprocessing stage's language detector settings (jobs.prep.langid)",
    )

    @field_validator("refusal_patterns")
    @classmethod
    def _compile(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"refusal pattern {p!r} is not a valid regex: {exc}") from None
        return v


PASSKEY_TEXT: dict[str, dict[str, str]] = {
    # per language: the instruction before the filler, the sentence holding the key ({key}), the question after
    # it, and the neutral sentences of the `repeat` filler
    "en": {
        "intro": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.",
        "needle": " The pass key is {key}. Remember it. {key} is the pass key.",
        "question": " What is the pass key? The pass key is",
        "filler": "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    },
    "ru": {
        "intro": "В длинном тексте ниже спрятан код доступа. Найдите и запомните его.",
        "needle": " Код доступа: {key}. Запомните его. {key} — это код доступа.",
        "question": " Какой код доступа? Код доступа:",
        "filler": "Трава зелёная. Небо голубое. Солнце жёлтое. Вот и всё. Туда и обратно.",
    },
    "kk": {
        "intro": "Төмендегі ұзын мәтінде құпия код жасырылған. Оны тауып, есте сақтаңыз.",
        "needle": " Құпия код: {key}. Оны есте сақтаңыз. {key} — құпия код.",
        "question": " Құпия код қандай? Құпия код:",
        "filler": "Шөп жасыл. Аспан көк. Күн сары. Міне, осылай. Барып, қайтамыз.",
    },
}


class PasskeySpec(StrictModel):
    """Passkey retrieval: a `digits`-digit number hidden at each depth of filler text of each length; the model's
    greedy continuation of the question must start with exactly that number (jobs.evaluation.long_context)."""

    lengths: list[int] = Field(
        default_factory=lambda: [256, 512, 1024],
        description="prompt lengths in tokens (start token, instruction, filler, key sentence, question); "
        "lengths that leave no room for the answer in the model's max_seq_len are skipped with a note",
    )
    depths: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        description="where the key sentence sits in the filler: 0 = right after the instruction, 1 = right "
        "before the question",
    )
    digits: int = Field(5, ge=1, le=18)
    samples: int = Field(
        2, gt=0, description="prompts (different keys and filler) per language, length and depth"
    )
    languages: list[str] = Field(default_factory=lambda: ["en"], description="of kk, ru, en")
    filler: Literal["repeat", "corpus"] = Field(
        "repeat",
        description="repeat: the language's neutral sentences over and over; corpus: sentences of "
        "TULPAR_DATA/corpus/<lang> shuffled by the seed",
    )
    max_new_tokens: int | None = Field(
        None, gt=0, description="tokens generated per answer; default digits + 3"
    )
    seed: int = 0

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 8 for n in v) or len(set(v)) != len(v):
            raise ValueError(f"passkey.lengths {v} must be distinct token counts >= 8")
        return sorted(v)

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= d <= 1.0 for d in v) or len(set(v)) != len(v):
            raise ValueError(f"passkey.depths {v} must be distinct fractions in [0, 1]")
        return sorted(v)

    @field_validator("languages")
    @classmethod
    def _languages(cls, v: list[str]) -> list[str]:
        bad = [lang for lang in v if lang not in PASSKEY_TEXT]
        if not v or bad:
            raise ValueError(f"passkey.languages {v}: each must be one of {sorted(PASSKEY_TEXT)}")
        return v

    @property
    def answer_tokens(self) -> int:
        return self.max_new_tokens or self.digits + 3


class PositionBpbSpec(StrictModel):
    """Bits-per-byte by position bucket: long texts cut into sequences of `length` tokens, each scored in one
    forward pass, bpb reported per bucket of positions (jobs.evaluation.long_context)."""

    files: dict[str, str] = Field(
        description="language -> text file (.txt or .jsonl); relative paths are under TULPAR_DATA, else the "
        "working directory"
    )
    unit: Literal["line", "paragraph", "file"] = Field(
        "file", description="what one document is (as in text sets)"
    )
    text_field: str = "text"
    concatenate: bool = Field(
        True,
        description="join the documents with line breaks into one stream before cutting it into sequences "
        "(short documents, e.g. lines, would otherwise be too short for any sequence)",
    )
    length: int | None = Field(
        None, gt=1, description="tokens per scored sequence; default the model's max_seq_len"
    )
    bucket: int = Field(128, gt=0, description="positions per bucket: 0-128, 128-256, ...")
    max_sequences: int = Field(8, gt=0, description="sequences scored per language")

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("bpb_by_position.files needs at least one language -> file")
        return v

    def buckets(self, length: int) -> list[tuple[int, int]]:
        """[lo, hi) position ranges covering 0..length."""
        return [(lo, min(lo + self.bucket, length)) for lo in range(0, length, self.bucket)]


class LongContextSpec(StrictModel):
    """Long-context checks; each part runs only when its section is given."""

    passkey: PasskeySpec | None = None
    bpb_by_position: PositionBpbSpec | None = None

    @property
    def enabled(self) -> bool:
        return self.passkey is not None or self.bpb_by_position is not None


LOWER_IS_BETTER = (
    "bpb",
    "bpb_by_position",
    "ppl",
    "nll",
    "loss",
    "refusal_rate",
    "undetected_rate",
    "truncated_rate",
)
HIGHER_IS_BETTER = ("acc", "acc_norm", "lang_consistency", "key_gain")


class GateRule(StrictModel):
    """One condition on one metric. All set bounds must hold; relative ones compare with the baseline alias."""

    metric: str = Field(description="a metric name of this suite, e.g. bpb/flores200_devtest/kk")
    direction: Literal["auto", "lower", "higher"] = Field(
        "auto", description="which way is better; auto from the metric name (bpb/ppl lower, acc higher)"
    )
    max_regression: float | None = Field(
        None, ge=0, description="relative: at most this fraction worse than the baseline (0.01 = 1%)"
    )
    max_abs_regression: float | None = Field(None, ge=0, description="absolute: at most this much worse")
    min: float | None = Field(None, description="absolute lower bound")
    max: float | None = Field(None, description="absolute upper bound")

    @model_validator(mode="after")
    def _check(self) -> GateRule:
        if all(v is None for v in (self.max_regression, self.max_abs_regression, self.min, self.max)):
            raise ValueError(
                f"gate rule for {self.metric!r} sets no bound: give max_regression, max_abs_regression, min or max"
            )
        if (
            self.direction == "auto"
            and metric_direction(self.metric) is None
            and (self.max_regression is not None or self.max_abs_regression is not None)
        ):
            raise ValueError(
                f"gate rule for {self.metric!r}: cannot tell whether lower or higher is better: set direction"
            )
        return self

    @property
    def better(self) -> str:
        return self.direction if self.direction != "auto" else (metric_direction(self.metric) or "lower")


def depth_label(depth: float) -> str:
    """The metric-name form of a passkey depth: 0.25 -> depth25, 0.125 -> depth12.5."""
    return f"depth{depth * 100:g}"


def metric_direction(metric: str) -> str | None:
    kind = metric.split("/")[-1] if metric.startswith(("mc/", "gen/", "passkey/")) else metric.split("/")[0]
    if metric.startswith("lm_eval/"):
        kind = metric.split("/")[-1].split(",")[0]
    if kind in LOWER_IS_BETTER or kind in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        return "lower"
    if kind in HIGHER_IS_BETTER:
        return "higher"
    return None


class GateSpec(StrictModel):
    """The promotion gate: --promote moves `alias` to the evaluated version only when every rule holds."""

    alias: str = "champion"
    baseline_alias: str | None = Field(
        None, description="the version relative rules compare with; default alias"
    )
    rules: list[GateRule] = Field(default_factory=list)
    evaluate_baseline: bool = Field(
        True,
        description="evaluate the baseline with this suite when it has no results for it yet (else relative "
        "rules fail)",
    )


class LmEvalSpec(StrictModel):
    """Also run lm-evaluation-harness (`lm_eval --model hf`) on the HF export: the suite's text sets and
    multiple-choice suites become local lm_eval tasks; `tasks` adds any of lm_eval's own (hub data: online)."""

    enabled: bool = False
    include_local: bool = True
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, gt=0, description="documents per task")
    batch_size: int = Field(8, gt=0)
    timeout_s: int = Field(3600, gt=0)


class CompareSpec(StrictModel):
    """The comparison table across registered versions of the model (markdown + PNG)."""

    enabled: bool = True
    metrics: list[str] | None = Field(
        None, description="columns; default bpb per set/language, MC accuracies"
    )
    max_versions: int = Field(20, gt=0, description="newest versions shown")


class EvalConfig(StrictModel):
    name: str = Field(description="suite name: results are tagged tulpar.eval.<name>.<metric> on the version")
    model: ModelSpec = Field(default_factory=ModelSpec)
    promote: bool = Field(False, description="move gate.alias when the gate passes (set with --promote)")
    languages: list[str] = Field(
        default_factory=lambda: ["kk", "ru", "en"], description="languages of the preset text sets"
    )
    text: list[TextSetSpec] = Field(default_factory=list)
    user_text: dict[str, str] = Field(
        default_factory=dict,
        description="language -> text file: one more text set named `user` (one document per line), e.g. "
        "user_text.kk=/data/kk_news.txt on the command line",
    )
    multiple_choice: list[MCSuiteSpec] = Field(default_factory=list)
    generation: GenerationSpec = Field(
        default_factory=lambda: GenerationSpec(enabled=False),
        description="off when the section is absent; on (enabled: true) when it is given",
    )
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    long_context: LongContextSpec = Field(
        default_factory=LongContextSpec, description="passkey retrieval and bits-per-byte by position"
    )
    gate: GateSpec = Field(default_factory=GateSpec)
    lm_eval: LmEvalSpec = Field(default_factory=LmEvalSpec)
    compare: CompareSpec = Field(default_factory=CompareSpec)
    output_dir: str | None = Field(None, description="default $TULPAR_HOME/evals/<model>/<suite>")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "suite name")

    @model_validator(mode="before")
    @classmethod
    def _expand_presets(cls, data: Any) -> Any:
        """Text-set presets become {name, files} for the config's languages."""
        if not isinstance(data, dict) or not isinstance(data.get("text"), list):
            return data
        langs = data.get("languages") or ["kk", "ru", "en"]
        out = []
        for item in data["text"]:
            name = item if isinstance(item, str) else (item.get("preset") if isinstance(item, dict) else None)
            if name is None:
                out.append(item)
                continue
            if name not in PARALLEL_PRESETS:
                raise ValueError(
                    f"unknown text set {name!r}: use one of {sorted(PARALLEL_PRESETS)} or give {{name, files}}"
                )
            root, names = PARALLEL_PRESETS[name]
            missing = [lang for lang in langs if lang not in names]
            if missing:
                raise ValueError(f"text set {name!r} has no file for languages {missing}")
            spec = {k: v for k, v in item.items() if k != "preset"} if isinstance(item, dict) else {}
            spec.setdefault("name", name)
            spec.setdefault("files", {lang: f"{root}/{names[lang]}" for lang in langs})
            out.append(spec)
        return {**data, "text": out}

    @model_validator(mode="after")
    def _unique(self) -> EvalConfig:
        if self.user_text and not any(t.name == "user" for t in self.text):
            self.text.append(TextSetSpec(name="user", files=dict(self.user_text)))
        for what, names in (
            ("text set", [t.name for t in self.text]),
            ("multiple-choice suite", [m.name for m in self.multiple_choice]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique, repeated: {dup}")
        return self

    def suite_sha256(self) -> str:
        """What determines the numbers: results with the same hash are comparable across versions."""
        keep = {
            "text": [t.model_dump(mode="json") for t in self.text],
            "multiple_choice": [m.model_dump(mode="json") for m in self.multiple_choice],
            "generation": self.generation.model_dump(mode="json") if self.generation.enabled else None,
            "scoring": self.scoring.model_dump(mode="json", exclude={"batch_tokens"}),
            "dtype": self.model.dtype,
        }
        if self.long_context.enabled:  # absent from older suites' hashes, so their results stay comparable
            keep["long_context"] = self.long_context.model_dump(mode="json")
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()

    def expected_metrics(self) -> set[str]:
        """The metric names this suite produces (lm_eval's are known only after it runs)."""
        out: set[str] = set()
        for t in self.text:
            for lang in [*t.files, "avg"]:
                out |= {f"{k}/{t.name}/{lang}" for k in ("bpb", "ppl")}
        for m in self.multiple_choice:
            out |= {f"mc/{m.name}/{k}" for k in ("acc", "acc_norm", "random", "n")}
        if self.generation.enabled:
            for lang in [*self.generation.prompts, "all"]:
                out |= {
                    f"gen/{lang}/{k}"
                    for k in (
                        "mean_tokens",
                        "mean_chars",
                        "refusal_rate",
                        "lang_consistency",
                        "undetected_rate",
                        "truncated_rate",
                        "tokens_per_s",
                        "bytes_per_s",
                    )
                }
        lc = self.long_context
        if lc.passkey is not None:
            pk = lc.passkey
            out |= {"passkey/all/acc", "passkey/all/nll", "passkey/all/key_gain"}
            for n in pk.lengths:
                out |= {f"passkey/{n}/acc", f"passkey/{n}/nll", f"passkey/{n}/key_gain"}
                out |= {f"passkey/{n}/{depth_label(d)}/acc" for d in pk.depths}
        if lc.bpb_by_position is not None and lc.bpb_by_position.length is not None:
            pb = lc.bpb_by_position
            for lang in pb.files:
                out |= {f"bpb_by_position/{lang}/{lo}-{hi}" for lo, hi in pb.buckets(pb.length)}
        return out

    def with_inputs(self, inputs: dict[str, StageResult]) -> EvalConfig:
        """`--input model=<a training stage's result>`: evaluate that registered model version."""
        got = take_inputs("eval", inputs, {"model": (ModelVersionOutputs,)})
        data = self.model_dump()
        if "model" in got:
            data["model"]["source"] = model_reference(got["model"], "model")
        return EvalConfig.model_validate(data)

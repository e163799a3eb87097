"""The model card: README.md with YAML metadata that `huggingface_hub.ModelCard` parses, rendered from a
`ModelRecord` (jobs/publishing/record.py). The card states only what the record holds; every missing fact is
written as missing ("not measured", "not recorded") with the reason.

Metadata: language [kk, ru, en], license, library_name transformers, pipeline_tag text-generation, tags,
base_model (only when a parent version was itself published to the Hub: its `tulpar.hub.repo_id` tag), and
model-index with the eval results (bits-per-byte per eval set and language; multiple-choice accuracy per suite).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.evaluation.report import md_table
from jobs.publishing.export import ASSETS
from jobs.publishing.record import REFERENCE_TOKENIZERS, EvalRecord, ModelRecord
from llm_core.export_hf import hf_architecture

# the transformers class of each HF model_type export_hf writes
HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

LANGUAGES = ["kk", "ru", "en"]
LANGUAGE_NAMES = {"kk": "Kazakh", "ru": "Russian", "en": "English"}


def card_assets(record: ModelRecord) -> dict[str, Path]:
    """assets/<file name> -> local PNG: the loss curve of every version in the lineage that logged one."""
    out = {}
    for v in record.versions:
        if v.loss_curve is not None:
            name, version = v.uri.split("/")[1:3]
            out[f"loss_curve-{name}-v{version}.png"] = v.loss_curve
    return out


def base_model(record: ModelRecord) -> str | None:
    """The Hub repo of the nearest parent version that was published, if any."""
    for v in record.versions[1:]:
        if v.hub_repo_id:
            return v.hub_repo_id
    return None


def eval_results(record: ModelRecord, model_name: str) -> list:
    """model-index entries: bits-per-byte per eval set and language, multiple-choice accuracy per suite."""
    from huggingface_hub import EvalResult

    results = []
    for ev in record.evals:
        for key, value in sorted(ev.metrics.items()):
            parts = key.split("/")
            if parts[0] == "bpb" and len(parts) == 3 and parts[2] in LANGUAGES:
                results.append(
                    EvalResult(
                        task_type="text-generation",
                        dataset_type=parts[1],
                        dataset_name=parts[1],
                        dataset_config=parts[2],
                        metric_type="bits_per_byte",
                        metric_name=f"bits-per-byte ({parts[2]})",
                        metric_value=value,
                    )
                )
            elif parts[0] == "mc" and len(parts) == 3 and parts[2] == "acc":
                results.append(
                    EvalResult(
                        task_type="multiple-choice",
                        dataset_type=parts[1],
                        dataset_name=parts[1],
                        metric_type="accuracy",
                        metric_name="accuracy",
                        metric_value=value,
                    )
                )
    return results


def _bpb_table(ev: EvalRecord) -> str | None:
    sets = sorted({k.split("/")[1] for k in ev.metrics if k.startswith("bpb/") and k.count("/") == 2})
    if not sets:
        return None
    langs = [x for x in [*LANGUAGES, "avg"] if any(f"bpb/{s}/{x}" in ev.metrics for s in sets)]
    rows = [[s, *(ev.metrics.get(f"bpb/{s}/{x}") for x in langs)] for s in sets]
    return md_table(["eval set", *langs], rows)


def _mc_table(ev: EvalRecord) -> str | None:
    suites = sorted({k.split("/")[1] for k in ev.metrics if k.startswith("mc/") and k.count("/") == 2})
    if not suites:
        return None
    rows = [
        [
            s,
            *(ev.metrics.get(f"mc/{s}/{k}") for k in ("acc", "acc_norm", "random")),
            ev.metrics.get(f"mc/{s}/n"),
        ]
        for s in suites
    ]
    for r in rows:
        r[-1] = int(r[-1]) if r[-1] is not None else None
    return md_table(["suite", "accuracy", "accuracy (length-normalised)", "chance", "questions"], rows)


def _eval_section(record: ModelRecord) -> list[str]:
    out = ["## Evaluation", ""]
    if not record.evals:
        out += [
            "Not measured: `jobs.eval` has recorded no results on this version"
            + (" (the model is not a registered version)." if record.kind != "registered" else ".")
        ]
        return out
    for ev in record.evals:
        out += [f"### Suite `{ev.suite}` (MLflow run `{ev.run_id}`)", ""]
        bpb = _bpb_table(ev)
        if bpb:
            out += ["Bits per byte on held-out text (lower is better):", "", bpb, ""]
        mc = _mc_table(ev)
        if mc:
            out += ["Multiple choice, scored by log-likelihood:", "", mc, ""]
        gen = [k for k in ("gen/all/lang_consistency", "gen/all/refusal_rate") if k in ev.metrics]
        if gen:
            out += [
                md_table(["generation check", "rate"], [[k.split("/")[-1], ev.metrics[k]] for k in gen]),
                "",
            ]
        out += [
            "<details><summary>Every metric recorded for this suite</summary>",
            "",
            md_table(["metric", "value"], [[k, v] for k, v in sorted(ev.metrics.items())]),
            "",
            "</details>",
            "",
        ]
    return out


def _tokenizer_section(record: ModelRecord) -> list[str]:
    out = ["## Tokenizer efficiency", ""]
    tok = record.tokenizer
    if tok is None:
        return out + [f"Tokens per language against Qwen3, Llama 3 and Gemma 3: {record.tokenizer_note}."]
    out += [
        f"Total tokens for the same parallel text per language (fewer is better), from the tokenizer report "
        f"`{tok.report_path}`. "
        f"This model's tokenizer is `{tok.subject}` there.",
        "",
    ]
    names = [tok.subject, *REFERENCE_TOKENIZERS]
    labels = {tok.subject: f"this model ({tok.subject})", **REFERENCE_TOKENIZERS}
    for eval_set in tok.eval_sets:
        rows = []
        for name in names:
            cells: list[Any] = [labels[name]]
            for lang in LANGUAGES:
                row = next(
                    (
                        m
                        for m in tok.metrics
                        if m["eval_set"] == eval_set and m["tokenizer"] == name and m["language"] == lang
                    ),
                    None,
                )
                cells.append(
                    f"{row['tokens']:,} ({row['chars_per_token']:.2f} chars/token)" if row else "not measured"
                )
            rows.append(cells)
        out += [f"{eval_set}:", "", md_table(["tokenizer", *LANGUAGES], rows), ""]
    return out


def _data_section(record: ModelRecord) -> list[str]:
    out = ["## Training data", ""]
    ds = record.dataset
    if ds is None:
        return out + [f"Pretraining data summary: {record.dataset_note}."]
    rep = ds.report
    totals = rep.get("totals", {})
    out += [
        f"Pretrained on the Tulpar dataset `{rep.get('name', Path(ds.path).name)}` (manifest sha256 "
        f"`{ds.manifest_sha256[:16]}`), built by `jobs.preprocess` from {totals.get('files', 'an unrecorded number of')} "
        f"source files: {totals.get('documents_kept', '?'):,} of {totals.get('documents_in', '?'):,} documents kept "
        "after normalisation, language ID, quality filters, PII scrubbing and exact + near-duplicate removal."
        if isinstance(totals.get("documents_kept"), int) and isinstance(totals.get("documents_in"), int)
        else f"Pretrained on the Tulpar dataset at `{ds.path}` (its report records no totals).",
        "",
    ]
    output = rep.get("output", {})
    mixture = rep.get("mixture", {})
    rows = []
    for lang in LANGUAGES:
        train = output.get("train", {}).get(lang)
        if train is None:
            continue
        rows.append(
            [
                f"{LANGUAGE_NAMES[lang]} ({lang})",
                f"{train.get('documents', 0):,}",
                f"{train.get('tokens', 0):,}",
                mixture.get("target", {}).get(lang),
                mixture.get("achieved", {}).get(lang),
            ]
        )
    if rows:
        out += [
            md_table(["language", "train documents", "train tokens", "target share", "achieved share"], rows),
            "",
        ]
    return out


def _lineage_section(record: ModelRecord) -> list[str]:
    out = ["## Lineage", ""]
    if not record.versions:
        return out + [f"Not recorded: `{record.uri}` is a directory, not a registered model version."]
    rows = [
        [v.uri, v.stage or "not recorded", f"`{v.run_id}`" if v.run_id else "none", v.parent_uri or "none"]
        for v in record.versions
    ]
    out += [
        "Newest first; each version was trained from its parent. Registry: the MLflow model registry of the "
        "Tulpar deployment that trained it.",
        "",
        md_table(["version", "stage", "MLflow run", "parent"], rows),
        "",
    ]
    if record.root_parent:
        out += [f"The oldest version started from `{record.root_parent}` (not a registered version).", ""]
    assets = card_assets(record)
    if assets:
        out += ["### Loss curves", ""]
        for name, v in zip(assets, [v for v in record.versions if v.loss_curve is not None], strict=True):
            out += [f"![loss curve of {v.uri} ({v.stage})]({ASSETS}/{name})", ""]
        without = [v.uri for v in record.versions if v.loss_curve is None]
        if without:
            out += [
                f"No loss curve recorded for {', '.join(without)} (their runs logged no plots/loss_curve.png).",
                "",
            ]
    else:
        out += ["Loss curves: not recorded (no run in the lineage logged plots/loss_curve.png).", ""]
    return out


def _architecture_section(record: ModelRecord) -> list[str]:
    c = record.config
    rows = [
        [
            "parameters",
            f"{c.num_params():,} ({c.num_params() / 1e6:.1f}M, padding rows of the embedding excluded)",
        ],
        ["layers", c.num_layers],
        ["hidden size", c.dim],
        ["attention heads / key-value heads", f"{c.num_heads} / {c.num_kv_heads} (head size {c.head_dim})"],
        ["MLP", f"SwiGLU, hidden size {c.ffn_hidden_dim}" if not c.is_moe else "mixture of experts"],
        ["vocabulary", c.vocab_size],
        ["context length", c.max_seq_len],
        ["RoPE theta", f"{c.rope_theta:g}"],
        ["tied embeddings", c.tie_embeddings],
    ]
    if c.is_moe:
        rows.append(
            [
                "experts",
                f"{c.num_experts} routed (top-{c.num_experts_per_token}), {c.num_shared_experts} shared, "
                f"expert hidden size {c.expert_hidden_dim}",
            ]
        )
    arch = HF_CLASSES[hf_architecture(c)]
    return [
        "## Architecture",
        "",
        f"A decoder-only transformer (`{arch}` in transformers; llm_core preset `{c.name}`), from the model's "
        "`tulpar_config.json`:",
        "",
        md_table(["", ""], rows),
        "",
    ]


def _usage_section(repo_id: str | None) -> list[str]:
    repo = repo_id or "<owner>/<name>"
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        'ids = tok("Қазақстанның астанасы", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```",
        "",
    ]


def _summary(record: ModelRecord) -> str:
    c = record.config
    stages = " → ".join(v.stage or "?" for v in reversed(record.versions)) if record.versions else None
    what = f"`{record.uri}`" if record.kind == "registered" else "an HF-format export"
    text = (
        f"A {c.num_params() / 1e6:.1f}M-parameter {'mixture-of-experts' if c.is_moe else 'dense'} language model "
        f"for Kazakh, Russian and English, trained with Tulpar; this is {what}"
    )
    return text + (f", made by the stages {stages}." if stages else ".")


def render(record: ModelRecord, *, repo_id: str | None, license: str) -> str:
    """The card as README.md text (YAML metadata + markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    model_name = repo_id.split("/")[-1] if repo_id else (record.name or record.hf_dir.name)
    tags = ["tulpar", hf_architecture(record.config), "kazakh", "russian", "english"]
    if record.versions and record.versions[0].stage:
        tags.append(record.versions[0].stage)
    results = eval_results(record, model_name)
    data = ModelCardData(
        language=LANGUAGES,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        base_model=base_model(record),
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    body = [
        f"# {model_name}",
        "",
        _summary(record),
        "",
        *_architecture_section(record),
        *_tokenizer_section(record),
        "",
        *_data_section(record),
        "",
        *_eval_section(record),
        *_lineage_section(record),
        "## Intended use and limitations",
        "",
        "For research on and experiments with Kazakh, Russian and English language modelling. The model was "
        "evaluated only as the Evaluation section shows: no safety, bias or factuality evaluation is recorded, so "
        "do not rely on its output for decisions or facts, and expect it to reproduce the biases of its training "
        "text. See the Training data and Evaluation sections for what it was trained and measured on.",
        "",
        *_usage_section(repo_id),
        "---",
        f"Card generated by `python -m jobs.publish` from the model registry, MLflow and Tulpar's report files "
        f"for `{record.uri}`.",
        "",
    ]
    text = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)
    ModelCard(text)  # the Hub's own parser must accept the metadata (raises ValueError otherwise)
    return text

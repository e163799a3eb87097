"""Pretraining: `python -m jobs.pretrain --config configs/pretrain/<preset>.yaml [key=value ...]`.

Reads Kazakh/Russian/English text, trains (or loads) a BPE tokenizer, trains an llm_core model with the shared
Trainer, keeps best/last checkpoints (resuming a partial run), exports the best one to HF format, registers it in
MLflow as `<model_name>` with alias `@pretrain-latest`, and prints a sample per language.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import torch
from pydantic import Field

from jobs import tracking
from jobs.runtime import JobResult, Settings, main_entry
from llm_core.checkpoint import load_model_from_checkpoint, read_meta
from llm_core.config import ModelConfig, StrictModel, config_sha256, config_to_dict
from llm_core.data import DataError, RandomWindows, concat_documents
from llm_core.export_hf import export_hf
from llm_core.generate import SamplingParams, generate
from llm_core.io import atomic_write_json
from llm_core.model import Transformer
from llm_core.text import is_validation, sample_language
from llm_core.tokenizer import Tokenizer, train_bpe
from llm_core.trainer import EvalSet, TrainConfig, Trainer

log = logging.getLogger("tulpar.pretrain")


class RawTextData(StrictModel):
    """Plain text per language from TULPAR_DATA/<corpus_dir>/<lang>/ (.txt: a document per line; .jsonl: `text`)."""

    corpus_dir: str = "corpus"
    languages: list[str] = Field(default_factory=lambda: ["kk", "ru", "en"], min_length=1)
    max_chars_per_language: int = Field(
        2_000_000, gt=0, description="balanced budget so no language dominates"
    )
    min_chars: int = Field(20, ge=1, description="shorter documents are skipped")
    val_fraction: float = Field(0.05, gt=0, lt=1)


class TokenizerSpec(StrictModel):
    path: str | None = Field(
        None, description="an existing tokenizer dir; None trains one from the training text"
    )
    vocab_size: int | None = Field(None, gt=0, description="default: the model's vocab_size")
    min_frequency: int = Field(2, ge=1)


class SampleSpec(StrictModel):
    prompts: dict[str, str] = Field(
        default_factory=lambda: {"kk": "Қазақстан", "ru": "Россия", "en": "The history of"}
    )
    max_new_tokens: int = Field(40, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0


class PretrainConfig(StrictModel):
    name: str = Field(description="run name; also the registered model name (e.g. kk-350m)")
    model: ModelConfig
    data: RawTextData = Field(default_factory=RawTextData)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleSpec = Field(default_factory=SampleSpec)
    device: str = Field("auto", description="auto | cpu | cuda")
    register_model: bool = Field(True, description="log the HF export to MLflow and register a model version")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA GPU is visible: use device=cpu or device=auto")
    return torch.device(name)


def load_text(cfg: PretrainConfig, settings: Settings) -> dict[str, tuple[list[str], list[str]]]:
    """Per language: (train documents, validation documents)."""
    root = settings.require_data(cfg.data.corpus_dir)
    out = {}
    for lang in cfg.data.languages:
        lang_dir = root / lang
        if not lang_dir.is_dir():
            raise DataError(f"no text for language {lang!r}: {lang_dir} does not exist (set data.languages)")
        docs = sample_language(lang_dir, cfg.data.max_chars_per_language, cfg.data.min_chars)
        val = [d for d in docs if is_validation(d, cfg.data.val_fraction)]
        train = [d for d in docs if not is_validation(d, cfg.data.val_fraction)]
        if not val or not train:
            raise DataError(
                f"{lang}: {len(docs)} documents are too few to split off validation text: add text"
            )
        out[lang] = (train, val)
        log.info("%s: %d train / %d val documents, %d chars", lang, len(train), len(val), sum(map(len, docs)))
    return out


def get_tokenizer(
    cfg: PretrainConfig, settings: Settings, texts: dict[str, tuple[list[str], list[str]]]
) -> Tokenizer:
    if cfg.tokenizer.path:
        return Tokenizer.from_dir(cfg.tokenizer.path)
    vocab = cfg.tokenizer.vocab_size or cfg.model.vocab_size
    train_docs = [d for lang in sorted(texts) for d in texts[lang][0]]
    key = config_sha256(cfg.data)[:8] + f"-v{vocab}-m{cfg.tokenizer.min_frequency}"
    out_dir = settings.path("tokenizers", f"{cfg.name}-{key}")
    if (out_dir / "tokenizer.json").is_file():
        log.info("reusing tokenizer %s", out_dir)
        return Tokenizer.from_dir(out_dir)
    log.info("training a %d-token BPE on %d documents", vocab, len(train_docs))
    tok = train_bpe(train_docs, vocab, min_frequency=cfg.tokenizer.min_frequency)
    tok.save(out_dir)
    return tok


def main(cfg: PretrainConfig, settings: Settings) -> JobResult:
    device = _device(cfg.device)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"train.seq_len {cfg.train.seq_len} > model.max_seq_len {cfg.model.max_seq_len}: lower train.seq_len "
            "or raise model.max_seq_len"
        )
    texts = load_text(cfg, settings)
    tokenizer = get_tokenizer(cfg, settings, texts)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}: set "
            f"model.vocab_size={tokenizer.vocab_size} (or more) or use a smaller tokenizer"
        )

    # Token streams: training documents of all languages shuffled together; validation kept per language.
    train_docs = [(lang, d) for lang, (tr, _) in texts.items() for d in tr]
    random.Random(cfg.train.seed).shuffle(train_docs)
    train_tokens = concat_documents(tokenizer.iter_documents(d for _, d in train_docs), cfg.model.vocab_size)
    eval_sets = []
    for lang, (_, val) in texts.items():
        tokens = concat_documents(tokenizer.iter_documents(val), cfg.model.vocab_size)
        n_bytes = sum(len(d.encode("utf-8")) for d in val)
        eval_sets.append(EvalSet(lang, tokens, n_bytes / max(1, len(tokens) - len(val))))
    sampler = RandomWindows(train_tokens, cfg.train.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    for es in eval_sets:
        if len(es.tokens) <= cfg.train.seq_len:
            raise DataError(
                f"not enough tokens: need {cfg.train.seq_len + 1} validation tokens for {es.name}, have "
                f"{len(es.tokens)}: raise data.max_chars_per_language or data.val_fraction, or lower train.seq_len"
            )
    log.info(
        "train tokens: %d; val tokens: %s", len(train_tokens), {e.name: len(e.tokens) for e in eval_sets}
    )

    run_key = f"{cfg.name}-{config_sha256(cfg)[:8]}"
    ckpt_root = Path(settings.storage) / "checkpoints" / run_key
    model = Transformer(cfg.model)
    trainer = Trainer(model, cfg.train, device=device, run_config=config_to_dict(cfg))
    if (ckpt_root / "last" / "meta.json").is_file():
        trainer.resume(ckpt_root / "last", sampler)
        log.info("resumed %s at step %d", ckpt_root / "last", trainer.step)
    print(
        f"model {cfg.model.name}: {model.num_params() / 1e6:.2f}M parameters, {len(train_tokens):,} training tokens, "
        f"{trainer.accum * cfg.train.batch_size * cfg.train.seq_len} tokens/step, device {device}",
        flush=True,
    )

    tags = {"tulpar.tokenizer_sha256": tokenizer.sha256, "tulpar.model_name": cfg.name}
    with tracking.start_run(settings, "pretrain", cfg, run_name=run_key, tags=tags) as run:

        def on_log(step: int, m: dict[str, float]) -> None:
            tracking.log_metrics({("train_loss" if k == "loss" else k): v for k, v in m.items()}, step)
            print(
                f"step {step:5d} | train loss {m['loss']:.4f} | lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s",
                flush=True,
            )

        def on_eval(step: int, m: dict[str, float], is_best: bool) -> None:
            tracking.log_metrics(m, step)
            losses = " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in m.items() if k.startswith("val_loss/"))
            print(f"step {step:5d} | val loss {losses}{' (best)' if is_best else ''}", flush=True)

        result = trainer.fit(sampler, eval_sets, checkpoint_root=ckpt_root, on_log=on_log, on_eval=on_eval)
        plot = tracking.plot_loss_curve(
            result.history, ckpt_root / "loss_curve.png", f"{cfg.name} pretraining"
        )
        tracking.log_figure_file(plot)

        best = load_model_from_checkpoint(ckpt_root / "best").to(device)
        final_val = trainer.evaluate(eval_sets)  # metrics of the last step; best checkpoint's are in its meta
        best_metrics = {
            k: v for k, v in read_meta(ckpt_root / "best")["metrics"].items() if isinstance(v, float)
        }
        hf_dir = settings.path("models", cfg.name, f"run-{run.info.run_id[:8]}")
        export_hf(best.cpu(), hf_dir, tokenizer=tokenizer)
        model_uri = None
        if cfg.register_model:
            model_uri, version = tracking.register_hf_model(
                hf_dir,
                cfg.name,
                stage="pretrain",
                alias="pretrain-latest",
                tags={"tulpar.best_val_loss": f"{trainer.best_val_loss:.6f}"},
            )
            final_dir = settings.path("models", cfg.name, str(version))
            if final_dir.exists():
                shutil.rmtree(final_dir)
            hf_dir = hf_dir.rename(final_dir)

        samples = {}
        params = SamplingParams(
            max_new_tokens=cfg.sample.max_new_tokens,
            temperature=cfg.sample.temperature,
            top_p=cfg.sample.top_p,
            seed=cfg.sample.seed,
            stop_token_ids=[tokenizer.eos_id],
        )
        best.eval()
        for lang, prompt in cfg.sample.prompts.items():
            out = generate(best, [tokenizer.encode(prompt)], params, pad_id=tokenizer.pad_id)[0]
            samples[lang] = prompt + tokenizer.decode(out)
            print(f"sample [{lang}] {samples[lang]!r}", flush=True)
        tracking.log_text("\n".join(f"[{k}] {v}" for k, v in samples.items()), "samples.txt")
        atomic_write_json(ckpt_root / "samples.json", samples)

    last_train = next((h["loss"] for h in reversed(result.history) if "loss" in h), float("nan"))
    metrics = {
        "train_loss": last_train,
        **{f"best_{k}": v for k, v in best_metrics.items() if k.startswith("val_")},
        **{f"final_{k}": v for k, v in final_val.items()},
        "steps": float(result.step),
    }
    outputs = {
        "checkpoint_dir": str(ckpt_root),
        "best_checkpoint": str(ckpt_root / "best"),
        "tokenizer_sha256": tokenizer.sha256,
        "hf_dir": str(hf_dir),
        "model_uri": model_uri,
        "loss_curve": str(plot),
        "samples": samples,
    }
    return JobResult(
        "pretrain", outputs=outputs, metrics=metrics, mlflow_run_id=run.info.run_id, output_dir=ckpt_root
    )


if __name__ == "__main__":
    main_entry("pretrain", PretrainConfig, main)

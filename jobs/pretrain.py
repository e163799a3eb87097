"""Pretraining: `python -m jobs.pretrain --config configs/pretrain/<preset>.yaml [key=value ...]`.

Trains an llm_core model on the token shards written by `jobs.preprocess`, with Ray Train (`TorchTrainer`): on a
local Ray here, on a GPU Ray cluster unchanged. Keeps best/last checkpoints (a re-run of the same config resumes),
logs to MLflow (experiment tulpar-train), exports the best checkpoint to HF format, registers it as a new version
of `<name>` with alias `@pretrain-latest`, and prints a sample per language.

With `init` (a registered model or an HF directory) it continues pretraining that model instead of starting from
random weights: the architecture is the init's, except `model.max_seq_len` (larger) and `model.rope_scaling` (YaRN or
llama3), so a short run at a longer `train.seq_len` extends the model's context. The new version records the init as
`tulpar.parent_model_uri`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    create_model,
    model_serializer,
    model_validator,
)

from jobs.platform import registry, tracking
from jobs.platform.cache import StageCache, files_sha256, model_version_still_registered
from jobs.platform.results import (
    DatasetOutputs,
    ModelVersionOutputs,
    StageResult,
    model_reference,
    take_inputs,
)
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.prep.sources import join_uri
from jobs.reporting.plots import plot_loss_curve
from jobs.training.distributed import (
    RayTrainConfig,
    best_val_metrics,
    final_checkpoints,
    launch,
    run_dir_for,
)
from jobs.training.sampling import end_of_training_samples
from jobs.training.tasks import PretrainWindowsTask, Recall, RepeatedSpans
from llm_core.checkpoint import load_model_from_checkpoint, read_meta
from llm_core.config import ModelConfig, StrictModel, config_sha256, config_to_dict, is_hash_context
from llm_core.data import DataError
from llm_core.export_hf import check_exportable, read_hf_checkpoint
from llm_core.io import atomic_write_json
from llm_core.shards import TokenDataset, file_sha256
from llm_core.tokenizer import Tokenizer
from llm_core.trainer import TrainConfig

log = logging.getLogger("tulpar.pretrain")


VOCAB_FROM_TOKENIZER = "vocab_from_tokenizer"  # validation context: the job set model.vocab_size itself

# What a run that starts from `init` may change in the init's model config: the context length and RoPE scaling
# (context extension), and the fields the weights do not depend on (name, dropout, init_std, aux_loss_coef,
# router_bias_update_rate).
CHANGEABLE_FROM_INIT = frozenset(
    {"max_seq_len", "rope_scaling", "name", "dropout", "init_std", "aux_loss_coef", "router_bias_update_rate"}
)

# `model:` of a run with `init`: any ModelConfig key, each optional (left out or null: the init's value).
ModelChanges = create_model(
    "ModelChanges",
    __base__=StrictModel,
    __doc__="Model keys given beside `init`: each must equal the init's, except max_seq_len and rope_scaling.",
    **{key: (f.annotation | None, None) for key, f in ModelConfig.model_fields.items()},  # type: ignore[call-overload]
)


class DataSpec(StrictModel):
    dataset: str = Field(
        description="a jobs.preprocess output: a path or URI, or a name under $TULPAR_STORAGE/datasets/"
    )
    languages: list[str] | None = Field(
        None, description="languages to evaluate on; default: all in the dataset"
    )
    verify: bool = Field(False, description="check every shard's sha256 against the manifest before training")
    repeated_spans: RepeatedSpans | None = Field(
        None,
        description="synthetic long-range recall for context extension: in a share of the training windows a span "
        "of the window's own text is copied further on (null: plain windows)",
    )

    recall: Recall | None = Field(
        None,
        description="synthetic in-context recall rows added to each training micro-batch, beside the text windows: "
        "random tokens with a span written again at a random distance, learnt only on the copy (null: none)",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        for key in ("repeated_spans", "recall"):  # added later: keep earlier run keys
            if is_hash_context(info) and data.get(key) is None:
                data.pop(key, None)
        return data


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
    init: str | None = Field(
        None,
        description="continue pretraining this model instead of random weights: models:/<name>@<alias>, "
        "models:/<name>/<version> or an HF directory; its vocabulary must be the dataset's tokenizer's",
    )
    model: ModelConfig | ModelChanges | None = Field(  # type: ignore[valid-type]
        None,
        union_mode="left_to_right",
        description="a preset name or a full model config; with init, only the keys to change "
        "(model.max_seq_len, model.rope_scaling)",
    )
    data: DataSpec
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    sample: SampleSpec = Field(default_factory=SampleSpec)
    register_model: bool = Field(True, description="log the HF export to MLflow and register a model version")

    @model_validator(mode="after")
    def _model_is_complete_without_init(self) -> PretrainConfig:
        if self.init is not None or isinstance(self.model, ModelConfig):
            return self
        if self.model is None:
            raise ValueError(
                "model is not set: name a preset (model: tiny) or a full model config, or set init to continue "
                "from an existing model"
            )
        try:  # not a complete ModelConfig: say why, as ModelConfig would
            ModelConfig.model_validate(self.model.model_dump(exclude_none=True))
        except ValidationError as exc:
            problems = "; ".join(
                f"model.{'.'.join(map(str, e['loc'])) or '(config)'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(
                f"{problems}. Without init the model config must be complete: name a preset (model: tiny); only a "
                "run with init may give just the keys to change"
            ) from None
        raise AssertionError("unreachable: a valid ModelConfig validates as ModelConfig first")

    @model_validator(mode="after")
    def _repeated_spans_fit_the_window(self) -> PretrainConfig:
        spans = self.data.repeated_spans
        if spans is not None and 2 * spans.max_tokens + spans.min_distance > self.train.seq_len + 1:
            raise ValueError(
                f"data.repeated_spans: a span of max_tokens {spans.max_tokens}, its copy and min_distance "
                f"{spans.min_distance} do not fit a window of train.seq_len {self.train.seq_len} + 1 tokens: lower "
                "data.repeated_spans.max_tokens / min_distance or raise train.seq_len"
            )
        return self

    @model_validator(mode="after")
    def _recall_segments_tile_the_window(self) -> PretrainConfig:
        recall = self.data.recall
        if recall is not None and self.train.seq_len % recall.segment_tokens:
            raise ValueError(
                f"data.recall.segment_tokens {recall.segment_tokens} does not divide train.seq_len "
                f"{self.train.seq_len}: recall rows are cut into whole segments; choose a divisor of the seq_len"
            )
        return self

    @model_validator(mode="after")
    def _vocabulary_comes_from_the_tokenizer(self, info: ValidationInfo) -> PretrainConfig:
        derived = bool(info.context and info.context.get(VOCAB_FROM_TOKENIZER))
        if self.model is not None and self.model.vocab_size is not None and not derived:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) cannot be set: the model's vocabulary is the dataset's "
                "tokenizer's (the embedding is padded to a multiple of model.vocab_multiple); remove "
                "model.vocab_size, or preprocess the data with the tokenizer you want"
            )
        return self

    @model_validator(mode="after")
    def _model_is_exportable(self) -> PretrainConfig:
        # The trained model is exported to HF (registry, eval, serving): refuse an architecture with no exact HF
        # export now, before any training, rather than after hours of it. (With init: once merged, in main.)
        if isinstance(self.model, ModelConfig):
            check_exportable(self.model)
        return self

    def with_model(self, model: ModelConfig) -> PretrainConfig:
        """This config with the full model config (merged from the init's) and its vocabulary."""
        data = self.model_dump()
        data["model"] = model.model_dump()
        return PretrainConfig.model_validate(data, context={VOCAB_FROM_TOKENIZER: True})

    def with_vocabulary(self, vocab_size: int) -> PretrainConfig:
        """This config with the model's vocabulary taken from the dataset's tokenizer."""
        if not isinstance(self.model, ModelConfig):
            raise ValueError(
                "with init, the model config (and its vocabulary) is the init model's, known once init is resolved "
                "(jobs.pretrain does it): a check that needs the full model before then cannot run"
            )
        data = self.model_dump()
        data["model"]["vocab_size"] = vocab_size
        return PretrainConfig.model_validate(data, context={VOCAB_FROM_TOKENIZER: True})

    def with_inputs(self, inputs: dict[str, StageResult]) -> PretrainConfig:
        """`--input dataset=<preprocess result>`: train on that dataset (and so with its tokenizer);
        `--input init=<a training stage's result>`: continue from the model version it registered."""
        got = take_inputs("pretrain", inputs, {"dataset": (DatasetOutputs,), "init": (ModelVersionOutputs,)})
        data = self.model_dump()
        if "dataset" in got:
            data["data"]["dataset"] = got["dataset"].dataset_dir
        if "init" in got:
            data["init"] = model_reference(got["init"], "init")
        return PretrainConfig.model_validate(data)


def merged_model_config(init_cfg: ModelConfig, changes: BaseModel | None, init: str) -> ModelConfig:
    """The init's model config with the run's `model:` keys applied. Only max_seq_len (not smaller) and
    rope_scaling may change the architecture; any other key that differs from the init's is a ValueError naming it."""
    given: dict[str, Any] = {}
    if isinstance(changes, ModelConfig):  # a full config (a preset): every field, compared as given
        given = changes.model_dump(exclude={"vocab_size"})
    elif changes is not None:
        given = changes.model_dump(exclude_none=True)
    base = init_cfg.model_dump()
    for key, value in given.items():
        if key not in CHANGEABLE_FROM_INIT and value != base[key]:
            raise ValueError(
                f"model.{key} = {value!r} differs from the init model's {base[key]!r} ({init}): continued "
                "pretraining keeps the init's architecture; only model.max_seq_len and model.rope_scaling may "
                f"change (context extension). Remove model.{key}"
            )
    merged = {**base, **given}
    if merged["max_seq_len"] < init_cfg.max_seq_len:
        raise ValueError(
            f"model.max_seq_len = {merged['max_seq_len']} is below the init model's {init_cfg.max_seq_len} "
            f"({init}): context extension only lengthens the context; remove model.max_seq_len or raise it"
        )
    try:
        model = ModelConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"model.{'.'.join(map(str, e['loc'])) or '(config)'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(
            f"the init model's config with this run's model keys is invalid: {problems}"
        ) from None
    check_exportable(model)
    return model


def check_init_vocabulary(init_dir: Path, init_cfg: ModelConfig, init: str, dataset: TokenDataset) -> None:
    """The init's vocabulary must be the dataset's tokenizer's (same vocabulary size and tokenizer files)."""
    try:
        init_tokenizer = Tokenizer.from_dir(init_dir)
    except Exception as exc:
        raise ValueError(
            f"init {init!r} has no readable tokenizer in {init_dir} ({type(exc).__name__}: {exc}): start from a "
            "model exported with its tokenizer (a registered version or an export_hf directory)"
        ) from None
    if init_cfg.vocab_size != dataset.vocab_size or init_tokenizer.sha256 != dataset.tokenizer_sha256:
        raise ValueError(
            f"init {init!r} has a different vocabulary from the dataset {str(dataset.root)!r}: init vocab_size "
            f"{init_cfg.vocab_size}, tokenizer sha256 {init_tokenizer.sha256[:12]}; dataset vocab_size "
            f"{dataset.vocab_size}, tokenizer sha256 {dataset.tokenizer_sha256[:12]}. Preprocess the data with the "
            "init model's tokenizer (preprocess tokenizer: <its directory>), or pick an init trained on this one"
        )


def number_token_ids(tokenizer: Tokenizer) -> dict[str, list[int]]:
    """The tokenizer's number tokens, for recall rows of kind number_in_text: number_start_ids are the tokens a
    number after a space starts with (" 4", " 19", or the space alone where the tokenizer splits it off),
    number_piece_ids those of digits only ("8", "13")."""
    pieces = {i: tokenizer.decode([i]) for i in range(tokenizer.tk.get_vocab_size())}
    spaced = {i for i, p in pieces.items() if p[:1] == " " and p[1:].isdecimal() and p[1:].isascii()}
    firsts = {tokenizer.encode(f" {d}")[0] for d in range(10)}
    return {
        "number_start_ids": sorted(spaced | firsts),
        "number_piece_ids": [i for i, p in pieces.items() if p.isdecimal() and p.isascii()],
    }


def resolve_dataset(spec: str, settings: Settings) -> str:
    """A dataset path/URI from a path, a URI, or a bare name: `jobs.preprocess` writes `<name>` to
    $TULPAR_STORAGE/datasets/<name> ($TULPAR_STORAGE defaults to $TULPAR_HOME; on a cluster it is an s3:// URI or a
    shared volume), and a name is looked up there."""
    if "://" in spec:
        return spec
    p = Path(spec)
    if not p.exists() and "/" not in spec:
        stored = join_uri(settings.storage, f"datasets/{spec}")
        if "://" in stored:
            return stored  # TokenDataset.open reads the manifest there and names it when it is missing
        p = Path(stored)
    if not (p / "manifest.json").is_file():
        raise DataError(
            f"no dataset at {spec!r} (looked for {p / 'manifest.json'}): run `make preprocess` first, or set "
            "data.dataset to a preprocessing output directory"
        )
    return str(p.resolve())


def check_inputs(cfg: PretrainConfig, dataset: TokenDataset) -> Tokenizer:
    """The dataset, tokenizer and model must agree before any worker starts."""
    tok_path = dataset.manifest["tokenizer"].get("path")
    if not tok_path or not Path(tok_path).exists():
        raise DataError(
            f"the dataset's tokenizer {tok_path!r} is missing: re-run preprocessing with a tokenizer"
        )
    tokenizer = Tokenizer.from_dir(tok_path)
    if tokenizer.sha256 != dataset.tokenizer_sha256:
        raise DataError(
            f"tokenizer at {tok_path} changed since the dataset was built (sha256 {tokenizer.sha256[:12]} != "
            f"{dataset.tokenizer_sha256[:12]}): re-run preprocessing"
        )
    for lang in cfg.data.languages or []:
        if lang not in dataset.languages:
            raise DataError(
                f"language {lang!r} is not in the dataset (has {dataset.languages}): fix data.languages"
            )
    have = dataset.num_tokens("train")  # from the manifest: the driver never reads the shards
    need = cfg.train.seq_len + 1
    if have < need:
        raise DataError(f"not enough tokens for one training batch: need {need}, have {have}: add text")
    return tokenizer


def main(cfg: PretrainConfig, settings: Settings) -> JobResult:
    init_dir, init_identity, init_max_seq_len = None, {}, 0
    if (
        cfg.init is not None
    ):  # continue from a model: its architecture (plus the context extension) and weights
        start = registry.hf_model(cfg.init, settings)
        assert start.path is not None  # hf_model returns the files local
        init_dir = start.path
        init_cfg = read_hf_checkpoint(init_dir).cfg
        init_max_seq_len = init_cfg.max_seq_len
        model_cfg = merged_model_config(init_cfg, cfg.model, cfg.init)
        # the resolved version (an alias moves): in the config, so the run directory and cache key follow it
        cfg = cfg.model_copy(update={"init": start.uri}).with_model(model_cfg)
        init_identity = {"init_model_uri": start.uri}
        if not start.uri.startswith("models:/"):  # a directory: its files are the input
            init_identity["init_sha256"] = files_sha256([p for p in Path(init_dir).rglob("*") if p.is_file()])
    assert isinstance(cfg.model, ModelConfig)
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"train.seq_len {cfg.train.seq_len} > model.max_seq_len {cfg.model.max_seq_len}: lower train.seq_len "
            "or raise model.max_seq_len"
        )
    dataset_path = resolve_dataset(cfg.data.dataset, settings)
    dataset = TokenDataset.open(dataset_path, verify=cfg.data.verify)
    if init_dir is not None:
        check_init_vocabulary(init_dir, cfg.model, str(cfg.init), dataset)
    else:
        cfg = cfg.with_vocabulary(dataset.vocab_size)  # the model's vocabulary is the dataset's tokenizer's
    tokenizer = check_inputs(cfg, dataset)
    tracking.check_server(settings)  # fail before training if the tracking server is unreachable
    manifest_sha256 = file_sha256(dataset.root / "manifest.json")
    cache = StageCache(
        settings,
        "pretrain",
        {"config": config_to_dict(cfg), "dataset_manifest_sha256": manifest_sha256, **init_identity},
    )
    if (stored := cache.lookup(model_version_still_registered(settings))) is not None:
        return stored

    run_sha256 = config_sha256(cfg)
    if "init_sha256" in init_identity:  # a changed init directory is a new run, not a resume of the old one
        run_sha256 = hashlib.sha256((run_sha256 + init_identity["init_sha256"]).encode()).hexdigest()
    run_key = f"{cfg.name}-{run_sha256[:8]}"
    run_dir = run_dir_for(settings, run_key)
    print(
        f"model {cfg.model.name}: {cfg.model.num_params() / 1e6:.2f}M parameters, vocabulary "
        f"{cfg.model.vocab_size:,} from the tokenizer (embedding rows {cfg.model.padded_vocab_size:,}) | "
        f"dataset {dataset_path}: "
        f"{dataset.num_tokens('train'):,} training tokens | {cfg.ray.num_workers} Ray Train worker(s), "
        f"{'GPU' if cfg.ray.use_gpu else 'CPU'}",
        flush=True,
    )
    if cfg.init is not None:
        extension = cfg.model.rope_scaling
        print(
            f"continuing from {cfg.init}: max_seq_len {init_max_seq_len} -> {cfg.model.max_seq_len}, rope "
            f"scaling {extension.type + ' x' + format(extension.factor, 'g') if extension else 'none'}, training "
            f"at seq_len {cfg.train.seq_len}",
            flush=True,
        )
    tags = {
        "tulpar.tokenizer_sha256": tokenizer.sha256,
        "tulpar.dataset_manifest_sha256": manifest_sha256,
        "tulpar.model_name": cfg.name,
    }
    lineage = {"tulpar.parent_model_uri": cfg.init} if cfg.init is not None else {}
    tags.update(lineage)
    with tracking.start_run(
        settings, "pretrain", cfg, run_name=run_key, tags=tags, system_metrics=True
    ) as run:
        wants_numbers = cfg.data.recall is not None and cfg.data.recall.kinds.get("number_in_text", 0) > 0
        # decoding the whole vocabulary is only worth it for runs that write numbers
        numbers = number_token_ids(tokenizer) if wants_numbers else {}
        if wants_numbers and not numbers["number_piece_ids"]:
            raise ValueError(
                f"data.recall.kinds number_in_text: the tokenizer {tokenizer.sha256[:12]} has no token of digits "
                "only: drop number_in_text from data.recall.kinds"
            )
        task = PretrainWindowsTask(
            model=cfg.model,
            init=str(init_dir) if init_dir is not None else None,
            train=cfg.train,
            dataset=dataset_path,
            languages=cfg.data.languages,
            repeated_spans=cfg.data.repeated_spans,
            recall=cfg.data.recall,
            special_token_ids=sorted(tokenizer.tk.token_to_id(t) for t in tokenizer.special_tokens),
            **numbers,
        )
        result = launch(
            settings=settings,
            run_name=run_key,
            ray_cfg=cfg.ray,
            task=task,
            run_config=config_to_dict(cfg),
            mlflow_run_id=run.info.run_id,
            fault_marker=str(run_dir / ".fault-injected"),
        )
        best_ckpt, last_ckpt = final_checkpoints(result, settings, run_key, run_dir)
        atomic_write_json(run_dir / "checkpoints.json", {"best": best_ckpt.path, "last": last_ckpt.path})

        with best_ckpt.as_directory() as best_dir:
            best_meta = read_meta(best_dir)
            best = load_model_from_checkpoint(best_dir)
        history = tracking.metric_history(
            run.info.run_id, ["train_loss"] + [f"val_loss/{lang}" for lang in dataset.languages]
        )
        plot = plot_loss_curve(history, run_dir / "loss_curve.png", f"{cfg.name} pretraining")
        tracking.log_figure_file(plot)

        model_uri, hf_dir = tracking.publish_hf_model(
            best,
            tokenizer,
            settings,
            cfg.name,
            register=cfg.register_model,
            stage="pretrain",
            alias="pretrain-latest",
            tags={
                "tulpar.best_val_loss": f"{best_meta['metrics'].get('val_loss', float('nan')):.6f}",
                "tulpar.checkpoint": best_ckpt.path,
                **lineage,
            },
        )

        samples = end_of_training_samples(
            best,
            tokenizer,
            cfg.sample.prompts,
            chat=False,
            max_new_tokens=cfg.sample.max_new_tokens,
            temperature=cfg.sample.temperature,
            top_p=cfg.sample.top_p,
            seed=cfg.sample.seed,
        )
        for lang, text in samples.items():
            print(f"sample [{lang}] {text!r}", flush=True)
        tracking.log_text("\n".join(f"[{k}] {v}" for k, v in samples.items()), "samples.txt")

    final = result.metrics or {}
    metrics = {**best_val_metrics(best_meta), "steps": float(final.get("step", best_meta["step"]))}
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    if train_losses:
        metrics["final_train_loss"] = train_losses[-1]
    outputs = ModelVersionOutputs(
        checkpoint_dir=str(run_dir),
        best_checkpoint=best_ckpt.path,
        last_checkpoint=last_ckpt.path,
        dataset=dataset_path,
        tokenizer_sha256=tokenizer.sha256,
        parent_model_uri=cfg.init,
        hf_dir=str(hf_dir),
        model_uri=model_uri,
        loss_curve=str(plot),
        samples=samples,
    )
    return cache.store(
        JobResult(
            "pretrain", outputs=outputs, metrics=metrics, mlflow_run_id=run.info.run_id, output_dir=run_dir
        )
    )


if __name__ == "__main__":
    main_entry("pretrain", PretrainConfig, main)

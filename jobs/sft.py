"""Supervised fine-tuning: `python -m jobs.sft --config configs/sft/<name>.yaml [key=value ...]`.

Starts from a registered model (`models:/<name>@<alias>`) or an HF directory, trains on chat data with the loss on
assistant tokens only (packed rows with attention boundaries, or padded rows), fully or with LoRA, on Ray Train;
registers the result as a new version of `<name>` with alias `@sft-latest` (and logs the LoRA adapter in PEFT
format). Data: jsonl with {"messages": [...]} or {"instruction", "input", "output"} records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from jobs.platform.results import ModelVersionOutputs, StageResult, model_reference, take_inputs
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.training.distributed import RayTrainConfig
from jobs.training.posttrain import ChatSampleSpec, Prepared, run_posttrain
from jobs.training.tasks import SFTTask
from llm_core.chat_data import (
    Stats,
    encode_examples,
    pack_rows,
    pad_rows,
    read_jsonl,
    record_to_messages,
    split_holdout,
)
from llm_core.config import StrictModel
from llm_core.lora import LoRAConfig
from llm_core.tokenizer import Tokenizer
from llm_core.trainer import TrainConfig


class HubFile(StrictModel):
    """A jsonl file of a Hugging Face Hub dataset repository (downloaded with huggingface_hub; needs internet)."""

    repo_id: str
    filename: str
    revision: str | None = None


class ChatDataSpec(StrictModel):
    files: list[str] = Field(
        default_factory=list, description="jsonl files; relative paths are under TULPAR_DATA"
    )
    hub_files: list[HubFile] = Field(default_factory=list)
    max_records_per_file: int | None = Field(
        None, gt=0, description="take at most this many records of each file"
    )
    val_fraction: float = Field(0.05, ge=0, lt=1)
    packing: bool = Field(True, description="pack several conversations per row (no attention across them)")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="conversations longer than seq_len + 1"
    )


class SFTConfig(StrictModel):
    name: str = Field(description="registered model name of the result")
    init: str = Field(description="models:/<name>@<alias>, models:/<name>/<version> or an HF directory")
    data: ChatDataSpec
    lora: LoRAConfig | None = Field(None, description="train LoRA adapters instead of all weights")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=10, seq_len=512))
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    sample: ChatSampleSpec = Field(default_factory=ChatSampleSpec)
    register_model: bool = True

    def with_inputs(self, inputs: dict[str, StageResult]) -> SFTConfig:
        """`--input init=<an earlier training stage's result>`: start from that registered model version."""
        got = take_inputs("sft", inputs, {"init": (ModelVersionOutputs,)})
        if "init" not in got:
            return self
        return SFTConfig.model_validate({**self.model_dump(), "init": model_reference(got["init"], "init")})


def data_paths(files: list[str], settings: Settings) -> list[Path]:
    """Configured data files as paths: absolute or existing as given, otherwise under TULPAR_DATA."""
    return [Path(f) if Path(f).is_absolute() or Path(f).exists() else settings.data / f for f in files]


def data_files(spec: ChatDataSpec, settings: Settings) -> list[Path]:
    files = data_paths(spec.files, settings)
    for hub in spec.hub_files:
        from huggingface_hub import hf_hub_download

        try:
            files.append(
                Path(hf_hub_download(hub.repo_id, hub.filename, repo_type="dataset", revision=hub.revision))
            )
        except Exception as exc:
            raise ValueError(
                f"could not download {hub.filename} from the Hub dataset {hub.repo_id} ({type(exc).__name__}: "
                f"{exc}): check the name and your network, or download it and list it under data.files"
            ) from None
    if not files:
        raise ValueError("no SFT data: set data.files (jsonl paths) or data.hub_files")
    return files


def limited(records, limit: int | None):
    """At most `limit` records of each file (records arrive file by file)."""
    counts: dict[str, int] = {}
    for where, rec in records:
        path = where.rsplit(":", 1)[0]
        counts[path] = counts.get(path, 0) + 1
        if limit is None or counts[path] <= limit:
            yield where, rec


def prepare_sft(cfg: SFTConfig, settings: Settings, tokenizer: Tokenizer) -> Prepared:
    stats = Stats()
    records = limited(read_jsonl(data_files(cfg.data, settings)), cfg.data.max_records_per_file)
    convs = [(where, record_to_messages(rec, where)) for where, rec in records]
    examples = encode_examples(convs, tokenizer, cfg.train.seq_len + 1, cfg.data.overflow, stats)
    train, val = split_holdout(examples, cfg.data.val_fraction, cfg.train.seed)
    to_rows = pack_rows if cfg.data.packing else pad_rows
    train_rows = to_rows(train, cfg.train.seq_len, tokenizer.pad_id)
    val_rows = pad_rows(val, cfg.train.seq_len, tokenizer.pad_id)
    if not train_rows:
        raise ValueError(f"no SFT examples left for training ({stats.to_dict()}): check the data and seq_len")
    info = {
        **stats.to_dict(),
        "train_examples": len(train),
        "val_examples": len(val),
        "train_rows": len(train_rows),
    }
    return Prepared(train_rows, val_rows, info)


def main(cfg: SFTConfig, settings: Settings) -> JobResult:
    return run_posttrain(
        stage="sft",
        cfg=cfg,
        settings=settings,
        init=cfg.init,
        prepare=lambda tokenizer, _init_dir: prepare_sft(cfg, settings, tokenizer),
        task=SFTTask,
        lora=cfg.lora,
    )


if __name__ == "__main__":
    main_entry("sft", SFTConfig, main)

"""The registry of training tasks: what a Ray Train worker builds before llm_core's Trainer runs.

A training task is a pydantic spec (its `kind` is its registry name) with everything a worker needs to build the
model, its data sampler, its evaluation sets and its loss: `build(rank, world_size, device) -> TaskSetup`. The
driver (a stage's `main`) creates and validates the spec; `jobs.training.distributed.launch` ships it to the workers
as `model_dump(mode="json")`, and each worker validates it again through this registry (`task_from_dict`) before it
builds the task. Registered tasks:

| kind | stage | data | loss |
|---|---|---|---|
| `pretrain-windows` | `jobs.pretrain` (from scratch or `init`) | random windows of the token shards (optionally with repeated spans), per-language validation | next-token CE |
| `sft` | `jobs.sft`, black-box `jobs.distill` | prepared chat rows | CE on assistant tokens |
| `dpo` | `jobs.dpo` | prepared preference pairs + reference log-probs | sigmoid DPO |
| `whitebox-distill` | white-box `jobs.distill` | prepared chat rows + the teacher | KL to the teacher + CE |
| `reward-model` | `jobs.reward_model` | prepared preference pairs (token ids + attention mask) | Bradley-Terry |

New tasks subclass `TrainingTask` with a `kind: Literal["<name>"] = "<name>"` field and register with
`@register_task`. This module imports only llm_core and jobs.training/jobs.platform, never a stage module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field, SerializationInfo, model_serializer, model_validator

from jobs.training.storage import get_object
from llm_core.config import ModelConfig, StrictModel, is_hash_context
from llm_core.export_hf import load_hf
from llm_core.lora import LoRAConfig, apply_lora
from llm_core.model import Transformer
from llm_core.trainer import EvalBatches, EvalSet, TrainConfig

if TYPE_CHECKING:
    from llm_core.data import StepSampler


@dataclass
class TaskSetup:
    """What a built training task hands the shared worker loop: the model, its data and its loss."""

    model: Any  # llm_core Transformer (possibly with LoRA adapters), or a ScalarHeadModel (reward model)
    sampler: StepSampler  # RandomWindows or RowSampler
    eval_sets: list[Any]  # EvalSet / EvalBatches
    loss_fn: Callable | None = None  # None: next-token cross-entropy


class TrainingTask(StrictModel):
    """Base of every registered training task: its registry name and the training settings the worker loop uses."""

    kind: str = Field(description="the task's registry name")
    train: TrainConfig

    def build(self, rank: int, world_size: int, device: torch.device) -> TaskSetup:
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")


T = TypeVar("T", bound=type[TrainingTask])
TASKS: dict[str, type[TrainingTask]] = {}


def register_task(cls: T) -> T:
    """Class decorator: register a TrainingTask subclass under the default of its `kind` field."""
    kind = cls.model_fields["kind"].default
    if not isinstance(kind, str) or not kind:
        raise TypeError(
            f"{cls.__name__} needs a `kind: Literal[...]` field with its registry name as default"
        )
    if kind in TASKS and TASKS[kind] is not cls:
        raise TypeError(f"training task {kind!r} is already registered by {TASKS[kind].__name__}")
    TASKS[kind] = cls
    return cls


def get_task(kind: str) -> type[TrainingTask]:
    """The registered task class named `kind`."""
    if kind not in TASKS:
        raise LookupError(f"no training task {kind!r} is registered (registered: {sorted(TASKS)})")
    return TASKS[kind]


def task_from_dict(data: dict[str, Any]) -> TrainingTask:
    """A task spec from its `model_dump`, validated by the class its `kind` names."""
    if not isinstance(data, dict) or "kind" not in data:
        raise LookupError(
            f"a training task spec is a dict with its registry `kind`, got {type(data).__name__}"
        )
    return get_task(data["kind"]).model_validate(data)


# ------------------------------------------------------------------------------------------ pretraining


class RepeatedSpans(StrictModel):
    """Synthetic long-range recall in the training windows (llm_core.data.RepeatedSpanWindows): in `share` of
    them a span of the window's own text is copied further on, so that looking far back pays. For context
    extension, where the corpus's documents are shorter than the new context."""

    share: float = Field(gt=0, le=1, description="share of the training windows that get a repeated span")
    min_tokens: int = Field(8, gt=0, description="shortest span, in tokens")
    max_tokens: int = Field(32, gt=0, description="longest span, in tokens")
    min_distance: int = Field(0, ge=0, description="fewest tokens between the end of the span and its copy")
    source: Literal["text", "shuffled"] = Field(
        "text",
        description="text: the span is a stretch of the window's text; shuffled: its tokens in a random order (in "
        "both places), so only looking back predicts the copy, not a memorised continuation of the corpus",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        if is_hash_context(info) and data.get("source") == "text":  # added later: keep earlier run keys
            data.pop("source", None)
        return data

    @model_validator(mode="after")
    def _span_lengths_are_ordered(self) -> RepeatedSpans:
        check_span_lengths("repeated_spans", self.min_tokens, self.max_tokens)
        return self


def check_span_lengths(section: str, min_tokens: int, max_tokens: int) -> None:
    """A span-length range of `section` (data.repeated_spans, data.recall) must not be empty."""
    if min_tokens > max_tokens:
        raise ValueError(
            f"{section}.min_tokens ({min_tokens}) > {section}.max_tokens ({max_tokens}): lower min_tokens or raise "
            "max_tokens"
        )


class Recall(StrictModel):
    """Synthetic in-context recall rows added to every pretraining micro-batch (llm_core.data.RecallRows): random
    tokens in which a span is written again at a random distance, learnt only on the copy. They teach retrieval by
    content (induction heads), which passkey retrieval needs and which a small model does not learn from a corpus
    in a CPU budget; the text windows are unchanged, so the language model is trained as before beside them."""

    rows: int = Field(gt=0, description="recall rows per micro-batch, beside train.batch_size text windows")
    segment_tokens: int = Field(
        64,
        ge=4,
        description="each row is cut into independent segments of this many tokens (divides train.seq_len)",
    )
    min_tokens: int = Field(8, gt=1, description="shortest repeated span, in tokens")
    max_tokens: int = Field(20, gt=1, description="longest repeated span, in tokens")
    kinds: dict[str, float] = Field(
        default_factory=lambda: {"random": 1.0},
        description="weights of the segment kinds (llm_core.data.RecallRows): random (random ids, a span of them "
        "copied), random_in_text (a stretch of training text, a span of random ids copied), shuffled_in_text (text, "
        "a span of text from elsewhere in a random order copied), number_in_text (text, a few text tokens and a "
        "number copied)",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        if is_hash_context(info) and data.get("kinds") == {"random": 1.0}:
            data.pop("kinds")  # added later: keep the run keys of configs without it
        return data

    @model_validator(mode="after")
    def _span_fits(self) -> Recall:
        check_span_lengths("recall", self.min_tokens, self.max_tokens)
        from llm_core.data import RECALL_KINDS, RecallRows

        unknown = sorted(set(self.kinds) - set(RECALL_KINDS))
        if unknown or any(w < 0 for w in self.kinds.values()) or sum(self.kinds.values()) <= 0:
            raise ValueError(
                f"recall.kinds {self.kinds}: each key must be one of {list(RECALL_KINDS)} with a weight >= 0, not "
                "all 0 (e.g. {random: 0.5, number_in_text: 0.5})"
            )
        if (
            self.kinds.get("number_in_text", 0) > 0
            and self.segment_tokens + 1 < 2 * RecallRows.LONGEST_NUMBER_SPAN
        ):
            raise ValueError(
                f"recall.kinds number_in_text: its spans of up to {RecallRows.LONGEST_NUMBER_SPAN} tokens and their "
                f"copies do not fit recall.segment_tokens {self.segment_tokens}: raise segment_tokens to at least "
                f"{2 * RecallRows.LONGEST_NUMBER_SPAN - 1}"
            )
        if 2 * self.max_tokens > self.segment_tokens + 1:
            raise ValueError(
                f"recall.max_tokens {self.max_tokens}: a span and its copy do not fit a segment of "
                f"recall.segment_tokens {self.segment_tokens} + 1 tokens: lower max_tokens or raise segment_tokens"
            )
        return self


@register_task
class PretrainWindowsTask(TrainingTask):
    """Pretraining: random windows of the token shards, read through a TokenStream (never loaded into memory);
    one validation set per language."""

    kind: Literal["pretrain-windows"] = "pretrain-windows"
    model: ModelConfig
    init: str | None = Field(
        None,
        description="start from these weights (a local HF directory) instead of random ones; `model` is the init's "
        "config, possibly with a longer max_seq_len and RoPE scaling (neither changes a weight's shape)",
    )
    dataset: str = Field(description="the jobs.preprocess output directory or URI")
    languages: list[str] | None = Field(None, description="validation languages; default: all in the dataset")
    repeated_spans: RepeatedSpans | None = Field(
        None, description="copy spans of a share of the training windows further on (None: plain windows)"
    )
    recall: Recall | None = Field(
        None, description="synthetic recall rows added to each micro-batch (None: none)"
    )
    special_token_ids: list[int] = Field(
        default_factory=list, description="token ids recall rows never draw (the tokenizer's special tokens)"
    )
    number_start_ids: list[int] = Field(
        default_factory=list,
        description="the tokens a number after a space starts with: a space and digits, or the space alone where "
        "the tokenizer splits it off (recall number_in_text)",
    )
    number_piece_ids: list[int] = Field(
        default_factory=list, description="the tokenizer's tokens of digits only (recall number_in_text)"
    )

    def build_model(self) -> Transformer:
        """The model to train: `model` with random weights, or with the init's weights (RoPE tables are buffers
        computed from `model`, not weights, so the extended max_seq_len / rope_scaling apply)."""
        model = Transformer(self.model)
        if self.init is not None:
            # strict: a shape or key mismatch (an init that is not this architecture) fails loudly
            model.load_state_dict(load_hf(self.init).state_dict(), strict=True)
        return model.train()

    def build(self, rank: int, world_size: int, device: torch.device) -> TaskSetup:
        from llm_core.data import RandomWindows, RecallRows, RepeatedSpanWindows
        from llm_core.shards import TokenDataset

        dataset = TokenDataset.open(self.dataset)
        windows = dict(seed=self.train.seed, rank=rank, world_size=world_size)
        tokens, seq_len, batch_size = dataset.tokens("train"), self.train.seq_len, self.train.batch_size
        if self.repeated_spans is None:
            sampler = RandomWindows(tokens, seq_len, batch_size, **windows)
        else:
            sampler = RepeatedSpanWindows(
                tokens, seq_len, batch_size, **self.repeated_spans.model_dump(), **windows
            )
        loss_fn = None  # lm_loss
        if self.recall is not None:
            vocab = np.setdiff1d(np.arange(self.model.require_vocab_size()), self.special_token_ids)
            sampler = RecallRows(
                sampler,
                seq_len,
                **self.recall.model_dump(),
                token_ids=vocab,
                text=tokens,
                number_start_ids=self.number_start_ids,
                number_piece_ids=self.number_piece_ids,
            )
            loss_fn = recall_lm_loss
        eval_sets = [
            EvalSet(lang, dataset.tokens("val", lang), dataset.bytes_per_token("val", lang))
            for lang in self.languages or dataset.languages
        ]
        return TaskSetup(self.build_model(), sampler, eval_sets, loss_fn)


def recall_lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """lm_loss (the same forward, loss and gradient) of a batch whose last `recall_rows` rows are recall rows
    (llm_core.data.RecallRows), reporting them apart: recall_loss and recall_copy_acc (greedy accuracy on the
    copies) show when the model starts to retrieve by content; text_loss is the text windows' loss alone."""
    from llm_core.losses import IGNORE_INDEX
    from llm_core.trainer import lm_extras, lm_output

    out = lm_output(model, batch)
    extra = lm_extras(model, out)
    if "recall_rows" not in batch:  # a validation batch: text windows only, nothing to report apart
        return out.loss, extra
    targets = batch["targets"]
    n_text = targets.size(0) - int(batch["recall_rows"])
    with torch.no_grad():
        for name, rows in (("text", slice(0, n_text)), ("recall", slice(n_text, None))):
            tgt = targets[rows]
            keep = tgt != IGNORE_INDEX
            if keep.any():
                logits = out.logits[rows][keep].float()  # (targets kept, V)
                extra[f"{name}_loss"] = float(torch.nn.functional.cross_entropy(logits, tgt[keep]))
                if name == "recall":
                    extra["recall_copy_acc"] = float((logits.argmax(-1) == tgt[keep]).float().mean())
    return out.loss, extra


# ------------------------------------------------------------------------------------------ post-training


def build_model(init_dir: Path, lora: LoRAConfig | None) -> Transformer:
    """The starting model of a post-training run (an HF directory), in training mode, with LoRA adapters if asked."""
    model = load_hf(init_dir)
    model.train()
    return apply_lora(model, lora) if lora is not None else model


class ChatRowsTask(TrainingTask):
    """What the post-training tasks share: a starting model and rows the driver prepared and stored."""

    init: str = Field(description="the starting model: a local HF directory")
    lora: LoRAConfig | None = Field(None, description="train LoRA adapters instead of all weights")
    prepared: str = Field(
        description="path or URI of the driver's prepared rows: {'train': [...], 'val': [...]}"
    )

    def rows(self) -> dict[str, list[dict[str, torch.Tensor]]]:
        return get_object(self.prepared)

    def row_sampler(self, rows: list[dict[str, torch.Tensor]], rank: int, world_size: int):
        from llm_core.chat_data import RowSampler

        return RowSampler(rows, self.train.batch_size, seed=self.train.seed, rank=rank, world_size=world_size)


@register_task
class SFTTask(ChatRowsTask):
    """Supervised fine-tuning on prepared chat rows (labels only on assistant tokens)."""

    kind: Literal["sft"] = "sft"

    def build(self, rank: int, world_size: int, device: torch.device) -> TaskSetup:
        from llm_core.chat_data import batches_of

        data = self.rows()
        sampler = self.row_sampler(data["train"], rank, world_size)
        val = batches_of(data["val"], self.train.batch_size)
        return TaskSetup(
            build_model(Path(self.init), self.lora), sampler, [EvalBatches("chat", val)] if val else []
        )


def make_dpo_loss(beta: float, label_smoothing: float):
    from llm_core.losses import dpo_loss, sequence_logprobs

    def loss_fn(model, batch):
        """batch: input_ids/targets (2B, T) with chosen rows first; ref_logps (B, 2)."""
        logits = model(batch["input_ids"]).logits
        logps = sequence_logprobs(logits, batch["targets"])  # (2B,)
        pairs = logps.size(0) // 2
        ref = batch["ref_logps"]
        return dpo_loss(
            logps[:pairs], logps[pairs:], ref[:, 0], ref[:, 1], beta=beta, label_smoothing=label_smoothing
        )

    return loss_fn


@torch.no_grad()
def add_reference_logps(rows: list[dict], model, rank: int, world_size: int, batch_size: int = 8) -> None:
    """rows[i]["ref_logps"] = (chosen, rejected) sequence log-probs under `model`; rows are split across ranks and
    the results gathered, so each rank computes 1/world_size of them."""
    from llm_core.chat_data import collate
    from llm_core.losses import sequence_logprobs

    model.eval()
    mine = list(range(rank, len(rows), world_size))
    values: dict[int, torch.Tensor] = {}
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        batch = collate([rows[j] for j in idx])
        device = next(model.parameters()).device
        logps = sequence_logprobs(
            model(batch["input_ids"].to(device)).logits, batch["targets"].to(device)
        ).cpu()
        pairs = len(idx)
        for k, j in enumerate(idx):
            values[j] = torch.stack([logps[k], logps[pairs + k]])
    if world_size > 1:
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, values)
        values = {j: v for part in gathered for j, v in part.items()}
    for j, row in enumerate(rows):
        row["ref_logps"] = values[j]
    model.train()


@register_task
class DPOTask(ChatRowsTask):
    """DPO on prepared preference pairs against a frozen reference whose log-probs are computed once here."""

    kind: Literal["dpo"] = "dpo"
    reference: str | None = Field(
        None, description="reference model (local HF directory); default: the start"
    )
    beta: float = Field(gt=0)
    label_smoothing: float = Field(ge=0, lt=0.5)

    def build(self, rank: int, world_size: int, device: torch.device) -> TaskSetup:
        from llm_core.chat_data import batches_of

        data = self.rows()
        policy = build_model(Path(self.init), self.lora)
        reference = load_hf(self.reference) if self.reference else policy
        for rows in (data["train"], data["val"]):
            add_reference_logps(
                rows, reference.to(device) if reference is not policy else reference, rank, world_size
            )
        sampler = self.row_sampler(data["train"], rank, world_size)
        val = batches_of(data["val"], self.train.batch_size)
        return TaskSetup(
            policy,
            sampler,
            [EvalBatches("pairs", val)] if val else [],
            make_dpo_loss(self.beta, self.label_smoothing),
        )


def make_distill_loss(teacher, temperature: float, alpha: float):
    from llm_core.losses import distill_loss

    def loss_fn(model, batch):
        kwargs = {"segment_ids": batch.get("segment_ids"), "position_ids": batch.get("position_ids")}
        student = model(batch["input_ids"], **kwargs).logits
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"], **kwargs).logits
        loss, metrics = distill_loss(
            student, teacher_logits, batch["targets"], temperature=temperature, alpha=alpha
        )
        return loss, {**metrics, "ce_loss": metrics["ce"]}

    return loss_fn


@register_task
class WhiteboxDistillTask(SFTTask):
    """White-box distillation: SFT rows, with the loss mixing KL to a frozen teacher's distributions and CE."""

    kind: Literal["whitebox-distill"] = "whitebox-distill"  # type: ignore[assignment]
    teacher: str = Field(description="the teacher: a local HF directory sharing the student's tokenizer")
    temperature: float = Field(gt=0)
    alpha: float = Field(ge=0, le=1)

    def build(self, rank: int, world_size: int, device: torch.device) -> TaskSetup:
        task = super().build(rank, world_size, device)
        teacher = load_hf(self.teacher).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        task.loss_fn = make_distill_loss(teacher, self.temperature, self.alpha)
        return task


# ------------------------------------------------------------------------------------------ reward model


def make_bradley_terry_loss():
    from llm_core.rl_losses import bradley_terry_loss
    from llm_core.value_model import last_token_values

    def loss_fn(model, batch):
        """batch: input_ids/attention_mask (2B, T) with chosen rows first (`collate` of pair rows)."""
        mask = batch["attention_mask"]
        scores = last_token_values(model(batch["input_ids"], attention_mask=mask), mask)  # (2B,)
        pairs = scores.size(0) // 2
        loss, accuracy = bradley_terry_loss(scores[:pairs], scores[pairs:])
        margin = float((scores[:pairs] - scores[pairs:]).detach().mean())
        return loss, {"accuracy": accuracy, "margin": margin}

    return loss_fn


@register_task
class RewardModelTask(ChatRowsTask):
    """A Bradley-Terry reward model: a ScalarHeadModel on the starting model's trunk, trained on prepared preference
    pairs; the held-out pairs are the evaluation set, so val_loss is the held-out Bradley-Terry loss."""

    kind: Literal["reward-model"] = "reward-model"

    def build(self, rank: int, world_size: int, device: torch.device) -> TaskSetup:
        from llm_core.chat_data import batches_of
        from llm_core.value_model import ScalarHeadModel

        if self.lora is not None:
            raise ValueError("the reward model trains all weights: drop lora")
        model = ScalarHeadModel(
            load_hf(self.init)
        )  # the head's init draws from the seeded RNG: equal on all ranks
        base = model.base
        if base.lm_head.weight is not base.embed_tokens.weight:
            base.lm_head.weight.requires_grad_(
                False
            )  # never read by the scalar head; DDP needs every trained
            # parameter to receive a gradient
        model.train()
        data = self.rows()
        sampler = self.row_sampler(data["train"], rank, world_size)
        val = batches_of(data["val"], self.train.batch_size)
        return TaskSetup(
            model, sampler, [EvalBatches("pairs", val)] if val else [], make_bradley_terry_loss()
        )

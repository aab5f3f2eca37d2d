"""Training tasks: how records become token examples, how a batch's loss is summed, and what eval measures.

- ``causal-lm``: next-token loss on every token of a text column.
- ``sft``: chat / instruction tuning; the prompt is rendered with the tokenizer's chat template and the loss covers
  the response tokens only (labels are ``-100`` on the prompt).
- ``classification``: the prompt (a template around the text) is scored by the logits of each label's first token at
  the last position; the loss is the cross-entropy over those label logits.

Losses are returned as *sums* with the number of terms, so a global batch split over micro-batches and processes is
normalised once, by the global count (:attr:`Example.weight`).
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Record, require_column
from .device import model_device, on_device
from .errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``labels`` for language-model tasks, ``label`` (class index) for classification."""

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None

    @property
    def weight(self) -> int:
        """Number of loss terms this example contributes (predicted tokens, or 1 for a class label)."""
        if self.labels is None:
            return 1
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Sums:
    """Summed loss (a tensor, for backward) and counts of one batch."""

    loss: Tensor
    count: int
    correct: int = 0


def _accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model``'s forward (a wrapper's base model's, e.g. a PEFT model's) takes ``argument``."""
    get_base = getattr(model, "get_base_model", None)
    target = get_base() if callable(get_base) else model
    return argument in inspect.signature(target.forward).parameters


class Task:
    """Base class: tokenizes records and sums the loss of a padded batch."""

    name = ""
    padding_side = "right"
    has_accuracy = False

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    def encode(self, records: Sequence[Record]) -> list[Example]:
        """Examples of ``records``; records with nothing to learn from are counted and reported, never hidden."""
        examples = [e for e in (self.encode_one(r) for r in records) if e.weight > 0]
        dropped = len(records) - len(examples)
        if not examples:
            raise DataError(f"none of the {len(records)} records gives a trainable {self.name} example")
        if dropped:
            print(f"note: skipped {dropped} of {len(records)} records with no tokens to learn within "
                  f"--max-length {self.max_length}")
        return examples

    def encode_one(self, record: Record) -> Example:
        raise NotImplementedError

    def collate(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        """Pad to the longest example (side: :attr:`padding_side`); ``position_ids`` count real tokens only."""
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(e.input_ids)
            mask[row, cols] = 1
            if e.labels is not None:
                labels[row, cols] = torch.tensor(e.labels)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        if examples[0].labels is not None:
            batch["labels"] = labels
        else:
            batch["label"] = torch.tensor([e.label for e in examples])
        return batch

    def loss_sums(self, model: nn.Module, batch: dict[str, Tensor]) -> Sums:
        """Token-level next-token cross-entropy, summed over the labelled tokens (on the model's device)."""
        batch = on_device(batch, model_device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, :-1]  # (B, T-1, V)
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return Sums(loss, int((targets != IGNORE).sum()))


class CausalLMTask(Task):
    """Next-token prediction on ``text_column`` (an end-of-sequence token is appended when it fits)."""

    name = "causal-lm"

    def __init__(self, tokenizer: Any, max_length: int, text_column: str = "text") -> None:
        super().__init__(tokenizer, max_length)
        self.text_column = text_column

    def encode(self, records: Sequence[Record]) -> list[Example]:
        require_column(records, self.text_column, "--text-column")
        return super().encode(records)

    def encode_one(self, record: Record) -> Example:
        ids = list(self.tokenizer(str(record[self.text_column]))["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        ids = ids[: self.max_length]
        return Example(ids, labels=list(ids))


class SFTTask(Task):
    """Chat tuning: a ``messages`` list (the last one is the response) or a prompt / response column pair."""

    name = "sft"

    def __init__(self, tokenizer: Any, max_length: int, prompt_column: str = "prompt",
                 response_column: str = "response", messages_column: str = "messages") -> None:
        super().__init__(tokenizer, max_length)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--task sft needs a tokenizer with a chat template; this tokenizer has none "
                            "(use --task causal-lm, or a model folder whose tokenizer defines chat_template)")
        self.prompt_column, self.response_column, self.messages_column = prompt_column, response_column, messages_column

    def encode(self, records: Sequence[Record]) -> list[Example]:
        pairs = [r for r in records if self.messages_column not in r]
        if pairs:
            require_column(pairs, self.prompt_column, "--text-column")
            require_column(pairs, self.response_column, "--response-column")
        return super().encode(records)

    def messages(self, record: Record) -> list[dict[str, str]]:
        if self.messages_column in record:
            messages = list(record[self.messages_column])
            if not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{self.messages_column!r} must end with an assistant message: {messages!r:.200}")
            return messages
        return [{"role": "user", "content": str(record[self.prompt_column])},
                {"role": "assistant", "content": str(record[self.response_column])}]

    def encode_one(self, record: Record) -> Example:
        messages = self.messages(record)
        prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently with and without the response; "
                            "cannot tell which tokens are the response")
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])[: self.max_length]
        labels = [IGNORE if start < len(prompt) else tok
                  for tok, (start, _) in zip(ids, encoded["offset_mapping"])]
        return Example(ids, labels=labels)


class ClassificationTask(Task):
    """Label scored from the logits of each label's first token after the template with ``{text}`` filled in."""

    name = "classification"
    padding_side = "left"  # the prompt ends at the last position of every row
    has_accuracy = True

    def __init__(self, tokenizer: Any, max_length: int, labels: Sequence[str], text_column: str = "text",
                 label_column: str = "label", template: str = "{text}\nLabel:") -> None:
        super().__init__(tokenizer, max_length)
        if "{text}" not in template:
            raise DataError(f"--prompt-template {template!r} must contain {{text}}")
        self.labels, self.template = list(labels), template
        self.text_column, self.label_column = text_column, label_column
        space = "" if template.endswith((" ", "\n")) else " "
        first = [tokenizer(space + label, add_special_tokens=False)["input_ids"][:1] for label in self.labels]
        clashes = Counter(tuple(f) for f in first)
        if any(not f for f in first) or max(clashes.values()) > 1:
            raise DataError(f"labels {self.labels} must start with distinct tokens; their first tokens are "
                            f"{[tokenizer.convert_ids_to_tokens(f) for f in first]}")
        self.label_ids = torch.tensor([f[0] for f in first])

    @classmethod
    def labels_of(cls, records: Sequence[Record], label_column: str) -> list[str]:
        """Sorted distinct labels (at least two)."""
        require_column(records, label_column, "--label-column")
        labels = sorted({str(r[label_column]) for r in records})
        if len(labels) < 2:
            raise DataError(f"--label-column {label_column!r} has {len(labels)} distinct value(s); need at least 2")
        return labels

    def encode(self, records: Sequence[Record]) -> list[Example]:
        require_column(records, self.text_column, "--text-column")
        require_column(records, self.label_column, "--label-column")
        return super().encode(records)

    def encode_one(self, record: Record) -> Example:
        label = str(record[self.label_column])
        if label not in self.labels:
            raise DataError(f"label {label!r} is not one of {self.labels}")
        ids = self.tokenizer(self.template.replace("{text}", str(record[self.text_column])))["input_ids"]
        return Example(list(ids)[-self.max_length:], label=self.labels.index(label))

    def label_logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits of the label tokens at the last position: ``(B, n_labels)`` (on the model's device)."""
        batch = on_device(batch, model_device(model))
        extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], **extra).logits[:, -1]  # (B, V)
        return logits[:, self.label_ids.to(logits.device)].float()

    def loss_sums(self, model: nn.Module, batch: dict[str, Tensor]) -> Sums:
        logits = self.label_logits(model, batch)
        target = batch["label"].to(logits.device)
        loss = F.cross_entropy(logits, target, reduction="sum")
        return Sums(loss, len(target), int((logits.argmax(-1) == target).sum()))


TASKS = ("causal-lm", "sft", "classification")

"""Supervised sequences and their batches: prompt rendered as the evaluation renders it, answer
tokenised in context, one end-of-turn token supervised; prompt and padding masked with -100 by
*position*, never by token id (SmolLM2 pads with its EOS)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from e2u_models.editing.requests import target_token_ids
from e2u_models.protocol import EditRequest, MethodEnv
from e2u_models.training.hparams import TrainHParams
from e2u_tasks.errors import E2UError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One supervised sequence: prompt + answer + EOS, with labels on the answer and EOS only."""

    index: int
    ids: tuple[int, ...]
    prompt_length: int


def encode_example(tokenizer, env: MethodEnv, index: int, prompt: str, answer: str,
                   max_length: int) -> Example:
    """``prompt`` (already rendered as the evaluation renders it) followed by ``answer`` tokenised
    in context exactly as the evaluation scores it, plus one EOS (so the model learns to stop)."""
    prompt_ids = list(env.encode(prompt))
    answer_ids = list(target_token_ids(env, tokenizer, prompt_ids, prompt, answer, with_eos=True))
    ids = prompt_ids + answer_ids
    if len(ids) > max_length:  # keep the answer, cut the prompt from the left
        keep = max_length - len(answer_ids)
        if keep < 1:
            raise E2UError(f"row {index}: the answer alone is longer than max_train_length={max_length}")
        ids = prompt_ids[-keep:] + answer_ids
        prompt_ids = prompt_ids[-keep:]
    return Example(index=index, ids=tuple(ids), prompt_length=len(prompt_ids))


def examples_of(tokenizer, env: MethodEnv, requests: Sequence[EditRequest], hparams: TrainHParams,
                answer_of: Callable[[EditRequest], str] = lambda r: r.answer) -> list[Example]:
    return [encode_example(tokenizer, env, r.index, r.prompt, answer_of(r), hparams.max_train_length)
            for r in requests]


@dataclass
class Batch:
    """*Left*-padded ids, attention mask, position ids and labels (-100 on prompt and padding, by
    position). Left padding puts every row's answer at the end, so the vocabulary head runs only
    on the last ``keep`` positions (the longest answer + 1) instead of the whole sequence."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    keep: int

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[Example], pad_id: int, device) -> Batch:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        start = width - len(example.ids)
        ids[row, start:] = torch.tensor(example.ids)
        mask[row, start:] = 1
        labels[row, start + example.prompt_length:] = ids[row, start + example.prompt_length:]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = min(width, 1 + max(len(e.ids) - e.prompt_length for e in examples))
    return Batch(ids.to(device), mask.to(device), labels.to(device), positions.to(device), keep)


@dataclass
class StepBatch:
    """What one micro-step's loss sees. ``forget_indices`` are positions in the forget list (DPO
    looks up its precomputed reference log-probabilities by them)."""

    forget: Batch
    forget_indices: list[int]
    retain: Batch | None = None
    extra: dict = field(default_factory=dict)

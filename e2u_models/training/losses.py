"""Loss building blocks of the training-based methods, on left-padded :class:`Batch` es."""

from __future__ import annotations

import torch

from e2u_models.training.batching import IGNORE, Batch


def logits_of(model, batch: Batch, all_positions: bool = False) -> torch.Tensor:
    """Logits of the last ``batch.keep`` positions (every position with ``all_positions``)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids,
                 logits_to_keep=0 if all_positions else batch.keep).logits


def token_logprobs(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every label token (shifted) and the label mask, ``[B, positions-1]``;
    ``logits`` cover the last positions of the batch (see :func:`logits_of`)."""
    labels = batch.labels[:, -logits.shape[1]:][:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def nll(model, batch: Batch) -> torch.Tensor:
    """Token-mean cross-entropy over all label tokens of the batch (HF's ``outputs.loss``)."""
    picked, mask = token_logprobs(logits_of(model, batch), batch)
    return -picked.sum() / mask.sum().clamp(min=1)


def sequence_logprob(model, batch: Batch) -> torch.Tensor:
    """S(q, a): the summed log-probability of each sequence's label tokens, ``[B]``."""
    picked, _ = token_logprobs(logits_of(model, batch), batch)
    return picked.sum(-1)


def masked_kl(current_logits: torch.Tensor, reference_logits: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) summed over the vocabulary, averaged over the *real* positions (prompt
    and answer; padding excluded, unlike the references, whose value depends on padding)."""
    current = torch.log_softmax(current_logits.float(), dim=-1)
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    per_position = (reference.exp() * (reference - current)).sum(-1)
    mask = attention_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)

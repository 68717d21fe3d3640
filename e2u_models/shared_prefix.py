"""Batched scoring and greedy decoding that compute the prompts' common prefix once.

Every e2u prompt starts with the same chat-template text (system prompt, user header): about half
of SmolLM2's prompt tokens. Running that prefix once, repeating its key/value cache across the
batch and feeding only each row's remaining tokens roughly halves the prompt cost of both request
types. Rows are left-padded *after* the prefix (``[prefix | pad | rest]``) with matching attention
mask and position ids, so each row computes exactly what it would alone, up to float rounding.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch


def common_prefix_length(rows: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Length of the token prefix shared by all rows, leaving at least ``keep`` tokens per row."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - keep
    length = 0
    first = rows[0]
    while length < limit and all(r[length] == first[length] for r in rows):
        length += 1
    return max(length, 0)


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class SharedPrefixRunner:
    """Forward passes over ``prefix + row`` for many rows, the prefix computed once."""

    def __init__(self, model, prefix: Sequence[int], pad_id: int, device) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.prefix_length = len(prefix)
        # transformers >= 5.2x calls the key/value cache argument ``cache``; older releases
        # ``past_key_values`` (deprecated since).
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._prefix_cache = None
        if prefix:
            with torch.no_grad():
                out = model(torch.tensor([list(prefix)], device=device), use_cache=True)
            self._prefix_cache = _cache_of(out)

    def _cache_for(self, batch: int):
        if self._prefix_cache is None:
            return None
        cache = copy.deepcopy(self._prefix_cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def _left_padded(self, rows: Sequence[Sequence[int]]):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.prefix_length + width), dtype=torch.long)
        mask[:, : self.prefix_length] = 1
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, self.prefix_length + width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _positions(self, mask: torch.Tensor, width: int) -> torch.Tensor:
        positions = mask.cumsum(-1) - 1
        return positions.clamp(min=0)[:, -width:]

    @torch.no_grad()
    def last_logits(self, rows: Sequence[Sequence[int]], keep: int):
        """Logits of the last ``keep`` positions of every row (rows end-aligned), with the cache
        and mask to continue decoding."""
        ids, mask = self._left_padded(rows)
        cache = self._cache_for(len(rows))
        out = self.model(input_ids=ids, attention_mask=mask,
                         position_ids=self._positions(mask, ids.shape[1]),
                         use_cache=True, logits_to_keep=keep, **{self._cache_arg: cache})
        return out.logits, _cache_of(out), mask

    @torch.no_grad()
    def greedy(self, rows: Sequence[Sequence[int]], max_new_tokens: int, is_done) -> list[list[int]]:
        """Greedy continuation of each row; ``is_done(row_index, tokens)`` says when a row stops."""
        logits, cache, mask = self.last_logits(rows, keep=1)
        generated: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        for _step in range(max_new_tokens):
            next_tokens = logits[:, -1, :].argmax(-1)
            for i, token in enumerate(next_tokens.tolist()):
                if not finished[i]:
                    generated[i].append(token)
                    finished[i] = is_done(i, generated[i])
            if all(finished) or _step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            position = (mask.sum(-1, keepdim=True) - 1)
            out = self.model(input_ids=next_tokens.unsqueeze(-1), attention_mask=mask,
                             position_ids=position, use_cache=True, **{self._cache_arg: cache})
            logits, cache = out.logits, _cache_of(out)
        return generated

"""Batched answer scoring and greedy decoding from one prompt pass, common prefix computed once.

Every e2u prompt starts with the same chat-template text (system prompt, user header), a large
part of each prompt. Running that prefix once, repeating its key/value cache across the batch
and feeding only each row's remaining tokens saves that part of the prompt cost. The gold answer
is scored teacher-forced in the same forward pass that reads the prompt, and greedy decoding
continues from that pass's cache with each row's answer positions dropped, so each prompt is
computed once. Rows are padded *after* the prefix with matching attention mask and position ids,
so each row computes what it would alone, up to float rounding; a batch of rows of similar
length (prompt plus answer) pads little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from e2u_models.layers import (cache_keyword, cache_of, gather_cache_positions, repeated_cache,
                               reserve_cache_positions, select_cache_rows)


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


@dataclass
class ScoredBatch:
    """One batch's teacher-forced forward (:meth:`SharedPrefixRunner.score_answers`).

    ``logits``: ``[rows, longest answer, vocab]``, row ``i``'s answer predictions right-aligned
    (its last ``answer_lengths[i]`` entries); ``cache``/``mask``: the prompts' state for
    :meth:`SharedPrefixRunner.greedy`; ``hidden_states``: the forward's ``output_hidden_states``
    or None; ``prompt_ends``: per row, the sequence index of its prompt's last token in them.
    """

    logits: torch.Tensor
    answer_lengths: list[int]
    cache: object
    mask: torch.Tensor
    hidden_states: tuple | None
    prompt_ends: torch.Tensor

    def answer_logits(self, row: int) -> torch.Tensor:
        """``[answer length, vocab]``: the logits predicting each of the row's answer tokens."""
        return self.logits[row, self.logits.shape[1] - self.answer_lengths[row]:]

    def first_logits(self) -> torch.Tensor:
        """``[rows, vocab]``: the logits after each prompt (the first answer / greedy token)."""
        starts = torch.tensor([self.logits.shape[1] - n for n in self.answer_lengths],
                              device=self.logits.device)
        return self.logits[torch.arange(len(starts), device=starts.device), starts]


class SharedPrefixRunner:
    """Forward passes over ``prefix + row`` for many rows, the prefix computed once."""

    def __init__(self, model, prefix: Sequence[int], pad_id: int, device) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.prefix_length = len(prefix)
        self._cache_arg = cache_keyword(model)
        self._prefix_cache = None
        if prefix:
            with torch.no_grad():
                out = model(torch.tensor([list(prefix)], device=device), use_cache=True)
            self._prefix_cache = cache_of(out)

    def _cache_for(self, batch: int):
        if self._prefix_cache is None:
            return None
        return repeated_cache(self._prefix_cache, batch)

    @torch.no_grad()
    def score_answers(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                      hidden_states: bool = False, for_decoding: bool = True) -> ScoredBatch:
        """One forward over ``prompt + answer`` for every row.

        Layout ``[prefix | pad | prompt | answer]``: each row right-aligned by its whole length
        (rows of similar length in one batch pad little), the last answer token not fed. The
        result holds the logits predicting each answer token (the first one also starts greedy
        decoding), the cache and mask rearranged to ``[prefix | pad | prompt]`` (prompts
        end-aligned, answers dropped) ready for :meth:`greedy`, and with ``hidden_states`` the
        same forward's hidden states after every layer. ``for_decoding=False`` (scoring only)
        skips that rearrangement, a second copy of the whole cache: ``cache`` and ``mask`` are
        then None.
        """
        answer_lengths = [len(a) for a in answers]
        lengths = [len(p) + len(a) - 1 for p, a in zip(prompts, answers)]
        rows, total, longest = len(prompts), max(lengths), max(answer_lengths)
        ids = torch.full((rows, total), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, self.prefix_length + total), dtype=torch.long)
        mask[:, : self.prefix_length] = 1
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            ids[i, total - lengths[i]:] = torch.tensor(list(prompt) + list(answer[:-1]))
            mask[i, self.prefix_length + total - lengths[i]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -total:]
        extra = {"output_hidden_states": True} if hidden_states else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=longest,
                         **{self._cache_arg: self._cache_for(rows)}, **extra)
        prompt_ends = torch.tensor([total - n for n in answer_lengths], device=self.device)
        hidden = out.hidden_states if hidden_states else None
        if not for_decoding:
            return ScoredBatch(out.logits, answer_lengths, None, None, hidden, prompt_ends)
        cache, width = cache_of(out), max(len(p) for p in prompts)
        # Decoding continues after each prompt: gather every row's prompt keys/values into the
        # end-aligned layout [prefix | pad | prompt]; the pad columns stay masked.
        columns = torch.arange(width, device=self.device) - width + 1
        source = (prompt_ends[:, None] + columns).clamp(min=0) + self.prefix_length
        prefix_columns = torch.arange(self.prefix_length, device=self.device).expand(rows, -1)
        gather_cache_positions(cache, torch.cat([prefix_columns, source], dim=1))
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        decode_mask = torch.cat([mask[:, : self.prefix_length],
                                 (columns[None] > -prompt_lengths[:, None]).long()], dim=1)
        return ScoredBatch(out.logits, answer_lengths, cache, decode_mask, hidden, prompt_ends)

    @torch.no_grad()
    def greedy(self, first_logits: torch.Tensor, cache, mask: torch.Tensor, max_new_tokens: int,
               is_done, pick=None) -> list[list[int]]:
        """Greedy continuation from :meth:`score_answers`' state (``first_logits``: ``[batch,
        vocab]`` after the prompt); ``is_done(row, tokens)`` says when a row stops. ``pick``
        (logits -> token ids) replaces the argmax, e.g. by a seeded sampler."""
        rows = first_logits.shape[0]
        logits = first_logits
        reserve_cache_positions(cache, max_new_tokens - 1)
        generated: list[list[int]] = [[] for _ in range(rows)]
        active = list(range(rows))  # batch row -> original row; finished rows leave the batch
        for step in range(max_new_tokens):
            next_tokens = logits.argmax(-1) if pick is None else pick(logits)
            keep = []
            for position, (row, token) in enumerate(zip(active, next_tokens.tolist())):
                generated[row].append(token)
                if not is_done(row, generated[row]):
                    keep.append(position)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=next_tokens.device)
                select_cache_rows(cache, index)
                mask, next_tokens = mask[index], next_tokens[index]
                active = [active[p] for p in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(input_ids=next_tokens.unsqueeze(-1), attention_mask=mask,
                             position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True,
                             **{self._cache_arg: cache})
            logits, cache = out.logits[:, -1, :], cache_of(out)
        return generated


def continue_greedily(model, encoded: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int,
                      is_done, pick=None, batch_size: int = 16) -> list[list[int]]:
    """The continuation tokens of each encoded prompt (greedy, or ``pick``), in batches, the
    prompts' common prefix computed once; ``is_done(row, tokens)`` says when a row stops."""
    if not encoded:
        return []
    device = next(model.parameters()).device
    prefix = common_prefix_length(encoded)
    runner = SharedPrefixRunner(model, encoded[0][:prefix], pad_id, device)
    generated: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = [list(row[prefix:]) for row in encoded[start:start + batch_size]]
        scored = runner.score_answers(chunk, [[pad_id]] * len(chunk))
        generated += runner.greedy(scored.first_logits(), scored.cache, scored.mask, max_new_tokens,
                                   is_done, pick)
        del scored  # its grown cache is not held through the next batch's forward
    return generated


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end a reply: EOS and the chat format's end-of-turn token when it has one."""
    return {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
            if isinstance(t, int) and t != tokenizer.unk_token_id}

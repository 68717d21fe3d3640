"""Batched answer scoring and greedy decoding from one prompt pass, common prefix computed once.

Every e2u prompt starts with the same chat-template text (system prompt, user header), a large
part of each prompt. Running that prefix once, repeating its key/value cache across the batch
and feeding only each row's remaining tokens saves that part of the prompt cost. The gold answer
is scored teacher-forced in the same forward pass that reads the prompt, and greedy decoding
continues from that pass's cache cropped back to the prompt, so each prompt is computed once.
Rows are padded *after* the prefix with matching attention mask and position ids, so each row
computes what it would alone, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from e2u_models.layers import cache_keyword, cache_of, crop_cache, repeated_cache, select_cache_rows


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

    def score_answers(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]):
        """One forward over ``prompt + answer`` for every row.

        Layout ``[prefix | pad | prompt | answer | pad]``: prompts end-aligned, answers after them
        and right-padded (masked). Returns the logits at the positions predicting each answer
        token (``[batch, max answer length, vocab]``; position 0 is also the first greedy
        token), and the cache and mask cropped to the prompts, ready for :meth:`greedy`.
        """
        return self.score_answers_and_layers(prompts, answers, hidden_states=False)[:3]

    @torch.no_grad()
    def score_answers_and_layers(self, prompts: Sequence[Sequence[int]],
                                 answers: Sequence[Sequence[int]], hidden_states: bool = True):
        """:meth:`score_answers`, and with ``hidden_states`` the same forward's hidden states
        after every layer (else None); their index ``max(len(p) for p in prompts) - 1`` is every
        prompt's last token."""
        width = max(len(p) for p in prompts)
        longest = max(len(a) for a in answers)
        rows, total = len(prompts), width + longest - 1
        ids = torch.full((rows, total), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, self.prefix_length + total), dtype=torch.long)
        mask[:, : self.prefix_length] = 1
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            tail = list(answer[:-1])
            ids[i, width - len(prompt): width + len(tail)] = torch.tensor(list(prompt) + tail)
            mask[i, self.prefix_length + width - len(prompt): self.prefix_length + width + len(tail)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -total:]
        extra = {"output_hidden_states": True} if hidden_states else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=longest,
                         **{self._cache_arg: self._cache_for(rows)}, **extra)
        cache = cache_of(out)
        if longest > 1:  # drop the answer positions
            crop_cache(cache, longest - 1)
        return (out.logits, cache, mask[:, : self.prefix_length + width],
                out.hidden_states if hidden_states else None)

    @torch.no_grad()
    def greedy(self, first_logits: torch.Tensor, cache, mask: torch.Tensor, max_new_tokens: int,
               is_done, pick=None) -> list[list[int]]:
        """Greedy continuation from :meth:`score_answers`' state (``first_logits``: ``[batch,
        vocab]`` after the prompt); ``is_done(row, tokens)`` says when a row stops. ``pick``
        (logits -> token ids) replaces the argmax, e.g. by a seeded sampler."""
        rows = first_logits.shape[0]
        logits = first_logits
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
        logits, cache, mask = runner.score_answers(chunk, [[pad_id]] * len(chunk))
        generated += runner.greedy(logits[:, 0], cache, mask, max_new_tokens, is_done, pick)
    return generated


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end a reply: EOS and the chat format's end-of-turn token when it has one."""
    return {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
            if isinstance(t, int) and t != tokenizer.unk_token_id}

"""Edit requests as token rows: the key position, the target ids, context prefixes, merging.

Key position (``KeySpec.fact_token``): TOFU and PISTOL questions have no annotated subject, so
the default ``question_last`` puts the key on the question's last token inside the rendered
prompt (before the chat template's end-of-turn and assistant header). ``subject_last`` uses the
row's ``subject`` field when a user data file has one, else a heuristic subject (the last quoted
span, else the last run of capitalised words after the first word, else the whole question).
``prompt_last`` is the prompt's final token (the assistant header's newline with a chat template).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from e2u_models.protocol import EditRequest, MethodEnv
from e2u_tasks.errors import E2UError
from e2u_tasks.refusal import key_entity

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class KeySpec:
    """How requests become rows: where the key sits (``fact_token``), the sampled context
    prefixes ([[new tokens, count], ...]; empty = the bare prompt only), where a merged request
    reads its keys (``merge_keys``) and whether the target ends with the end-of-turn token."""

    fact_token: str = "question_last"
    context_template_length_params: list[list[int]] = field(default_factory=list)
    merge_keys: str = "merged"
    target_eos: bool = True

    @classmethod
    def of(cls, hparams) -> KeySpec:
        """The key settings of a locate-then-edit method's hparams."""
        return cls(hparams.fact_token, hparams.context_template_length_params, hparams.merge_keys,
                   hparams.target_eos)


@dataclass(frozen=True)
class EditRow:
    """One token sequence of an edit: ``ids`` = prompt (+ target without its last token),
    ``key`` = index of the key token, ``labels`` = the target ids predicted from position
    ``label_start`` on (empty for a key-only row)."""

    request: int
    ids: tuple[int, ...]
    key: int
    labels: tuple[int, ...] = ()
    label_start: int = 0


@dataclass
class PreparedRequest:
    """An edit request tokenised: its prompt under every context, the key position in each and
    the target ids; ``kl_ids``/``kl_key`` the KL-anchor row ``"<key text> is a"``."""

    request: EditRequest
    contexts: list[tuple[int, ...]]  # prompt ids, one per context (the bare prompt first)
    keys: list[int]
    target_ids: tuple[int, ...]
    kl_ids: tuple[int, ...]
    kl_key: int
    # Which question each context asks: 0 = the request's prompt, k = its k-th merged question
    # asked alone (``merge_keys=members``); prefixed contexts share their question's number.
    views: list[int]

    def nll_rows(self, number: int) -> list[EditRow]:
        rows = []
        for ids, key in zip(self.contexts, self.keys):
            rows.append(EditRow(number, tuple(ids) + self.target_ids[:-1], key, self.target_ids,
                                len(ids) - 1))
        return rows

    def kl_row(self, number: int) -> EditRow:
        # Only the distribution at the key token is compared: later tokens are never needed.
        return EditRow(number, self.kl_ids[: self.kl_key + 1], self.kl_key)

    def key_rows(self, number: int) -> list[EditRow]:
        return [EditRow(number, tuple(ids[: key + 1]), key) for ids, key in zip(self.contexts, self.keys)]



def merge_requests(requests: Sequence[EditRequest], n: int, render: Callable[[str], str]) -> list[EditRequest]:
    """Query merging: consecutive groups of ``n`` questions become one prompt (questions joined
    by a space) with the first request's target; the key sits at the merged question's end."""
    if n <= 1:
        return list(requests)
    merged = []
    for start in range(0, len(requests), n):
        group = requests[start: start + n]
        question = " ".join(r.question.strip() for r in group)
        merged.append(replace(group[0], question=question, prompt=render(question),
                              answer=" ".join(r.answer for r in group), subject=None,
                              merged_indices=tuple(r.index for r in group)))
    return merged


def _key_index(env: MethodEnv, tokenizer, text: str, ids: Sequence[int], char_end: int) -> int:
    """Index of the token of ``ids`` (the encoding of ``text``) that holds character ``char_end - 1``."""
    head = env.encode(text[:char_end])
    if head and list(ids[: len(head)]) == list(head):
        return len(head) - 1
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(ids) - len(encoded["input_ids"])
    if shift < 0 or list(ids[shift:]) != list(encoded["input_ids"]):
        raise E2UError("cannot locate the key token in the prompt's tokens; use fact_token=prompt_last")
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        if start < char_end <= end or (start <= char_end - 1 < end):
            return i + shift
    raise E2UError("cannot locate the key token in the prompt's tokens; use fact_token=prompt_last")


def _key_text_span(request: EditRequest, prompt: str, fact_token: str) -> tuple[int, int]:
    """(start of the question in the prompt, end of the key text in the prompt)."""
    start = prompt.rfind(request.question)
    if start < 0:
        raise E2UError("the rendered prompt does not contain the question verbatim; use "
                       "fact_token=prompt_last")
    if fact_token == "prompt_last":
        return start, len(prompt)
    if fact_token == "subject_last":
        subject = (request.subject or key_entity(request.question)).strip()
        inside = request.question.rfind(subject)
        if not subject or inside < 0:
            raise E2UError(f"row {request.index}: subject {subject!r} does not occur in its question")
        return start, start + inside + len(subject)
    return start, start + len(request.question.rstrip())


def target_token_ids(env: MethodEnv, tokenizer, prompt_ids: Sequence[int], prompt: str,
                     target: str, with_eos: bool) -> tuple[int, ...]:
    """Target ids tokenised after the prompt exactly as the evaluation tokenises an answer."""
    text = env.answer_delimiter + target
    whole = env.encode(prompt + text)
    if list(whole[: len(prompt_ids)]) == list(prompt_ids) and len(whole) > len(prompt_ids):
        ids = list(whole[len(prompt_ids):])
    else:
        ids = env.encode(text)
    eos = tokenizer.eos_token_id
    if with_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if not ids:
        raise E2UError("an edit target is empty after tokenisation")
    return tuple(ids)


def sample_context_prefixes(model, tokenizer, params: Sequence[Sequence[int]], seed: int) -> list[str]:
    """EasyEdit-style context prefixes: short texts the model writes (top-k 5, seeded) after the
    seed words, braces removed, ending with ". " so the question follows as a new sentence."""
    prefixes = []
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for length, count in params:
            seeds = [CONTEXT_SEEDS[i % len(CONTEXT_SEEDS)] for i in range(count)]
            for word in seeds:
                ids = tokenizer(word, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         top_k=5, max_new_tokens=length,
                                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                text = tokenizer.decode(out[0], skip_special_tokens=True)
                prefixes.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
    finally:
        torch.random.set_rng_state(generator_state)
    return prefixes


def prepare_requests(model, tokenizer, requests: Sequence[EditRequest], spec: KeySpec,
                     env: MethodEnv, seed: int, originals: Sequence[EditRequest] = ()) -> list[PreparedRequest]:
    """Tokenise every request under every context, find its key tokens and target ids.
    ``originals``: the unmerged requests, whose questions a merged request takes as extra
    contexts when ``merge_keys`` is "members"."""
    prefixes = sample_context_prefixes(model, tokenizer, spec.context_template_length_params,
                                       seed) if spec.context_template_length_params else []
    by_index = {r.index: r for r in originals}
    prepared = []
    for request in requests:
        if not request.target:
            raise E2UError(f"forget row {request.index} has no target; editing methods need one")
        views = [request]
        if spec.merge_keys == "members" and len(request.merged_indices) > 1:
            if not all(i in by_index for i in request.merged_indices):
                raise ValueError("merge_keys=members needs the unmerged requests (originals=)")
            views += [by_index[i] for i in request.merged_indices]
        contexts, keys, view_numbers = [], [], []
        spans = [_key_text_span(view, view.prompt, spec.fact_token) for view in views]
        for number, (view, (q_start, key_end)) in enumerate(zip(views, spans)):
            for prefix in ["", *prefixes]:
                prompt = view.prompt[:q_start] + prefix + view.prompt[q_start:]
                ids = env.encode(prompt)
                contexts.append(tuple(ids))
                keys.append(_key_index(env, tokenizer, prompt, ids, key_end + len(prefix)))
                view_numbers.append(number)
        target = target_token_ids(env, tokenizer, contexts[0], request.prompt, request.target,
                                  spec.target_eos)
        q_start, key_end = spans[0]
        key_text = request.prompt[q_start:key_end] if spec.fact_token != "prompt_last" else request.question
        kl_text = f"{key_text.strip()} is a"
        kl_ids = env.encode(kl_text)
        kl_key = _key_index(env, tokenizer, kl_text, kl_ids, len(key_text.strip()))
        prepared.append(PreparedRequest(request, contexts, keys, target, tuple(kl_ids), kl_key, view_numbers))
    return prepared


def question_key_rows(tokenizer, questions: Sequence[str], fact_token: str, env: MethodEnv) -> list[EditRow]:
    """Key-only rows of bare questions, rendered and keyed exactly like edit requests."""
    rows = []
    for number, question in enumerate(questions):
        request = EditRequest(index=number, question=question, prompt=env.render(question), answer="")
        _, key_end = _key_text_span(request, request.prompt, fact_token)
        ids = env.encode(request.prompt)
        key = _key_index(env, tokenizer, request.prompt, ids, key_end)
        rows.append(EditRow(number, tuple(ids[: key + 1]), key))
    return rows



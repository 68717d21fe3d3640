"""Shared machinery of the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

These methods rewrite the weight W of one MLP output projection per edited layer so that a *key*
k (the projection's input at one token of the prompt) maps to a new *value* that makes the model
produce the target. This module holds what the three share: the hyperparameters, the edit rows
(prompt, key position, target token ids, context prefixes, query merging), reading keys and values
at the key position, the second-moment statistics they ask for, and the verification report.
The target-vector (v*) optimisation lives in :mod:`e2u_models.editing.vstar`.

Key position (hparam ``fact_token``): TOFU and PISTOL questions have no annotated subject, so the
default ``question_last`` puts the key on the question's last token inside the rendered prompt
(before the chat template's end-of-turn and assistant header). ``subject_last`` uses the row's
``subject`` field when a user data file has one, else a heuristic subject (the last quoted span,
else the last run of capitalised words after the first word, else the whole question).
``prompt_last`` is the prompt's final token (the assistant header's newline with a chat template).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from e2u_models.protocol import EditRequest, MethodEnv
from e2u_tasks.refusal import key_entity
from e2u_tasks.errors import E2UError

FACT_TOKENS = ("question_last", "subject_last", "prompt_last")
MERGE_KEYS = ("merged", "members")
CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class LocateHParams:
    """Hyperparameters shared by ROME, MEMIT and AlphaEdit (EasyEdit's names where they mean the
    same). ``layers`` wins over ``layer_fractions`` (relative depth in [0, 1], so one file serves
    llama-style models of any depth)."""

    layers: list[int] | None = None
    layer_fractions: list[float] = field(default_factory=lambda: [0.15])
    rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj"
    layer_module_tmp: str = "model.layers.{}"
    fact_token: str = field(default="question_last", metadata={"choices": FACT_TOKENS})
    # [[new tokens, count], ...] of prefixes sampled from the model (EasyEdit's contexts); [] =
    # the bare prompt only.
    context_template_length_params: list[list[int]] = field(default_factory=list)
    v_num_grad_steps: int = field(default=25, metadata={"min": 1})
    v_lr: float = field(default=0.5, metadata={"above": 0})
    v_weight_decay: float = field(default=1e-3, metadata={"min": 0})
    clamp_norm_factor: float = field(default=4.0, metadata={"above": 0})
    kl_factor: float = field(default=0.0625, metadata={"min": 0})
    v_loss_threshold: float = field(default=5e-2, metadata={"above": 0})
    # fast: all requests of a batch together, upper layers only, logits only where the loss reads
    # them; classic: one request at a time with full forward passes (the reference).
    v_mode: str = field(default="fast", metadata={
        "choices": ("fast", "classic"), "message": "hparam {name}={value!r} is not accepted; use fast or classic"})
    # Teach the end-of-turn token after the refusal, so generation stops there.
    target_eos: bool = True
    # Merge this many forget questions (dataset order) into one edit prompt with one target.
    merge: int = field(default=1, metadata={"min": 1, "message": "merge={value} is not accepted; merge counts "
                                                               "questions per edit (1 = no merging, e.g. merge=5)"})
    # Where a merged edit reads its key: "merged" = the merged prompt only (the paper: the key at
    # its end); "members" = the merged prompt and each of its questions asked alone, as contexts
    # (v* must make every one refuse; ROME's key is their mean, MEMIT/AlphaEdit take one key
    # column per question), so the edit sits on the keys the evaluation will see.
    merge_keys: str = field(default="merged", metadata={"choices": MERGE_KEYS})
    stats_corpus: str = "e2u"
    mom2_n_tokens: int = field(default=100_000, metadata={"min": 1})
    mom2_max_length: int = 512
    mom2_dtype: str = field(default="float32", metadata={
        "choices": ("float32", "float64"), "message": "hparam {name}={value!r} is not accepted; use float32 or float64"})
    # Preserved knowledge besides the corpus (AlphaEdit's K0 are keys of facts): the keys at
    # ``fact_token`` of e2u's own questions ("factual", "generic") or a file's (one a line), the
    # questions about the evaluated dataset's entities dropped; their second moment, weighted by
    # ``preserve_weight``, is added to C. None: the corpus alone.
    preserve_questions: str | None = None
    preserve_weight: float = field(default=10.0, metadata={"min": 0})
    # A request whose per-token target NLL after editing stays above this is reported unreached.
    verify_nll: float = field(default=1.0, metadata={"above": 0})

    def validate(self) -> None:
        if self.layers is not None and not self.layers:
            raise E2UError("hparam layers=[] is empty; give layer indices or drop it to use layer_fractions")
        if self.layers is None and (not self.layer_fractions
                                    or any(not 0.0 <= f <= 1.0 for f in self.layer_fractions)):
            raise E2UError(f"hparam layer_fractions={self.layer_fractions} must be numbers in [0, 1]")
        # Choices and ranges of single fields are declared on the fields (checked by
        # e2u_models.hparams); here: rules across fields, and look-ups of corpora and files.
        from e2u_models.editing.stats import corpus_kind

        corpus_kind(self.stats_corpus)
        if self.preserve_questions is not None:
            from e2u_models.question_sets import check_question_source

            check_question_source(self.preserve_questions, "preserve_questions")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or min(pair) < 1:
                raise E2UError("hparam context_template_length_params must be pairs "
                               f"[new tokens, count] of positive ints, got {pair}")

    def resolved_layers(self, n_layers: int) -> list[int]:
        """Edit layers for a model with ``n_layers`` blocks, checked to be in range."""
        if self.layers is None:
            return sorted({round(f * (n_layers - 1)) for f in self.layer_fractions})
        bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if bad:
            raise E2UError(f"hparam layers={list(self.layers)} is out of range for this model "
                           f"({n_layers} layers: accepted 0..{n_layers - 1})")
        return sorted(set(self.layers))

    def check_model(self, config) -> None:
        """Checks that need only the model's config (run before its weights are loaded)."""
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is not None:
            self.resolved_layers(int(n_layers))


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def module_named(model, template: str, layer: int, hparam: str) -> torch.nn.Module:
    name = template.format(layer)
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise E2UError(f"module {name!r} does not exist in this {model.config.model_type} model; "
                       f"set hparam {hparam} to this architecture's module path with {{}} for the layer")
    return module


def rewrite_weight(model, hparams: LocateHParams, layer: int) -> torch.nn.Parameter:
    module = module_named(model, hparams.rewrite_module_tmp, layer, "rewrite_module_tmp")
    if not isinstance(getattr(module, "weight", None), torch.nn.Parameter) or module.weight.dim() != 2:
        raise E2UError(f"hparam rewrite_module_tmp={hparams.rewrite_module_tmp!r} does not name a "
                       "linear layer (need a 2-D weight)")
    return module.weight


# --------------------------------------------------------------------------- edit rows


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


class OneLayerChoice:
    """For the hparams of single-layer methods (GRACE, WISE): ``layer`` (an index, checked
    against the model) or ``layer_fraction`` (relative depth)."""

    layer: int | None
    layer_fraction: float
    inner_module_tmp: str

    def resolved_layer(self, n_layers: int) -> int:
        if self.layer is None:
            return round(self.layer_fraction * (n_layers - 1))
        if not 0 <= self.layer < n_layers:
            raise E2UError(f"hparam layer={self.layer} is out of range for this model "
                           f"({n_layers} layers: accepted 0..{n_layers - 1})")
        return self.layer

    def check_model(self, config) -> None:
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is not None:
            self.resolved_layer(int(n_layers))

    def edit_site(self, model):
        """(layer, the shared engine's view of these hparams, module name, module): the linear
        layer the method attaches to (``inner_module_tmp``), checked to be one."""
        layer = self.resolved_layer(int(model.config.num_hidden_layers))
        module = module_named(model, self.inner_module_tmp, layer, "inner_module_tmp")
        if not isinstance(getattr(module, "weight", None), torch.nn.Parameter) or module.weight.dim() != 2:
            raise E2UError(f"hparam inner_module_tmp={self.inner_module_tmp!r} does not name a linear layer")
        return layer, self.locate_view(layer), self.inner_module_tmp.format(layer), module


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


def prepare_requests(model, tokenizer, requests: Sequence[EditRequest], hparams: LocateHParams,
                     env: MethodEnv, seed: int, originals: Sequence[EditRequest] = ()) -> list[PreparedRequest]:
    """Tokenise every request under every context, find its key tokens and target ids.
    ``originals``: the unmerged requests, whose questions a merged request takes as extra
    contexts when ``merge_keys`` is "members"."""
    prefixes = sample_context_prefixes(model, tokenizer, hparams.context_template_length_params,
                                       seed) if hparams.context_template_length_params else []
    by_index = {r.index: r for r in originals}
    prepared = []
    for request in requests:
        if not request.target:
            raise E2UError(f"forget row {request.index} has no target; editing methods need one")
        views = [request]
        if hparams.merge_keys == "members" and len(request.merged_indices) > 1:
            if not all(i in by_index for i in request.merged_indices):
                raise ValueError("merge_keys=members needs the unmerged requests (originals=)")
            views += [by_index[i] for i in request.merged_indices]
        contexts, keys, view_numbers = [], [], []
        spans = [_key_text_span(view, view.prompt, hparams.fact_token) for view in views]
        for number, (view, (q_start, key_end)) in enumerate(zip(views, spans)):
            for prefix in ["", *prefixes]:
                prompt = view.prompt[:q_start] + prefix + view.prompt[q_start:]
                ids = env.encode(prompt)
                contexts.append(tuple(ids))
                keys.append(_key_index(env, tokenizer, prompt, ids, key_end + len(prefix)))
                view_numbers.append(number)
        target = target_token_ids(env, tokenizer, contexts[0], request.prompt, request.target,
                                  hparams.target_eos)
        q_start, key_end = spans[0]
        key_text = request.prompt[q_start:key_end] if hparams.fact_token != "prompt_last" else request.question
        kl_text = f"{key_text.strip()} is a"
        kl_ids = env.encode(kl_text)
        kl_key = _key_index(env, tokenizer, kl_text, kl_ids, len(key_text.strip()))
        prepared.append(PreparedRequest(request, contexts, keys, target, tuple(kl_ids), kl_key, view_numbers))
    return prepared


# --------------------------------------------------------------------------- reading activations


class _StopForward(Exception):
    pass


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
def read_at_keys(model, tokenizer, rows: Sequence[EditRow], probes: dict[str, str],
                 batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Activations at each row's key token: ``probes`` maps a module name to "input" or "output";
    returns name -> (rows, dim) float32. The forward stops after the deepest probed module."""
    named = dict(model.named_modules())
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {name: [] for name in probes}
    state: dict = {}

    def take(name, tensor):
        tensor = tensor[0] if isinstance(tensor, tuple) else tensor
        out[name].append(tensor[torch.arange(tensor.shape[0], device=tensor.device),
                                state["keys"]].float())
        state["seen"].add(name)
        if len(state["seen"]) == len(probes):  # everything read: the rest is not needed
            raise _StopForward

    def make_hook(name, where):
        if where == "input":
            return named[name].register_forward_pre_hook(lambda module, inputs: take(name, inputs[0]))
        return named[name].register_forward_hook(lambda module, inputs, output: take(name, output))

    handles = [make_hook(name, where) for name, where in probes.items()]
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            ids, mask = _pad_right([r.ids for r in chunk], pad_id_of(tokenizer), device)
            state["keys"] = torch.tensor([r.key for r in chunk], device=device)
            state["seen"] = set()
            try:
                model(input_ids=ids, attention_mask=mask)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def _group_means(values: torch.Tensor, groups: Sequence[int], n: int) -> torch.Tensor:
    """Rows of ``values`` averaged per group id (0..n-1): (n, dim)."""
    group = torch.tensor(list(groups), device=values.device)
    total = torch.zeros(n, values.shape[1], device=values.device).index_add_(0, group, values)
    return total / torch.bincount(group, minlength=n).clamp(min=1).unsqueeze(1)


def key_columns(values: torch.Tensor, prepared: Sequence[PreparedRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """Values read at every key row (``key_rows`` order), averaged over the contexts of each
    question a request asks: one column per question (one per request unless
    ``merge_keys=members``), and the request each column belongs to."""
    groups, owners = [], []
    for number, p in enumerate(prepared):
        groups.extend(len(owners) + v for v in p.views)
        owners.extend([number] * (max(p.views) + 1))
    return _group_means(values, groups, len(owners)), torch.tensor(owners, device=values.device)


def mean_key_per_request(model, tokenizer, prepared: Sequence[PreparedRequest], module: str) -> torch.Tensor:
    """Input of ``module`` at the key token, averaged over each request's contexts: (n, d_in)."""
    rows = [row for i, p in enumerate(prepared) for row in p.key_rows(i)]
    keys = read_at_keys(model, tokenizer, rows, {module: "input"})[module]
    return _group_means(keys, [row.request for row in rows], len(prepared))


@torch.no_grad()
def target_nll(model, tokenizer, prepared: Sequence[PreparedRequest], batch_size: int = 16) -> list[float]:
    """Mean per-token NLL of each request's target after its bare prompt (the edit's check);
    the prompts' common prefix (the chat template) is computed once."""
    from e2u_models.shared_prefix import SharedPrefixRunner, common_prefix_length

    if not prepared:
        return []
    device = next(model.parameters()).device
    rows = [p.nll_rows(i)[0] for i, p in enumerate(prepared)]
    prompts = [row.ids[: row.label_start + 1] for row in rows]
    prefix = common_prefix_length(prompts)
    runner = SharedPrefixRunner(model, prompts[0][:prefix], pad_id_of(tokenizer), device)
    result = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        logits, _, _ = runner.score_answers([p[prefix:] for p in prompts[start: start + batch_size]],
                                            [row.labels for row in chunk])
        for b, row in enumerate(chunk):
            labels = torch.tensor(row.labels, device=device)
            result.append(float(torch.nn.functional.cross_entropy(logits[b, : len(row.labels)].float(), labels)))
    return result


def verification(before: list[float], after: list[float], prepared: Sequence[PreparedRequest],
                 hparams: LocateHParams, weight_changes: dict[str, float], log) -> dict:
    """Per request target NLL before/after and whether it was reached; never hides a failure."""
    per_request = []
    unreached = []
    for p, b, a in zip(prepared, before, after):
        reached = a <= hparams.verify_nll
        entry = {"index": p.request.index, "target": p.request.target, "nll_before": round(b, 4),
                 "nll_after": round(a, 4), "reached": reached}
        if p.request.merged_indices:
            entry["merged_indices"] = list(p.request.merged_indices)
        per_request.append(entry)
        if not reached:
            unreached.append(p.request.index)
    if unreached:
        log(f"e2u: {len(unreached)} of {len(prepared)} edit request(s) did not reach their target "
            f"(NLL > {hparams.verify_nll}): rows {unreached}")
    return {"requests": per_request, "unreached": unreached,
            "weight_change_norms": {k: round(v, 6) for k, v in weight_changes.items()},
            "mean_nll_before": round(sum(before) / max(len(before), 1), 4),
            "mean_nll_after": round(sum(after) / max(len(after), 1), 4)}


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise E2UError(f"{what} is not finite (NaN/inf); the model was left unedited")


@contextlib.contextmanager
def edit_transaction(weights: dict[str, torch.nn.Parameter]):
    """Weights restored exactly if anything inside fails (NaN, interrupt, error): a failed edit
    never leaves a half-edited model behind."""
    saved = {name: w.detach().clone() for name, w in weights.items()}
    try:
        yield saved
    except BaseException:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(saved[name])
        raise


def weight_change_norms(weights: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((w.detach() - saved[name]).float().norm()) for name, w in weights.items()}


def statistics_for(model, tokenizer, hparams: LocateHParams, layers: Sequence[int], env: MethodEnv):
    """Second moments of the rewrite module's input at each edit layer (plus the preserved
    questions' key moment when ``preserve_questions`` is set), with their provenance."""
    from e2u_models.editing.stats import StatsRequest, feeding_weights_sha256, resolve_corpus, second_moments

    corpus = resolve_corpus(hparams.stats_corpus, env.render)
    modules = tuple(hparams.rewrite_module_tmp.format(layer) for layer in layers)
    request = StatsRequest(modules=modules, n_tokens=hparams.mom2_n_tokens,
                           max_length=hparams.mom2_max_length, dtype=hparams.mom2_dtype)
    weights = feeding_weights_sha256(model, modules)  # hashed once for both caches
    moments = second_moments(model, tokenizer, corpus, request, env.cache_dir, log=env.log,
                             weights_sha256=weights)
    provenance = {"corpus": corpus.identity, "corpus_sha256": corpus.content_sha256,
                  "n_tokens": hparams.mom2_n_tokens, "max_length": hparams.mom2_max_length,
                  "dtype": hparams.mom2_dtype}
    if hparams.preserve_questions is not None:
        preserved, provenance["preserved"] = preserved_key_moments(model, tokenizer, hparams, modules,
                                                                   env, weights)
        moments = {m: moments[m] + hparams.preserve_weight * preserved[m].to(moments[m].dtype)
                   for m in modules}
    return {layer: moments[module] for layer, module in zip(layers, modules)}, provenance


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


def preserved_key_moments(model, tokenizer, hparams: LocateHParams, modules: Sequence[str],
                          env: MethodEnv, weights: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """E[k kᵀ] of each module's input at the key token of the preserved questions (those off the
    evaluated dataset), cached in the statistics cache by a hash of the feeding weights, the
    module and the key rows (token ids and key positions); ``weights``: the feeding weights' hashes."""
    from e2u_models.cache import json_sha256
    from e2u_models.question_sets import load_questions, off_dataset
    from e2u_models.editing.stats import load_cached_moments, store_moment

    offered = load_questions(hparams.preserve_questions)
    questions = off_dataset(offered, env.dataset_rows)
    if not questions:
        raise E2UError(f"preserve_questions={hparams.preserve_questions!r}: every question is about an "
                       "entity of the evaluated dataset; give other questions")
    rows = question_key_rows(tokenizer, questions, hparams.fact_token, env)
    rows_sha = json_sha256([[list(r.ids), r.key] for r in rows])
    keys = {m: json_sha256({"kind": "key-moment", "weights": weights[m], "module": m, "rows": rows_sha,
                            "version": 1}) for m in modules}
    moments = load_cached_moments(env.cache_dir, keys, env.log)
    todo = [m for m in modules if m not in moments]
    if todo:
        started = time.perf_counter()
        read = read_at_keys(model, tokenizer, rows, {m: "input" for m in todo})
        for m in todo:
            k = read[m].double()
            moments[m] = store_moment(env.cache_dir, keys[m], (k.T @ k / len(rows)).float(),
                                      {"module": m, "rows": str(len(rows)), "rows_sha256": rows_sha})
        env.log(f"e2u: keys of {len(rows)} preserved questions read in {time.perf_counter() - started:.1f} s")
    info = {"questions": hparams.preserve_questions, "offered": len(offered), "kept": len(questions),
            "rows_sha256": rows_sha, "weight": hparams.preserve_weight, "fact_token": hparams.fact_token}
    return moments, info

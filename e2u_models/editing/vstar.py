"""Target vectors v* for ROME, MEMIT and AlphaEdit, optimised fast or the classic way.

For request i a free vector δ_i is added to the residual stream after the injection layer at the
key token of every row of the request (one row per context); it minimises

    L_i(δ) = mean_j NLL(target | row_j, δ) + kl_factor · KL(p_δ ‖ p_0 at the KL-anchor row)
             + v_weight_decay · ‖δ‖ / ‖v0‖²

with Adam, stopping once L_i < v_loss_threshold (the last step only evaluates), and rescaling δ to
at most clamp_norm_factor · ‖v0‖ after each step; v* = v0 + δ, v0 the value module's output at the
key. (ROME's δ sits on the MLP output and MEMIT's on the block output; both add to the same
residual stream.)

``v_mode=fast`` optimises all requests of a batch in one loop: the losses are summed, and since
Adam is elementwise every δ_i follows exactly the path it would alone; requests that converge are
frozen and leave the batch. Nothing below the injection point depends on δ, and neither does any
position before the key token, so one no-grad pass caches the prefix keys/values of every upper
layer and the residual entering the upper layers; each step then runs only the upper layers, only
over the tokens from the key on (rows grouped by length, so little is padding), and applies the
final norm and the vocabulary head only where the loss reads logits. ``v_mode=classic`` is the
reference: one request at a time, full forward passes with full-vocabulary logits at every position.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from e2u_models.architectures import direct_layers_fallback, injection_module
from e2u_models.editing.keys import read_at_keys
from e2u_models.editing.locate import module_named
from e2u_models.editing.requests import EditRow, PreparedRequest
from e2u_models.heap import return_freed_memory
from e2u_models.layers import FixedPrefixKV, LayerRunner, additive_mask, cache_kept_from, cache_of, prefix_kv
from e2u_models.nethook import pad_id_of, pad_right, trace
from e2u_models.snapshot import frozen
from e2u_tasks.errors import E2UError


LOW_MEMORY_ROWS = 8     # rows per forward/backward pass of a low-memory step
LABEL_NLL_BLOCK = 64    # label positions per block of the blockwise NLL


@dataclass(frozen=True)
class VStarSettings:
    """The optimisation of δ (module docstring): the decoder layer template, Adam's steps and
    rate, the decay and KL weights, the norm clamp (None: no clamp) and the engine."""

    layer_module_tmp: str
    num_grad_steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp_norm_factor: float | None = 4.0
    kl_factor: float = 0.0625
    loss_threshold: float = 5e-2
    mode: str = "fast"
    # Train chunk by chunk: each chunk of at most LOW_MEMORY_ROWS rows runs forward and backward
    # before the next (a row's δ enters only its own request's rows, so the gradients are those
    # of one pass), and the label NLL is taken in blocks of positions (:class:`BlockwiseLabelNLL`):
    # many requests trained together hold the memory of a few. False: one pass over all rows and
    # the whole log-softmax, the path that made ROME's, MEMIT's and AlphaEdit's cached edits and
    # leaderboard entries.
    low_memory: bool = False

    @classmethod
    def of(cls, hparams) -> VStarSettings:
        """The v* settings of a locate-then-edit method's hparams."""
        return cls(hparams.layer_module_tmp, hparams.v_num_grad_steps, hparams.v_lr,
                   hparams.v_weight_decay, hparams.clamp_norm_factor, hparams.kl_factor,
                   hparams.v_loss_threshold, hparams.v_mode)


@dataclass
class VStarResult:
    v0: torch.Tensor       # (n, d) value module output at the key, bare prompt, before the edit
    deltas: torch.Tensor   # (n, d)
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "fast"     # the engine that ran: fast, fast (hooked whole model) or classic

    @property
    def targets(self) -> torch.Tensor:
        return self.v0 + self.deltas


def _rows(prepared: Sequence[PreparedRequest], with_kl: bool) -> tuple[list[EditRow], list[EditRow]]:
    nll = [row for i, p in enumerate(prepared) for row in p.nll_rows(i)]
    kl = [p.kl_row(i) for i, p in enumerate(prepared)] if with_kl else []
    return nll, kl


def edit_layout(rows: Sequence[EditRow], pad_id: int, device):
    """Rows laid out with their prefix (tokens before the key) right-aligned to column P and the
    rest left-aligned from P, so every row's key token sits in column P: (ids, mask, positions, P,
    suffix width)."""
    prefix = max(r.key for r in rows)
    suffix = max(len(r.ids) - r.key for r in rows)
    n = len(rows)
    ids = torch.full((n, prefix + suffix), pad_id, dtype=torch.long)
    mask = torch.zeros((n, prefix + suffix), dtype=torch.long)
    positions = torch.zeros((n, prefix + suffix), dtype=torch.long)
    for i, row in enumerate(rows):
        start, end = prefix - row.key, prefix + len(row.ids) - row.key
        ids[i, start:end] = torch.tensor(row.ids)
        mask[i, start:end] = 1
        positions[i, start:end] = torch.arange(len(row.ids))
    return ids.to(device), mask.to(device), positions.to(device), prefix, suffix


class UpperStack:
    """The network above the injection layer, run on the tokens from each row's key on.

    Rows are laid out by :func:`edit_layout` (every row's key token in column P). One no-grad
    pass over the layout caches the upper layers' prefix keys/values and the residual at the key
    on (``capture_input``: also that module's input over the whole layout, e.g. for WISE).
    """

    def __init__(self, model, tokenizer, rows: Sequence[EditRow], layer_module_tmp: str, layer: int,
                 capture_input: str | None = None):
        self.runner = LayerRunner(model, layer + 1, "v_mode=fast", "use v_mode=classic for this architecture")
        self.layer = layer
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        ids, mask, positions, prefix, suffix = edit_layout(rows, pad_id_of(tokenizer), device)
        n = len(rows)
        self.P = prefix
        self.positions = positions[:, prefix:]
        # Additive mask of the upper layers' queries (suffix) over prefix + suffix keys.
        causal = torch.ones(suffix, suffix, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([mask[:, None, :prefix].bool().expand(n, suffix, prefix),
                             causal[None] & mask[:, None, prefix:].bool()], dim=2)
        self.mask = additive_mask(allowed, dtype)
        self.layout_mask = mask  # (rows, P + suffix): 1 on real tokens; the key sits in column P
        self._prefix_pass(model, ids, positions, layer_module_tmp, capture_input)
        self._selection: tuple | None = None

    def _prefix_pass(self, model, ids, positions, layer_module_tmp: str, capture_input: str | None) -> None:
        layer, prefix = self.layer, self.P
        captured = {}
        outputs = {module_named(model, layer_module_tmp, layer, "layer_module_tmp"):
                   lambda h: captured.__setitem__("h", h[:, prefix:].detach())}
        inputs = {} if capture_input is None else {
            module_named(model, capture_input, layer, "inner_module_tmp"): lambda x: captured.__setitem__("x", x.detach())}
        with trace(model, inputs, outputs), cache_kept_from(model, layer + 1), torch.no_grad():
            out = self.runner.base(input_ids=ids, attention_mask=self.layout_mask, position_ids=positions,
                                   use_cache=True)
        self.captured_input = captured.get("x")
        self.hidden = captured["h"]
        self.prefix_kv = prefix_kv(cache_of(out), range(layer + 1, self.runner.count), prefix)

    def select(self, rows: torch.Tensor) -> None:
        """Restrict the following runs to these rows (index tensor)."""
        kv = {i: (k[rows], v[rows]) for i, (k, v) in self.prefix_kv.items()}
        self._selection = (rows, self.hidden[rows], self.mask[rows], self.positions[rows], FixedPrefixKV(kv))

    def run(self, row_deltas: torch.Tensor) -> torch.Tensor:
        """Final hidden states (before the final norm) of the selected rows, δ added at the key
        (``row_deltas`` (rows, d)) or at every position from the key on ((rows, suffix, d))."""
        _, hidden, mask, positions, kv = self._selection
        if row_deltas.dim() == 3:
            h = hidden + row_deltas.to(hidden.dtype)
        else:
            h = torch.cat([hidden[:, :1] + row_deltas[:, None].to(hidden.dtype), hidden[:, 1:]], dim=1)
        return self.runner.run(h, mask, positions, kv)

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.runner.logits(hidden).float(), dim=-1)

    def label_nll(self, hidden: torch.Tensor, labels: torch.Tensor, block: int) -> torch.Tensor:
        """−log p(label) at each position (rows of ``hidden``), ``block`` positions at a time;
        a soft-capped or biased head takes the whole log-softmax."""
        head = self.runner.head
        if self.runner.softcap or getattr(head, "bias", None) is not None:
            return -self.logprobs(hidden).gather(-1, labels[:, None]).squeeze(-1)
        return BlockwiseLabelNLL.apply(self.runner.norm(hidden), head.weight, labels, block)


class BlockwiseLabelNLL(torch.autograd.Function):
    """−log softmax(x Wᵀ)[label] per row of x, ``block`` rows at a time. Each block's logits give
    its NLL and, at once, its gradient with respect to x, ((softmax − one-hot) W); only that
    gradient (rows, d) is kept for the backward pass, so the (rows, vocabulary) logits of a whole
    step never exist together (40 GRACE values trained at once would otherwise hold several
    copies of them). W is frozen: it gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, block: int) -> torch.Tensor:
        nll = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad = torch.empty(x.shape[0], weight.shape[1], dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], block):
            rows = slice(start, start + block)
            logits = (x[rows] @ weight.T).float()
            logsumexp = logits.logsumexp(dim=-1)
            picked = labels[rows]
            nll[rows] = logsumexp - logits.gather(-1, picked[:, None]).squeeze(-1)
            probs = logits.sub_(logsumexp[:, None]).exp_()
            probs[torch.arange(probs.shape[0], device=x.device), picked] -= 1.0
            grad[rows] = probs.to(weight.dtype) @ weight  # in the head's dtype, as autograd would
        ctx.save_for_backward(grad)
        ctx.input_dtype = x.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_nll[:, None]).to(ctx.input_dtype), None, None, None



class HookedStack:
    """:class:`UpperStack`'s interface for any model: the whole model runs on the layout (all
    selected rows at once), a hook adding the deltas to ``inject_at``'s output from the key on; the
    logits of the positions from the key on are returned (and read by :meth:`logprobs`). For
    families whose layers cannot be run directly, or whose MLP output is normalised before the
    residual (a value change must be injected at the MLP output, below the layer output)."""

    def __init__(self, model, tokenizer, rows: Sequence[EditRow], inject_at: str, layer: int,
                 capture_input: str | None = None):
        self.model, self.layer = model, layer
        device = next(model.parameters()).device
        self.ids, self.layout_mask, self.layout_positions, self.P, self.suffix = edit_layout(
            rows, pad_id_of(tokenizer), device)
        self.inject_at = module_named(model, inject_at, layer, "layer_module_tmp")
        self.captured_input = None
        if capture_input is not None:
            captured = {}
            module = module_named(model, capture_input, layer, "inner_module_tmp")
            with trace(model, inputs={module: lambda x: captured.__setitem__("x", x.detach())}), torch.no_grad():
                model(input_ids=self.ids, attention_mask=self.layout_mask, position_ids=self.layout_positions,
                      use_cache=False)
            self.captured_input = captured["x"]
        self._rows: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> None:
        self._rows = rows

    def run(self, row_deltas: torch.Tensor) -> torch.Tensor:
        """Logits of the selected rows from the key on, δ added to ``inject_at``'s output at the
        key (``row_deltas`` (rows, d)) or at every position from the key on ((rows, suffix, d))."""
        rows, P = self._rows, self.P

        def add(hidden):
            bump = row_deltas[:, None] if row_deltas.dim() == 2 else row_deltas
            width = bump.shape[1]
            return torch.cat([hidden[:, :P], hidden[:, P:P + width] + bump.to(hidden.dtype),
                              hidden[:, P + width:]], dim=1)

        keep = {"logits_to_keep": self.suffix} \
            if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        with trace(self.model, outputs={self.inject_at: add}):
            out = self.model(input_ids=self.ids[rows], attention_mask=self.layout_mask[rows],
                             position_ids=self.layout_positions[rows], use_cache=False, **keep)
        return out.logits[:, -self.suffix:]

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.float(), dim=-1)


def edit_stack(model, tokenizer, rows: Sequence[EditRow], layer_module_tmp: str, layer: int,
               value_module: str, capture_input: str | None = None):
    """The engine's network above the injection point: :class:`UpperStack` where the family's
    layers run directly and the value joins the residual at the layer output, else
    :class:`HookedStack` (:func:`~e2u_models.architectures.direct_layers_fallback` says why)."""
    layer_module = layer_module_tmp.format(layer)
    inject_at = injection_module(model, value_module, layer_module)
    if direct_layers_fallback(model, inject_at, layer_module) is None:
        return UpperStack(model, tokenizer, rows, layer_module_tmp, layer, capture_input)
    return HookedStack(model, tokenizer, rows, inject_at, layer, capture_input)


def _request_losses(nll_logprobs: list[torch.Tensor], nll_owner: list[int], kl_logprobs, kl_init,
                    deltas, v0_norms, settings: VStarSettings, requests: Sequence[int]) -> torch.Tensor:
    """L_i for each request in ``requests`` (positions in ``deltas``)."""
    position = {r: k for k, r in enumerate(requests)}
    sums = [[] for _ in requests]
    for logprob, owner in zip(nll_logprobs, nll_owner):
        sums[position[owner]].append(-logprob.mean())
    nll = torch.stack([torch.stack(s).mean() for s in sums])
    return _plus_regularisers(nll, kl_logprobs, kl_init, deltas, v0_norms, settings)


def _plus_regularisers(loss, kl_logprobs, kl_init, deltas, v0_norms, settings: VStarSettings) -> torch.Tensor:
    """``loss`` plus each request's weight decay on δ and its KL from the unedited model at its
    KL row (in this order: the sums of the cached edits)."""
    loss = loss + settings.weight_decay * deltas.norm(dim=-1) / v0_norms ** 2
    if kl_logprobs is not None and settings.kl_factor > 0:
        loss = loss + settings.kl_factor * (kl_logprobs.exp() * (kl_logprobs - kl_init)).sum(-1)
    return loss


@dataclass
class VStarRun:
    """One optimisation, as both engines see it: the requests, the injection layer, the δ being
    optimised (one row per request) with their v0 norms, and the result being filled in."""

    model: object
    tokenizer: object
    prepared: Sequence[PreparedRequest]
    settings: VStarSettings
    layer: int
    deltas: torch.Tensor
    v0_norms: torch.Tensor
    result: VStarResult
    desc: str
    value_module: str


def optimise_targets(model, tokenizer, prepared: Sequence[PreparedRequest], settings: VStarSettings,
                     layer: int, value_module: str, desc: str = "v*",
                     v0: torch.Tensor | None = None) -> VStarResult:
    """v* of every request (see the module docstring); ``settings.mode`` picks the engine.
    ``v0``: the value module's output at each request's key, when the caller already has it
    (else one pass reads it)."""
    started = time.perf_counter()
    if v0 is None:
        key_rows = [p.key_rows(i)[0] for i, p in enumerate(prepared)]
        v0 = read_at_keys(model, tokenizer, key_rows, {value_module: "output"})[value_module]
    v0_norms = v0.norm(dim=-1).clamp(min=1e-8)
    n = len(prepared)
    deltas = torch.zeros_like(v0, requires_grad=True)
    result = VStarResult(v0=v0.detach(), deltas=deltas, losses=[float("nan")] * n, steps=[0] * n)
    run = VStarRun(model, tokenizer, prepared, settings, layer, deltas, v0_norms, result, desc, value_module)
    layer_module = settings.layer_module_tmp.format(layer)
    if settings.mode == "fast" and direct_layers_fallback(
            model, injection_module(model, value_module, layer_module), layer_module) is not None:
        result.mode = "fast (hooked whole model)"
    else:
        result.mode = settings.mode
    with frozen(model):
        (_fast if settings.mode == "fast" else _classic)(run)
    return_freed_memory()  # the steps' graphs are gone; the target check that follows starts lean
    result.deltas = deltas.detach()
    result.seconds = time.perf_counter() - started
    return result


def _step_loop(n: int, settings: VStarSettings, deltas: torch.Tensor, v0_norms: torch.Tensor,
               compute, result: VStarResult, progress, request_ids: Sequence[int],
               backward_in_compute: bool = False) -> None:
    """EasyEdit's loop, for several independent requests at once: evaluate, stop the converged,
    step the rest, restore the frozen, clamp. ``backward_in_compute``: ``compute`` has already
    put every active request's gradient into ``deltas.grad`` (its losses come back detached);
    the rows that stop get theirs zeroed, which is what back-propagating only the others gives."""
    optimiser = torch.optim.Adam([deltas], lr=settings.lr)
    active = list(range(n))
    for step in range(settings.num_grad_steps):
        if backward_in_compute:
            optimiser.zero_grad()
        losses = compute(active)
        for k, i in enumerate(active):
            if not torch.isfinite(losses[k]):
                raise E2UError(f"v* loss of edit request row {request_ids[i]} is not finite (NaN/inf) "
                               f"at step {step}; the model was left unedited")
        values = losses.detach().tolist()
        for k, i in enumerate(active):
            result.losses[i], result.steps[i] = values[k], step
        keep = [k for k, i in enumerate(active) if values[k] >= settings.loss_threshold]
        progress.set_postfix(loss=f"{sum(values) / len(values):.3f}", active=len(keep))
        progress.update(1)
        if not keep or step == settings.num_grad_steps - 1:
            break
        stepping = [active[k] for k in keep]
        frozen_rows = torch.ones(n, dtype=torch.bool, device=deltas.device)
        frozen_rows[stepping] = False
        saved = deltas.detach().clone()
        if backward_in_compute:
            with torch.no_grad():
                deltas.grad[frozen_rows] = 0.0
        else:
            optimiser.zero_grad()
            losses[keep].sum().backward()
        optimiser.step()
        with torch.no_grad():
            deltas[frozen_rows] = saved[frozen_rows]
            if settings.clamp_norm_factor is not None:
                limit = settings.clamp_norm_factor * v0_norms
                norms = deltas.norm(dim=-1)
                scale = torch.where(norms > limit, limit / norms.clamp(min=1e-12), torch.ones_like(norms))
                deltas.mul_(scale[:, None])
        active = stepping


def length_buckets(lengths: Sequence[int], row_overhead: float = 4.0) -> list[list[int]]:
    """Split rows into groups of similar length (indices into ``lengths``) so that padding every
    group to its longest row wastes the least: groups of consecutive lengths, chosen by dynamic
    programming over the distinct lengths (rows of equal length never gain from being split) with
    cost = padded tokens + ``row_overhead`` × rows per extra group (the fixed cost of another pass
    through the layers, in tokens)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    counts = Counter(lengths)
    values = sorted(counts)
    ends = [0]  # ends[j]: number of rows with one of the first j distinct lengths
    for value in values:
        ends.append(ends[-1] + counts[value])
    n, d = len(lengths), len(values)
    best = [0.0] + [float("inf")] * d  # best[j]: cost of the rows of the first j distinct lengths
    cut = [0] * (d + 1)
    for end in range(1, d + 1):
        for start in range(end):
            cost = best[start] + (ends[end] - ends[start]) * values[end - 1] + (row_overhead * n if start else 0.0)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], d
    while end > 0:
        groups.append(order[ends[cut[end]]:ends[end]])
        end = cut[end]
    return groups[::-1]


def _fast(run: VStarRun) -> None:
    nll_rows, kl_rows = _rows(run.prepared, with_kl=run.settings.kl_factor > 0)
    # The NLL rows run in groups of similar length (refusals differ in length, and padding them
    # all to the longest would spend much of each step on padding); the KL rows need one token
    # from the key on.
    template = run.settings.layer_module_tmp

    def stack(rows):
        return edit_stack(run.model, run.tokenizer, rows, template, run.layer, run.value_module)

    nll_stacks = [(group, stack([nll_rows[j] for j in group]))
                  for group in length_buckets([len(r.ids) - r.key for r in nll_rows])]
    kl_stack = stack(kl_rows) if kl_rows else None
    deltas, device = run.deltas, run.deltas.device
    kl_init = None
    if kl_stack is not None:
        kl_stack.select(torch.arange(len(kl_rows), device=device))
        with torch.no_grad():
            kl_init = kl_stack.logprobs(kl_stack.run(torch.zeros(len(kl_rows), deltas.shape[1], device=device))[:, 0])

    def low_memory_compute(active):
        """The losses of ``active`` (detached), their gradients already in ``deltas.grad``."""
        position = {request: k for k, request in enumerate(active)}
        rows_per_request = Counter(row.request for row in nll_rows if row.request in position)
        nll = torch.zeros(len(active), device=device)
        for group, stack in nll_stacks:
            chosen = [k for k, j in enumerate(group) if nll_rows[j].request in position]
            for start in range(0, len(chosen), LOW_MEMORY_ROWS):
                part = chosen[start: start + LOW_MEMORY_ROWS]
                rows = [nll_rows[group[k]] for k in part]
                stack.select(torch.tensor(part, device=device))
                hidden = stack.run(deltas[[row.request for row in rows]])
                picks = [hidden[b, row.label_start - row.key: row.label_start - row.key + len(row.labels)]
                         for b, row in enumerate(rows)]
                labels = torch.tensor([t for row in rows for t in row.labels], device=device)
                if isinstance(stack, UpperStack):
                    per_position = stack.label_nll(torch.cat(picks), labels, LABEL_NLL_BLOCK)
                else:
                    per_position = -stack.logprobs(torch.cat(picks)).gather(-1, labels[:, None]).squeeze(-1)
                row_means = torch.stack([part_nll.mean() for part_nll in
                                         torch.split(per_position, [len(row.labels) for row in rows])])
                shares = row_means / torch.tensor([float(rows_per_request[row.request]) for row in rows],
                                                  device=device)
                shares.sum().backward()
                nll.index_add_(0, torch.tensor([position[row.request] for row in rows], device=device),
                               shares.detach())
        index = torch.tensor(active, device=device)
        kl_lp = kl_ref = None
        if kl_stack is not None:
            kl_stack.select(index)
            kl_lp = kl_stack.logprobs(kl_stack.run(deltas[index])[:, 0])
            kl_ref = kl_init[index]
        rest = _plus_regularisers(0.0, kl_lp, kl_ref, deltas[index], run.v0_norms[index], run.settings)
        rest.sum().backward()
        return nll + rest.detach()

    def compute(active):
        index = torch.tensor(active, device=device)
        active_set = set(active)
        picks, label_ids, spans, owners = [], [], [], []
        for group, stack in nll_stacks:
            chosen = [k for k, j in enumerate(group) if nll_rows[j].request in active_set]
            if not chosen:
                continue
            stack.select(torch.tensor(chosen, device=device))
            hidden = stack.run(deltas[[nll_rows[group[k]].request for k in chosen]])
            for position, k in enumerate(chosen):
                row = nll_rows[group[k]]
                start = row.label_start - row.key
                picks.append(hidden[position, start: start + len(row.labels)])
                label_ids.extend(row.labels)
                spans.append(len(row.labels))
                owners.append(row.request)
        logprobs = nll_stacks[0][1].logprobs(torch.cat(picks))
        gold = logprobs.gather(-1, torch.tensor(label_ids, device=device)[:, None]).squeeze(-1)
        kl_lp = kl_ref = None
        if kl_stack is not None:
            kl_stack.select(index)
            kl_lp = kl_stack.logprobs(kl_stack.run(deltas[index])[:, 0])
            kl_ref = kl_init[index]
        return _request_losses(list(torch.split(gold, spans)), owners,
                               kl_lp, kl_ref, deltas[index], run.v0_norms[index], run.settings, active)

    with tqdm(total=run.settings.num_grad_steps, desc=f"{run.desc} (fast, {len(run.prepared)} requests)",
              leave=False) as progress:
        _step_loop(len(run.prepared), run.settings, deltas, run.v0_norms,
                   low_memory_compute if run.settings.low_memory else compute, run.result, progress,
                   [p.request.index for p in run.prepared], backward_in_compute=run.settings.low_memory)


def _classic(run: VStarRun) -> None:
    """The reference: one request at a time, δ added by a hook on the injection layer's output
    (the value module's where the family normalises it before the residual), full forward passes."""
    layer_name = run.settings.layer_module_tmp.format(run.layer)
    inject_at = injection_module(run.model, run.value_module, layer_name)
    layer_module = module_named(run.model, inject_at, run.layer, "layer_module_tmp")
    progress = tqdm(total=run.settings.num_grad_steps * len(run.prepared),
                    desc=f"{run.desc} (classic, {len(run.prepared)} requests)", leave=False)
    for number, request in enumerate(run.prepared):
        single = torch.zeros(1, run.deltas.shape[1], device=run.deltas.device, requires_grad=True)
        sub = VStarResult(v0=run.result.v0[number: number + 1], deltas=single,
                          losses=[float("nan")], steps=[0])
        _classic_request(run, number, request, layer_module, single, sub, progress)
        with torch.no_grad():
            run.deltas[number] = single.detach()[0]
        run.result.losses[number], run.result.steps[number] = sub.losses[0], sub.steps[0]
    progress.close()


def _classic_request(run: VStarRun, number: int, request: PreparedRequest, layer_module, single,
                     sub: VStarResult, progress) -> None:
    model, settings, device = run.model, run.settings, run.deltas.device
    rows = request.nll_rows(0) + ([request.kl_row(0)] if settings.kl_factor > 0 else [])
    ids, mask = pad_right([r.ids for r in rows], pad_id_of(run.tokenizer), device)
    keys = torch.tensor([r.key for r in rows], device=device)
    current = {"delta": None}

    def add_delta(hidden):
        if current["delta"] is None:
            return None
        bump = torch.zeros_like(hidden)
        bump[torch.arange(hidden.shape[0], device=device), keys] = current["delta"].to(hidden.dtype)
        return hidden + bump

    with trace(model, outputs={layer_module: add_delta}):
        kl_init = None
        if settings.kl_factor > 0:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            kl_init = F.log_softmax(logits[-1, rows[-1].key].float(), dim=-1)[None]

        def compute(active):
            current["delta"] = single[0]
            logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
            per_row = []
            for b, row in enumerate(rows):
                if not row.labels:
                    continue
                span = logprobs[b, row.label_start: row.label_start + len(row.labels)]
                per_row.append(span.gather(-1, torch.tensor(row.labels, device=device)[:, None]).squeeze(-1))
            kl_lp = logprobs[-1, rows[-1].key][None] if kl_init is not None else None
            return _request_losses(per_row, [0] * len(per_row), kl_lp, kl_init, single,
                                   run.v0_norms[number: number + 1], settings, [0])

        _step_loop(1, settings, single, run.v0_norms[number: number + 1], compute, sub, progress,
                   [request.request.index])

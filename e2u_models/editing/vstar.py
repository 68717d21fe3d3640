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

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from e2u_models.editing.locate import (
    EditRow, LocateHParams, PreparedRequest, _pad_right, module_named, pad_id_of, read_at_keys)
from e2u_models.shared_prefix import FixedPrefixKV, cache_keyword
from e2u_tasks.errors import E2UError


@dataclass
class VStarResult:
    v0: torch.Tensor       # (n, d) value module output at the key, bare prompt, before the edit
    deltas: torch.Tensor   # (n, d)
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def targets(self) -> torch.Tensor:
        return self.v0 + self.deltas


def _rows(prepared: Sequence[PreparedRequest], with_kl: bool) -> tuple[list[EditRow], list[EditRow]]:
    nll = [row for i, p in enumerate(prepared) for row in p.nll_rows(i)]
    kl = [p.kl_row(i) for i, p in enumerate(prepared)] if with_kl else []
    return nll, kl


class UpperStack:
    """The network above the injection layer, run on the tokens from each row's key on.

    Rows are laid out with their prefix (tokens before the key) right-aligned to column P and the
    rest left-aligned from P, so every row's key token sits in column P.
    """

    def __init__(self, model, tokenizer, rows: Sequence[EditRow], hparams: LocateHParams, layer: int,
                 capture_input: str | None = None):
        base = model.base_model
        layers = getattr(base, "layers", None)
        if layers is None or not hasattr(base, "norm") or not hasattr(base, "rotary_emb"):
            raise E2UError("v_mode=fast needs a llama-style decoder (layers, norm, rotary_emb); "
                           "use v_mode=classic for this architecture")
        self.model, self.base, self.layer = model, base, layer
        self.upper = list(layers)[layer + 1:]
        self.head = model.get_output_embeddings()
        self.cache_keyword = cache_keyword(self.upper[0]) if self.upper else "cache"
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        prefix = max(r.key for r in rows)
        suffix = max(len(r.ids) - r.key for r in rows)
        n = len(rows)
        ids = torch.full((n, prefix + suffix), pad_id_of(tokenizer), dtype=torch.long)
        mask = torch.zeros((n, prefix + suffix), dtype=torch.long)
        positions = torch.zeros((n, prefix + suffix), dtype=torch.long)
        for i, row in enumerate(rows):
            start, end = prefix - row.key, prefix + len(row.ids) - row.key
            ids[i, start:end] = torch.tensor(row.ids)
            mask[i, start:end] = 1
            positions[i, start:end] = torch.arange(len(row.ids))
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        self.P = prefix
        self.positions = positions[:, prefix:]
        # Additive mask of the upper layers' queries (suffix) over prefix + suffix keys.
        causal = torch.ones(suffix, suffix, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([mask[:, None, :prefix].bool().expand(n, suffix, prefix),
                             causal[None] & mask[:, None, prefix:].bool()], dim=2)
        self.mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

        layer_module = module_named(model, hparams.layer_module_tmp, layer, "layer_module_tmp")
        captured = {}
        handles = [layer_module.register_forward_hook(
            lambda m, i, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[:, prefix:].detach()))]
        if capture_input is not None:  # e.g. WISE: the edited module's input over the whole layout
            handles.append(module_named(model, capture_input, layer, "inner_module_tmp").register_forward_pre_hook(
                lambda m, i: captured.__setitem__("x", i[0].detach())))
        try:
            with torch.no_grad():
                out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        self.layout_mask = mask  # (rows, P + suffix): 1 on real tokens; the key sits in column P
        self.captured_input = captured.get("x")
        cache = getattr(out, "cache", None) or out.past_key_values
        self.hidden = captured["h"]
        self.prefix_kv = {}
        for index in range(layer + 1, len(layers)):
            entry = cache.layers[index]
            self.prefix_kv[index] = (entry.keys[:, :, :prefix].detach(), entry.values[:, :, :prefix].detach())
        self._selection: tuple | None = None

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
        embeddings = self.base.rotary_emb(h, positions)
        for layer in self.upper:
            out = layer(h, attention_mask=mask, position_ids=positions, use_cache=True,
                        position_embeddings=embeddings, **{self.cache_keyword: kv})
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.base.norm(hidden)).float(), dim=-1)


def _request_losses(nll_logprobs: list[torch.Tensor], nll_owner: list[int], kl_logprobs, kl_init,
                    deltas, v0_norms, hparams: LocateHParams, requests: Sequence[int]) -> torch.Tensor:
    """L_i for each request in ``requests`` (positions in ``deltas``)."""
    position = {r: k for k, r in enumerate(requests)}
    sums = [[] for _ in requests]
    for logprob, owner in zip(nll_logprobs, nll_owner):
        sums[position[owner]].append(-logprob.mean())
    nll = torch.stack([torch.stack(s).mean() for s in sums])
    loss = nll + hparams.v_weight_decay * deltas.norm(dim=-1) / v0_norms ** 2
    if kl_logprobs is not None and hparams.kl_factor > 0:
        kl = (kl_logprobs.exp() * (kl_logprobs - kl_init)).sum(-1)
        loss = loss + hparams.kl_factor * kl
    return loss


def optimise_targets(model, tokenizer, prepared: Sequence[PreparedRequest], hparams: LocateHParams,
                     layer: int, value_module: str, desc: str = "v*", log=print) -> VStarResult:
    """v* of every request (see the module docstring); ``hparams.v_mode`` picks the engine."""
    started = time.perf_counter()
    nll_rows, kl_rows = _rows(prepared, with_kl=hparams.kl_factor > 0)
    key_rows = [p.key_rows(i)[0] for i, p in enumerate(prepared)]
    v0 = read_at_keys(model, tokenizer, key_rows, {value_module: "output"})[value_module]
    v0_norms = v0.norm(dim=-1).clamp(min=1e-8)
    n = len(prepared)
    deltas = torch.zeros_like(v0, requires_grad=True)
    result = VStarResult(v0=v0.detach(), deltas=deltas, losses=[float("nan")] * n, steps=[0] * n)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        if hparams.v_mode == "fast":
            _fast(model, tokenizer, prepared, nll_rows, kl_rows, hparams, layer, deltas, v0_norms, result, desc)
        else:
            _classic(model, tokenizer, prepared, hparams, layer, deltas, v0_norms, result, desc)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    result.deltas = deltas.detach()
    result.seconds = time.perf_counter() - started
    return result


def _step_loop(n: int, hparams: LocateHParams, deltas: torch.Tensor, v0_norms: torch.Tensor,
               compute, result: VStarResult, progress, request_ids: Sequence[int]) -> None:
    """EasyEdit's loop, for several independent requests at once: evaluate, stop the converged,
    step the rest, restore the frozen, clamp."""
    optimiser = torch.optim.Adam([deltas], lr=hparams.v_lr)
    active = list(range(n))
    for step in range(hparams.v_num_grad_steps):
        losses = compute(active)
        for k, i in enumerate(active):
            if not torch.isfinite(losses[k]):
                raise E2UError(f"v* loss of edit request row {request_ids[i]} is not finite (NaN/inf) "
                               f"at step {step}; the model was left unedited")
        values = losses.detach().tolist()
        for k, i in enumerate(active):
            result.losses[i], result.steps[i] = values[k], step
        keep = [k for k, i in enumerate(active) if values[k] >= hparams.v_loss_threshold]
        progress.set_postfix(loss=f"{sum(values) / len(values):.3f}", active=len(keep))
        progress.update(1)
        if not keep or step == hparams.v_num_grad_steps - 1:
            break
        stepping = [active[k] for k in keep]
        frozen = torch.ones(n, dtype=torch.bool, device=deltas.device)
        frozen[stepping] = False
        saved = deltas.detach().clone()
        optimiser.zero_grad()
        losses[keep].sum().backward()
        optimiser.step()
        with torch.no_grad():
            deltas[frozen] = saved[frozen]
            limit = hparams.clamp_norm_factor * v0_norms
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


def _fast(model, tokenizer, prepared, nll_rows, kl_rows, hparams, layer, deltas, v0_norms, result, desc):
    # The NLL rows run in groups of similar length (refusals differ in length; padding them all to
    # the longest wastes a third of the tokens); the KL rows need one token from the key on.
    groups = length_buckets([len(r.ids) - r.key for r in nll_rows])
    nll_stacks = [(group, UpperStack(model, tokenizer, [nll_rows[j] for j in group], hparams, layer))
                  for group in groups]
    kl_stack = UpperStack(model, tokenizer, kl_rows, hparams, layer) if kl_rows else None
    device = deltas.device
    kl_init = None
    if kl_stack is not None:
        kl_stack.select(torch.arange(len(kl_rows), device=device))
        with torch.no_grad():
            kl_init = kl_stack.logprobs(kl_stack.run(torch.zeros(len(kl_rows), deltas.shape[1], device=device))[:, 0])

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
                               kl_lp, kl_ref, deltas[index], v0_norms[index], hparams, active)

    with tqdm(total=hparams.v_num_grad_steps, desc=f"{desc} (fast, {len(prepared)} requests)",
              leave=False) as progress:
        _step_loop(len(prepared), hparams, deltas, v0_norms, compute, result, progress,
                   [p.request.index for p in prepared])


def _classic(model, tokenizer, prepared, hparams, layer, deltas, v0_norms, result, desc):
    layer_module = module_named(model, hparams.layer_module_tmp, layer, "layer_module_tmp")
    device = deltas.device
    pad = pad_id_of(tokenizer)
    progress = tqdm(total=hparams.v_num_grad_steps * len(prepared),
                    desc=f"{desc} (classic, {len(prepared)} requests)", leave=False)
    for number, request in enumerate(prepared):
        rows = request.nll_rows(0) + ([request.kl_row(0)] if hparams.kl_factor > 0 else [])
        ids, mask = _pad_right([r.ids for r in rows], pad, device)
        keys = torch.tensor([r.key for r in rows], device=device)
        single = torch.zeros(1, deltas.shape[1], device=device, requires_grad=True)
        current = {"delta": None}

        def add_delta(module, inputs, output):
            if current["delta"] is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            bump = torch.zeros_like(hidden)
            bump[torch.arange(hidden.shape[0], device=device), keys] = current["delta"].to(hidden.dtype)
            hidden = hidden + bump
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = layer_module.register_forward_hook(add_delta)
        try:
            kl_init = None
            if hparams.kl_factor > 0:
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask).logits
                kl_init = F.log_softmax(logits[-1, rows[-1].key].float(), dim=-1)[None]

            def compute(active, rows=rows, ids=ids, mask=mask, kl_init=kl_init, single=single):
                current["delta"] = single[0]
                logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                per_row = []
                for b, row in enumerate(rows):
                    if not row.labels:
                        continue
                    span = logprobs[b, row.label_start: row.label_start + len(row.labels)]
                    per_row.append(span.gather(-1, torch.tensor(row.labels, device=device)[:, None]).squeeze(-1))
                kl_lp = logprobs[-1, rows[-1].key][None] if kl_init is not None else None
                return _request_losses(per_row, [0] * len(per_row), kl_lp, kl_init, single,
                                       v0_norms[number: number + 1], hparams, [0])

            sub = VStarResult(v0=result.v0[number: number + 1], deltas=single,
                              losses=[float("nan")], steps=[0])
            _step_loop(1, hparams, single, v0_norms[number: number + 1], compute, sub, progress,
                       [request.request.index])
        finally:
            handle.remove()
        with torch.no_grad():
            deltas[number] = single.detach()[0]
        result.losses[number], result.steps[number] = sub.losses[0], sub.steps[0]
    progress.close()

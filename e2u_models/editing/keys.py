"""Reading activations at the key tokens of edit rows, and averaging them per request/question."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from e2u_models.editing.requests import EditRow, PreparedRequest
from e2u_models.editing.locate import module_named
from e2u_models.nethook import StopForward, forward_until_stopped, pad_id_of, pad_right, trace


@torch.no_grad()
def read_at_keys(model, tokenizer, rows: Sequence[EditRow], probes: dict[str, str],
                 batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Activations at each row's key token: ``probes`` maps a module name to "input" or "output";
    returns name -> (rows, dim) float32. The forward stops after the deepest probed module."""
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {name: [] for name in probes}
    state: dict = {}

    def take(name):
        def probe(tensor):
            out[name].append(tensor[torch.arange(tensor.shape[0], device=tensor.device),
                                    state["keys"]].float())
            state["seen"].add(name)
            if len(state["seen"]) == len(probes):  # everything read: the rest is not needed
                raise StopForward

        return probe

    inputs = {name: take(name) for name, where in probes.items() if where == "input"}
    outputs = {name: take(name) for name, where in probes.items() if where != "input"}
    with trace(model, inputs, outputs):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            ids, mask = pad_right([r.ids for r in chunk], pad_id_of(tokenizer), device)
            state["keys"] = torch.tensor([r.key for r in chunk], device=device)
            state["seen"] = set()
            forward_until_stopped(model, input_ids=ids, attention_mask=mask)
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
def module_inputs(model, tokenizer, texts_ids: list[list[int]], module_name: str,
                  batch_size: int | None = None) -> torch.Tensor:
    """The module's input at every real token of the given sequences: (tokens, d_in) float32.
    The forward stops at the module: nothing above it is needed. ``batch_size`` sequences at a
    time (None: all in one forward, whose float rounding WISE's training inputs were made with)."""
    module = module_named(model, module_name, 0, "inner_module_tmp")
    device = next(model.parameters()).device
    step = batch_size or max(len(texts_ids), 1)
    captured: list[torch.Tensor] = []

    def take(x):
        captured.append(x)
        raise StopForward

    with trace(model, inputs={module: take}):
        for start in range(0, len(texts_ids), step):
            ids, mask = pad_right(texts_ids[start: start + step], pad_id_of(tokenizer), device)
            forward_until_stopped(model, input_ids=ids, attention_mask=mask)
            captured[-1] = captured[-1][mask.bool()].float()
    return torch.cat(captured)

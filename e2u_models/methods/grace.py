"""GRACE: a codebook of (key, value, radius ε, label) attached to one linear layer; weights unchanged.

Per edit request (sequentially, the paper's protocol) the query q is the layer's input at the
prompt's last token (the position that predicts the answer's first token). With d the distance of
q to its nearest key j: an empty codebook or d > ε_new + ε_j adds (q, ε = ``eps``); a conflict
with a different label (target tokens) adds q and splits the radii (ε_j = d/2 − 1e-5, ε_q = d/2);
the same label expands ε_j to d (``coverage``). The value of the entry that now fires at q is
trained so the model produces the target: since the value replaces the layer's output at that
position, value = (output at q) + δ and δ is optimised by the shared v* engine
(:mod:`e2u_models.editing.vstar`; Adam with ``edit_lr``, no KL, no decay, no clamp; Adam is
shift-invariant, so this is exactly training the value from a ``warm`` initialisation).

Training the values one request at a time is the paper's protocol; it is needed only where a
request's training sees another entry. The layer's *input* at every position of every training row
is fixed before any training (it depends on the layers below and the layer's attention, not on the
codebook at its output, and δ enters at the output), so whether an entry fires anywhere in a
row can be decided up front, for the codebook as it stands at that request's turn and for the
final one. When no request's rows come near another entry (with a margin) and no entry is shared,
each value's training is the same with or without the others, and all values train together in
the batched v* engine (``batch_values``); otherwise they train in the paper's sequence.

At inference every token position whose layer input lies within the radius of its nearest key
gets that key's value as the layer's output (:class:`Codebook`); positions are independent, so
the edit acts the same under teacher forcing, batched/padded inputs and KV-cached generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from e2u_models.architectures import LAYERS, MLP_OUT, engine_record, out_in_weight, with_architecture
from e2u_models.editing.adapters import Adapter
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.editing.keys import module_inputs, read_at_keys
from e2u_models.editing.locate import OneLayerChoice, module_named
from e2u_models.editing.requests import KeySpec, prepare_requests
from e2u_models.editing.verify import check_finite, target_nll, verification
from e2u_models.editing.vstar import VStarSettings, optimise_targets

NAME = "grace"
KIND = "editing"
USES_RETAIN = False
VAL_INITS = ("warm",)
EPS_EXPANDS = ("coverage",)
# Messages of rules declared on the fields (checked by e2u_models.hparams).
NOT_IMPLEMENTED = "hparam {name}={value!r} is not implemented; accepted: {choices}"
NLL_MESSAGE = "hparams loss_threshold must be >= 0 and verify_nll > 0"


@dataclass(frozen=True)
class HyperParams(OneLayerChoice):
    """EasyEdit's GRACE names where they mean the same (``eps``, ``edit_lr``, ``n_iter``,
    ``val_init``, ``eps_expand``). ``layer`` wins over ``layer_fraction`` (relative depth)."""

    layer: int | None = None
    layer_fraction: float = field(default=0.85, metadata={"range": "[0, 1]"})
    # Module paths ({} / %d / N = the layer); unset = the architecture family's.
    inner_module_tmp: str | None = field(default=None, metadata=MLP_OUT)
    layer_module_tmp: str | None = field(default=None, metadata=LAYERS)
    eps: float = field(default=1.0, metadata={"above": 0, "message": "hparam {name}={value} is not accepted; the "
                                                                    "deferral radius must be > 0 (e.g. eps=1.0)"})
    edit_lr: float = field(default=1.0, metadata={"above": 0})
    n_iter: int = field(default=50, metadata={"min": 1})
    # e2u addition: stop training a value once the target NLL is below this (0 = all n_iter steps).
    loss_threshold: float = field(default=5e-2, metadata={"min": 0, "message": NLL_MESSAGE})
    val_init: str = field(default="warm", metadata={"choices": VAL_INITS, "message": NOT_IMPLEMENTED})
    eps_expand: str = field(default="coverage", metadata={"choices": EPS_EXPANDS, "message": NOT_IMPLEMENTED})
    target_eos: bool = True
    verify_nll: float = field(default=1.0, metadata={"above": 0, "message": NLL_MESSAGE})
    # e2u addition: train the values together where that is provably the same as one at a time
    # (module docstring); false = always the paper's sequence.
    batch_values: bool = True


def key_spec(hparams: HyperParams) -> KeySpec:
    """GRACE's query: the prompt's last token, the bare prompt only."""
    return KeySpec(fact_token="prompt_last", target_eos=hparams.target_eos)


def value_training(hparams: HyperParams) -> VStarSettings:
    """The shared v* engine as GRACE's value training: Adam with ``edit_lr`` for ``n_iter``
    steps, no decay, no KL, no norm clamp; low-memory steps, so that training every value
    together holds about the memory of training them one at a time."""
    return VStarSettings(layer_module_tmp=hparams.layer_module_tmp, num_grad_steps=hparams.n_iter,
                         lr=hparams.edit_lr, weight_decay=0.0, clamp_norm_factor=None, kl_factor=0.0,
                         loss_threshold=hparams.loss_threshold, mode="fast", low_memory=True)


class Codebook(Adapter):
    """GRACE's codebook on one linear module: keys (layer inputs), values (layer outputs), radii."""

    kind = "grace"

    def __init__(self, module_name: str, keys: torch.Tensor, values: torch.Tensor,
                 radii: torch.Tensor, labels: list[list[int]], rows: list[int]) -> None:
        super().__init__(module_name)
        self.keys, self.values, self.radii = keys, values, radii
        self.labels, self.rows = labels, rows

    @classmethod
    def empty(cls, module_name: str, module: torch.nn.Module) -> "Codebook":
        weight = out_in_weight(module)
        d_out, d_in = weight.shape
        return cls(module_name, weight.new_zeros((0, d_in), dtype=torch.float32),
                   weight.new_zeros((0, d_out)), weight.new_zeros((0,), dtype=torch.float32), [], [])

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of each query's nearest key, exact Euclidean in float32."""
        dist = torch.cdist(queries.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        return dist.min(-1)

    def rewrite(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.keys.shape[0] == 0:
            return output
        flat_in = inputs.reshape(-1, inputs.shape[-1]).to(self.keys.device)
        distance, index = self.nearest(flat_in)
        hit = distance <= self.radii[index]
        if not bool(hit.any()):
            return output
        flat_out = output.reshape(-1, output.shape[-1]).clone()
        flat_out[hit.to(flat_out.device)] = self.values[index[hit]].to(flat_out.device, flat_out.dtype)
        return flat_out.reshape(output.shape)

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: list[int], row: int) -> int:
        self.keys = torch.cat([self.keys, key.float()[None].to(self.keys.device)])
        self.values = torch.cat([self.values, value[None].to(self.values.device, self.values.dtype)])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.labels.append(list(label))
        self.rows.append(row)
        return self.keys.shape[0] - 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "radii": self.radii}

    def describe(self) -> dict[str, Any]:
        return {"entries": int(self.keys.shape[0]), "labels": self.labels, "rows": self.rows}

    @classmethod
    def restore(cls, model, description: dict, tensors: dict[str, torch.Tensor]) -> "Codebook":
        module = module_named(model, description["module"], 0, "inner_module_tmp")
        weight = module.weight
        return cls(description["module"], tensors["keys"].to(weight.device, torch.float32),
                   tensors["values"].to(weight.device, weight.dtype),
                   tensors["radii"].to(weight.device, torch.float32),
                   [list(x) for x in description["labels"]], list(description["rows"]))


def place_query(codebook: Codebook, query: torch.Tensor, plain_output: torch.Tensor,
                label: list[int], row: int, eps: float) -> tuple[int, str]:
    """GRACE's codebook update for one query; returns (entry to train, what happened)."""
    if codebook.keys.shape[0] == 0:
        return codebook.add(query, plain_output, eps, label, row), "added"
    distance, index = nearest_key(codebook, query)
    if distance > eps + float(codebook.radii[index]):
        return codebook.add(query, plain_output, eps, label, row), "added"
    if codebook.labels[index] != list(label):
        codebook.radii[index] = max(distance / 2 - 1e-5, 0.0)
        return codebook.add(query, plain_output, distance / 2, label, row), "split"
    codebook.radii[index] = max(distance, float(codebook.radii[index]))
    return index, "expanded"


def nearest_key(codebook: Codebook, query: torch.Tensor) -> tuple[float, int]:
    distance, index = codebook.nearest(query[None])
    return float(distance[0]), int(index[0])


# Another entry counts as reaching a position when the position lies within its radius times
# (1 + REACH_MARGIN) plus REACH_MARGIN: far enough from the boundary that the float noise of a
# differently batched forward cannot change the decision.
REACH_MARGIN = 1e-3


def reached_by_others(inputs: torch.Tensor, keys: torch.Tensor, radii: torch.Tensor, own: int) -> bool:
    """Whether any entry but ``own`` comes within (a margin of) its radius at any position."""
    if keys.shape[0] == 0:
        return False
    distance = torch.cdist(inputs, keys, compute_mode="donot_use_mm_for_euclid_dist")
    reach = radii * (1 + REACH_MARGIN) + REACH_MARGIN
    near = distance <= reach
    if own < keys.shape[0]:
        near[:, own] = False
    return bool(near.any())


def why_not_batched(model, tokenizer, prepared, codebook: Codebook, entries: list[int], events: list[str],
                    history: list[tuple[int, torch.Tensor]], module_name: str) -> str | None:
    """None when training every value together equals the paper's sequence (module docstring),
    else the reason it does not."""
    if "expanded" in events:
        return "an entry is shared by several requests (its value trains on top of the earlier one)"
    rows = [request.nll_rows(number)[0].ids for number, request in enumerate(prepared)]
    # A few rows per forward: the decision has a margin for the float noise of the batching.
    per_row = torch.split(module_inputs(model, tokenizer, rows, module_name, batch_size=8), [len(r) for r in rows])
    for number, inputs in enumerate(per_row):
        size, radii = history[number]
        if (reached_by_others(inputs, codebook.keys[:size], radii, entries[number])
                or reached_by_others(inputs, codebook.keys, codebook.radii, entries[number])):
            return f"request row {prepared[number].request.index} reaches another entry"
    return None


def apply(model, tokenizer, forget: list[EditRequest], retain, hparams: HyperParams, *,
          seed: int = 0, env: MethodEnv) -> MethodReport:
    hparams = with_architecture(hparams, model)
    layer, module_name, module = hparams.edit_site(model)
    architecture = engine_record(model, module_name, module_name, hparams.layer_module_tmp.format(layer),
                                 True, env.log)
    prepared = prepare_requests(model, tokenizer, forget, key_spec(hparams), env, seed)
    settings = value_training(hparams)
    before = target_nll(model, tokenizer, prepared)
    codebook = Codebook.empty(module_name, module)
    codebook.attach(model)
    entries, events, nearest, history = [], [], [], []
    try:
        # The codebook's keys and radii: each request's query in turn. A query does not depend on
        # the codebook at the module's output, so all are read in one pass, and the values can be
        # trained afterwards.
        queries = read_at_keys(model, tokenizer, [request.key_rows(0)[0] for request in prepared],
                               {module_name: "input"})[module_name]
        for request, query in zip(prepared, queries):
            with torch.no_grad():
                plain = torch.nn.functional.linear(query.to(module.weight.dtype), out_in_weight(module), module.bias)
            if codebook.keys.shape[0]:
                nearest.append(round(nearest_key(codebook, query)[0], 3))
            entry, event = place_query(codebook, query, plain, list(request.target_ids),
                                       request.request.index, hparams.eps)
            entries.append(entry)
            events.append(event)
            history.append((int(codebook.keys.shape[0]), codebook.radii.clone()))
        reason = (why_not_batched(model, tokenizer, prepared, codebook, entries, events, history, module_name)
                  if hparams.batch_values and len(prepared) > 1 else "batch_values=false")
        schedule = [list(range(len(prepared)))] if reason is None else [[n] for n in range(len(prepared))]
        keys, radii, values = codebook.keys, codebook.radii, codebook.values
        losses, steps, seconds = [0.0] * len(prepared), [0] * len(prepared), 0.0
        for numbers in schedule:
            if reason is not None:  # the paper's sequence: the codebook as it stood at this request's turn
                size, codebook.radii = history[numbers[0]]
                codebook.keys, codebook.values = keys[:size], values[:size]  # views: values train in place
            desc = (f"GRACE values ({len(numbers)} together)" if reason is None
                    else f"GRACE {numbers[0] + 1}/{len(prepared)}")
            # Together, every entry still holds its query's plain output: v0, no pass needed.
            known_v0 = values[[entries[n] for n in numbers]].float() if reason is None else None
            result = optimise_targets(model, tokenizer, [prepared[n] for n in numbers], settings, layer,
                                      module_name, desc=desc, v0=known_v0)
            for k, number in enumerate(numbers):
                check_finite(result.deltas[k], f"GRACE value of request row {prepared[number].request.index}")
                values[entries[number]] = (result.v0[k] + result.deltas[k]).to(values.dtype)
                losses[number], steps[number] = round(result.losses[k], 4), result.steps[k]
            seconds += result.seconds
        codebook.keys, codebook.radii, codebook.values = keys, radii, values
    except BaseException:
        codebook.detach(model)  # a failed edit never leaves a half-built codebook behind
        raise
    after = target_nll(model, tokenizer, prepared)
    counts = {name: events.count(name) for name in ("added", "split", "expanded")}
    details: dict[str, Any] = {
        "layer": layer, "module": module_name, "requests": len(prepared), "protocol": "sequential",
        "value_training": "together (no request's rows reach another entry)" if reason is None
                          else f"one at a time ({reason})",
        "codebook": {"entries": int(codebook.keys.shape[0]), **counts,
                     "radii": [round(r, 4) for r in codebook.radii.tolist()],
                     # distance of each new query to the nearest existing key (vs. eps)
                     "nearest_key_distances": nearest,
                     "key_norm_mean": round(float(codebook.keys.norm(dim=-1).mean()), 3)},
        "training": {"seconds": round(seconds, 2), "final_losses": losses, "steps": steps},
        "adapters": [{"kind": codebook.kind, "module": module_name}],
        "architecture": architecture,
    }
    details["verification"] = verification(before, after, prepared, hparams.verify_nll, {}, env.log)
    return MethodReport(method=NAME, details=details)

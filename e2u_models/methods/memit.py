"""MEMIT: one least-squares update spread over several layers for a batch of requests.

Target vectors z_i = v*_i at the last edit layer's output (:mod:`e2u_models.editing.vstar`). Then
for each edit layer l in ascending order, on the weights already updated below it: K (keys at
the key token, averaged over contexts; with ``merge_keys=members`` one column per question of a
merged edit, each with its edit's residual), R = (Z − Z_cur)/(layers left), Z_cur the last edit
layer's current output at the key, and ΔW_l = Rᵀ K (λ C_l + Kᵀ K)⁻¹ solved in float64, C_l the
second moment of the layer's key (:mod:`e2u_models.editing.stats`), λ = ``mom2_update_weight``.
``edit_batch_size`` requests per update (0 = all in one batch); later batches edit the edited model.
AlphaEdit reuses this loop with its own solve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from e2u_models.architectures import engine_record, with_architecture
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.editing.keys import key_columns, read_at_keys
from e2u_models.editing.locate import LocateHParams, num_layers, rewrite_weight
from e2u_models.editing.requests import KeySpec, PreparedRequest, merge_requests, prepare_requests
from e2u_models.editing.stats import StatsSpec, statistics_for
from e2u_models.editing.verify import check_finite, target_nll, verification
from e2u_models.editing.vstar import VStarSettings, optimise_targets
from e2u_models.snapshot import restored_on_failure

NAME = "memit"
KIND = "editing"
USES_RETAIN = False

# solve(layer, K (n, d_in) float64, R (n, d_out) float64) -> ΔW (d_out, d_in) float64
Solver = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HyperParams(LocateHParams):
    mom2_update_weight: float = field(default=15000.0, metadata={"min": 0})
    edit_batch_size: int = field(default=0, metadata={"min": 0, "hint": "0 = one batch"})


def keys_and_outputs(model, tokenizer, batch: Sequence[PreparedRequest], hparams: LocateHParams,
                     layer: int, z_layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys of ``layer`` averaged over contexts, one column per question (:func:`key_columns`),
    each column's request, and the z layer's output at the bare prompt's key (n, d_model), in
    one pass."""
    key_module = hparams.rewrite_module_tmp.format(layer)
    z_module = hparams.layer_module_tmp.format(z_layer)
    rows = [row for i, p in enumerate(batch) for row in p.key_rows(i)]
    read = read_at_keys(model, tokenizer, rows, {key_module: "input", z_module: "output"})
    bare = [k for k, row in enumerate(rows) if k == 0 or rows[k - 1].request != row.request]
    keys, owners = key_columns(read[key_module], batch)
    return keys, owners, read[z_module][bare]


def edit_batches(model, tokenizer, prepared: Sequence[PreparedRequest], hparams, layers: list[int],
                 solve: Solver, after_batch: Callable[[Sequence[PreparedRequest]], None] | None,
                 name: str) -> dict:
    """MEMIT's loop over batches and layers with a method-specific ``solve``."""
    z_layer = layers[-1]
    size = hparams.edit_batch_size or len(prepared)
    weights = {l: rewrite_weight(model, hparams, l) for l in layers}
    settings = VStarSettings.of(hparams)
    v_seconds, losses, modes = 0.0, [], set()
    for start in range(0, len(prepared), size):
        batch = prepared[start: start + size]
        result = optimise_targets(model, tokenizer, batch, settings, z_layer,
                                  hparams.layer_module_tmp.format(z_layer),
                                  desc=f"{name} v* batch {start // size + 1}")
        v_seconds += result.seconds
        losses.extend(result.losses)
        modes.add(result.mode)
        targets = result.targets.double()
        for position, layer in enumerate(layers):
            keys, owners, current = keys_and_outputs(model, tokenizer, batch, hparams, layer, z_layer)
            residual = (targets - current.double()) / (len(layers) - position)
            update = solve(layer, keys.double(), residual[owners])
            check_finite(update, f"{name} update of layer {layer}")
            weight = weights[layer]
            with torch.no_grad():
                weight.add_(update.to(weight.device, weight.dtype))
        if after_batch is not None and start + size < len(prepared):  # only later batches read it
            after_batch(batch)
    return {"seconds": round(v_seconds, 2), "mode": "/".join(sorted(modes)) or hparams.v_mode,
            "final_losses": [round(x, 4) for x in losses]}


def run(model, tokenizer, forget, hparams, env: MethodEnv, seed: int, name: str,
        make_solver: Callable[[dict[int, torch.Tensor], dict], tuple[Solver, Callable | None]]) -> MethodReport:
    """The whole MEMIT-family edit: requests, statistics, batches, verification."""
    hparams = with_architecture(hparams, model)
    layers = hparams.resolved_layers(num_layers(model))
    weights = {hparams.rewrite_module_tmp.format(l) + ".weight": rewrite_weight(model, hparams, l)
               for l in layers}  # checks the module names before any work
    requests = merge_requests(forget, hparams.merge, env.render)
    prepared = prepare_requests(model, tokenizer, requests, KeySpec.of(hparams), env, seed, forget)
    details: dict = {"layers": layers, "requests": len(prepared),
                     "edit_batch_size": hparams.edit_batch_size or len(prepared),
                     "architecture": engine_record(model, hparams.rewrite_module_tmp.format(layers[0]),
                                                   hparams.layer_module_tmp.format(layers[-1]),
                                                   hparams.layer_module_tmp.format(layers[-1]),
                                                   hparams.v_mode == "fast", env.log)}
    started = time.perf_counter()
    moments, details["statistics"] = statistics_for(model, tokenizer, StatsSpec.of(hparams), layers, env)
    details["statistics"]["seconds"] = round(time.perf_counter() - started, 2)
    solve, after_batch = make_solver(moments, details)
    before = target_nll(model, tokenizer, prepared)
    with restored_on_failure(weights) as snapshot:
        details["v_star"] = edit_batches(model, tokenizer, prepared, hparams, layers, solve,
                                         after_batch, name)
        changes = snapshot.change_norms(weights)
    after = target_nll(model, tokenizer, prepared)
    details["verification"] = verification(before, after, prepared, hparams.verify_nll, changes, env.log)
    return MethodReport(method=name, changed_parameters=list(weights), details=details)


def apply(model, tokenizer, forget: list[EditRequest], retain, hparams: HyperParams, *,
          seed: int = 0, env: MethodEnv) -> MethodReport:
    def make_solver(moments, details):
        def solve(layer, keys, residual):
            moment = moments[layer].to(keys.device, torch.float64)
            system = hparams.mom2_update_weight * moment + keys.T @ keys
            return torch.linalg.solve(system, keys.T @ residual).T

        return solve, None

    return run(model, tokenizer, forget, hparams, env, seed, NAME, make_solver)
